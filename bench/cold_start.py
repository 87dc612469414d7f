"""Time to first image from a fresh process: AOTInductor package vs ``optimize(mode=...)`` cold and warm.

    python -m bench cold-start --out bench/results [--steps 10] [--mode default]

Each variant runs in its own Python process (``python -c``, :func:`bench.measure.run_child`), timed from process
start to the first generated image, on the tiny FLUX of ``dbcache_compile.testing``: ``package`` loads a package made
once by ``dbcache_compile.export``; ``compile-cold`` compiles with an empty Inductor/FX cache directory (one per
lowering); ``compile-warm`` runs again on the cache the cold run filled. Writes ``cold_start_<device>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
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


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench cold-start``."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", default="default")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant (its process group is killed)")


def execute(args: argparse.Namespace) -> int:
    """Export once, then one fresh process per variant; 1 when a variant failed."""
    import torch

    from .report import markdown_table, metadata, write_report

    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = metadata(args.command_line, device)
    work = Path(tempfile.mkdtemp(prefix="dbc_cold_"))
    try:
        seconds, export_seconds = _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the package and the Inductor caches of every variant
    meta.update({"model": "tiny FLUX (dbcache_compile.testing)", "config": CONFIG, "steps": args.steps,
                 "mode": args.mode, "export_seconds": round(export_seconds, 1)})
    body = [f"{meta['model']}, config {CONFIG}, {args.steps} steps. Export + AOTInductor packaging took "
            f"{meta['export_seconds']} s (once). Seconds from process start to the first image.", "",
            *markdown_table(["variant", "seconds to first image"], list(seconds.items()))]
    md, _ = write_report(args.out / f"cold_start_{device}", f"Time to first image from a fresh process ({device})",
                         meta, body, {"seconds_to_first_image": seconds})
    print(md.read_text())
    return 0 if all(isinstance(v, float) for v in seconds.values()) else 1


def _measure(args: argparse.Namespace, work: Path) -> tuple[dict[str, object], float]:
    """Export into ``work``, then time each variant in a fresh process; ``(seconds per variant, export s)``."""
    import torch

    import dbcache_compile as dbc
    from dbcache_compile.export import capture_transformer_inputs
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    from .measure import run_child
    from .report import ROOT

    pipe = tiny_flux_pipeline()
    example = capture_transformer_inputs(pipe, **flux_inputs(), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    package = dbc.export(pipe, example, work / "flux_tiny.pt2", cache=CONFIG)
    export_seconds = time.perf_counter() - start
    variants = {
        "eager (no compile)": (_PRELUDE + f"dbc.optimize(pipe, cache={CONFIG!r})\n", "none"),
        "package (AOTInductor)": (_PRELUDE + f"dbc.load({str(package)!r}, pipe=pipe)\n", "none"),
    }
    for graph in ("cond", "segments", "regional"):
        code = _PRELUDE + f"dbc.optimize(pipe, cache={CONFIG!r}, mode={args.mode!r}, graph={graph!r})\n"
        variants[f"compile-cold (mode={args.mode}, {graph})"] = (code, graph)
        variants[f"compile-warm (mode={args.mode}, {graph})"] = (code, graph)
    seconds: dict[str, object] = {}
    for name, (code, cache) in variants.items():  # each lowering starts from its own empty Inductor cache
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{cache}"))
        child = run_child([sys.executable, "-c", code + _RUN.format(steps=args.steps)], cap=args.timeout, env=env,
                          cwd=ROOT)
        if child.returncode == 0:
            seconds[name] = round(child.seconds, 2)
        else:
            reason = f"timed out after {args.timeout} s" if child.timed_out else child.output.strip()[-300:]
            seconds[name] = f"failed: {reason!r}"
            print(f"[bench cold-start] {name} failed:\n{child.output[-3000:]}", file=sys.stderr)
    return seconds, export_seconds
