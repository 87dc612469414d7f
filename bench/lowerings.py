"""cond vs segments vs regional on the embedded digits model, same process, interleaved runs: compile time and
steady time.

    python -m bench.lowerings --out bench/results [--repeats 7]

All lowerings are compiled (mode "default") on their own pipeline, then timed alternately so that machine noise
hits both alike. Run it twice to see the warm-Inductor-cache compile times. Writes ``lowerings_<device>.md``/``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CONFIG = "F1B0_W4MC2_R0.2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lowerings", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import dbcache_compile as dbc
    from dbcache_compile.digits import load_digits_pipeline

    labels = [d for d in range(10) for _ in range(4)]

    def call(pipe) -> float:
        start = time.perf_counter()
        pipe(labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False)
        return time.perf_counter() - start

    pipes, compile_s = {}, {}
    for lowering in ("cond", "segments", "regional"):
        pipes[lowering] = dbc.optimize(load_digits_pipeline(), cache=CONFIG, mode="default", graph=lowering)
        compile_s[lowering] = call(pipes[lowering])
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            times[name].append(call(pipe))
    report = {"date": time.strftime("%F"), "torch": torch.__version__, "device": "cpu (1 thread)",
              "model": "digits, 40 images, 20 steps", "config": CONFIG,
              "command": "python -m bench.lowerings " + " ".join(argv or sys.argv[1:]),
              "first_call_s": {k: round(v, 2) for k, v in compile_s.items()},
              "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
              "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowerings_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# cond vs segments vs regional (CPU)", "", f"{report['date']}, torch {report['torch']}, {report['device']}, "
             f"{report['model']}, config {CONFIG}. Command: `{report['command']}`.", "",
             "| lowering | first call (compile) s | steady median s | all runs s |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {report['first_call_s'][k]} | {report['median_s'][k]} | {report['all_s'][k]} |"
              for k in pipes]
    (args.out / "lowerings_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
