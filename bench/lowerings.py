"""The compiled lowerings (``cond``, ``segments``, ``regional``: every one of :mod:`dbcache_compile.lowerings` that
needs a compile mode and can run the digits model) on the embedded digits model, same process, interleaved runs:
compile time and steady time.

    python -m bench lowerings --out bench/results [--repeats 7]

All lowerings are compiled (mode "default") on their own pipeline, then timed alternately
(:func:`bench.measure.timed_call`) so that machine noise hits all alike. One torch thread. Run it twice to see the
warm-Inductor-cache compile times. Writes ``lowerings_<device>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

CONFIG = "F1B0_W4MC2_R0.2"


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench lowerings``."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=4, help="digits per class in the batch (default: 4)")


def execute(args: argparse.Namespace) -> int:
    """Compile each lowering, time the calls interleaved, write the report."""
    import torch

    import dbcache_compile as dbc
    from dbcache_compile.digits import load_digits_pipeline
    from dbcache_compile.families import family_for
    from dbcache_compile.lowerings import lowering_named, lowerings_for

    from .measure import timed_call
    from .report import markdown_table, metadata, write_report

    torch.set_num_threads(1)
    device = torch.device("cpu")
    meta = metadata(args.command_line, device)
    labels = [d for d in range(10) for _ in range(args.per_class)]

    def call(pipe) -> float:
        kwargs = {"labels": labels, "num_inference_steps": args.steps, "generator": torch.Generator().manual_seed(0),
                  "progress": False}
        return timed_call(pipe, kwargs, device)[0]

    family = family_for(load_digits_pipeline().transformer)
    lowerings = [name for name in lowerings_for(family) if lowering_named(name).compiled]
    pipes, first = {}, {}
    for lowering in lowerings:
        pipes[lowering] = dbc.optimize(load_digits_pipeline(), cache=CONFIG, mode="default", graph=lowering)
        first[lowering] = call(pipes[lowering])
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            times[name].append(call(pipe))
    median = {k: round(statistics.median(v), 3) for k, v in times.items()}
    meta.update({"model": f"digits, {len(labels)} images, {args.steps} steps", "config": CONFIG})
    rows = [[k, round(first[k], 2), median[k], [round(x, 3) for x in times[k]]] for k in pipes]
    body = [f"{meta['model']}, config {CONFIG}, Inductor mode `default`, 1 torch thread.", "",
            *markdown_table(["lowering", "first call (compile) s", "steady median s", "all runs s"], rows)]
    md, _ = write_report(args.out / f"lowerings_{device.type}", f"{' vs '.join(lowerings)} ({device.type})", meta,
                         body, {"first_call_s": {k: round(v, 2) for k, v in first.items()}, "median_s": median,
                                "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}})
    print(md.read_text())
    return 0
