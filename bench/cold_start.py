"""Time to first image from a fresh process: AOTInductor package vs ``optimize(mode=...)`` cold and warm.

    python -m bench.cold_start --out bench/results [--model flux-tiny] [--steps 10]

Each variant runs in its own Python process (``python -c``), timed from process start to the first generated
image: ``package`` loads a package made once by ``dbcache_compile.export``; ``compile-cold`` compiles with an empty
Inductor/FX cache directory (one per lowering); ``compile-warm`` runs again on the cache the cold run filled. Writes
``cold_start_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = "F1B0_W2M0MC2_T1O1_R0.45"

_PRELUDE = """
import time, torch
t0 = time.perf_counter()
import dbcache_compile as dbc
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
pipe = tiny_flux_pipeline()
"""
_RUN = """
pipe(**flux_inputs(), num_inference_steps={steps}, generator=torch.Generator().manual_seed(0))
print("FIRST_IMAGE_SECONDS", time.perf_counter() - t0)
"""


def _time_process(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"variant failed:\n{result.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", default="default")
    args = parser.parse_args(argv)
    import torch

    import dbcache_compile as dbc
    from dbcache_compile.export import capture_transformer_inputs
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    work = Path(tempfile.mkdtemp(prefix="dbc_cold_"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), OMP_NUM_THREADS="1")
    pipe = tiny_flux_pipeline()
    example = capture_transformer_inputs(pipe, **flux_inputs(), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    package = dbc.export(pipe, example, work / "flux_tiny.pt2", cache=CONFIG)
    export_seconds = time.perf_counter() - start
    rows = {
        "eager (no compile)": (_PRELUDE + f"dbc.optimize(pipe, cache={CONFIG!r})\n", "none"),
        "package (AOTInductor)": (_PRELUDE + f"dbc.load({str(package)!r}, pipe=pipe)\n", "none"),
    }
    for graph in ("cond", "segments", "regional"):
        code = _PRELUDE + f"dbc.optimize(pipe, cache={CONFIG!r}, mode={args.mode!r}, graph={graph!r})\n"
        rows[f"compile-cold (mode={args.mode}, {graph})"] = (code, graph)
        rows[f"compile-warm (mode={args.mode}, {graph})"] = (code, graph)
    results = {}
    for name, (code, cache) in rows.items():  # each lowering starts from its own empty Inductor cache
        env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{cache}"))
        results[name] = round(_time_process(code + _RUN.format(steps=args.steps), env), 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"date": time.strftime("%F"), "torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores", "device": device, "model": "tiny FLUX (dbcache_compile.testing)",
            "config": CONFIG, "steps": args.steps, "export_seconds": round(export_seconds, 1),
            "command": "python -m bench.cold_start " + " ".join(argv or sys.argv[1:]),
            "seconds_to_first_image": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cold_start_{device}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# Time to first image from a fresh process ({device})", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['machine']}, {meta['model']}, config {CONFIG}, "
             f"{args.steps} steps. Command: `{meta['command']}`. Export + AOTInductor packaging took "
             f"{meta['export_seconds']} s (once).", "", "| variant | seconds to first image |", "| --- | --- |"]
    lines += [f"| {name} | {seconds} |" for name, seconds in results.items()]
    (args.out / f"cold_start_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
