"""A notebook's config sweep: ``optimize`` → generate → ``disable`` with a new config each cycle, one pipeline.

    python -m bench sweep --out bench/results/sweep-cpu [--graph segments] [--cycles 12] [--store 32]

Each cycle changes only what is host data or a device scalar of the graphs (threshold, warm-up, cached-step limits,
steps mask), so with the process-wide compile store (:mod:`dbcache_compile.compiled`) every cycle after the first
reuses the first one's graphs. Per cycle it records the Dynamo graphs compiled so far in the process, what
``summary().compiled_graphs`` says, the resident memory after ``gc.collect()`` and the cycle's wall time. ``--store 0``
keeps nothing (the behaviour before the store) for the comparison. Writes ``sweep.md`` / ``sweep.json``.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

#: configs of one block split (F1B0): each later cycle changes threshold, W, M, MC or the steps mask
CONFIGS = ("F1B0_W2M0MC2_R0.6", "F1B0_W2M0MC3_R0.35", "F1B0_W3M0MC2_R0.4", "F1B0_W2M4MC2_R0.45",
           "F1B0_W4M0MC1_R0.3", "F1B0_W2M0MC4_R0.5", "F1B0_W3M3MC2_R0.25", "F1B0_W2M0MC2_R0.3",
           "F1B0_W1M0MC2_R0.35", "F1B0_W2M5MC3_R0.4", "F1B0_W3M0MC3_R0.5", "F1B0_W2M0MC1_R0.2_SCM11001")


def configure(parser: argparse.ArgumentParser) -> None:
    from dbcache_compile.lowerings import registered
    parser.add_argument("--out", type=Path, required=True, help="folder for sweep.md / sweep.json")
    parser.add_argument("--graph", default="segments",
                        choices=[c.name for c in registered() if c.compiled and not c.decides_on_device])
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--cycles", type=int, default=len(CONFIGS), help=f"1..{len(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per generation")
    parser.add_argument("--store", type=int, default=None, help="the compile store's limit (0: keep nothing)")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.cycles <= len(CONFIGS):
        parser.error(f"--cycles must be in 1..{len(CONFIGS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")


def execute(args: argparse.Namespace) -> int:
    import psutil
    import torch
    from torch._dynamo.utils import counters

    import dbcache_compile as dbc
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

    from .report import markdown_table, metadata, write_report

    torch.set_num_threads(1)
    if args.store is not None:
        dbc.compile_store_limit(args.store)
    meta = metadata(args.command_line, "cpu")
    pipe = tiny_flux_pipeline()
    process = psutil.Process()
    rows = []
    for cycle, config in enumerate(CONFIGS[:args.cycles]):
        start = time.perf_counter()
        dbc.optimize(pipe, cache=config, mode=args.mode, graph=args.graph)
        pipe(**flux_inputs(), num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        summary = dbc.summary(pipe)
        dbc.disable(pipe)
        gc.collect()
        rows.append({"cycle": cycle, "config": config, "seconds": round(time.perf_counter() - start, 2),
                     "dynamo_graphs": int(counters["stats"]["unique_graphs"]), **summary.compiled_graphs,
                     "cached_steps": summary.cached_steps, "rss_mib": round(process.memory_info().rss / 2 ** 20, 1)})
        print(rows[-1], flush=True)
    later = rows[1:]
    growth = round(later[-1]["rss_mib"] - rows[0]["rss_mib"], 1) if later else 0.0
    new_graphs = later[-1]["dynamo_graphs"] - rows[0]["dynamo_graphs"] if later else 0
    body = [f"Tiny FLUX (`dbcache_compile.testing`), `graph={args.graph!r}`, mode `{args.mode}`, {args.steps} steps, "
            f"compile store limit {dbc.compile_store_limit()}.", "",
            f"- Dynamo graphs compiled after the first cycle: **{new_graphs}**",
            f"- Resident memory after cycle 1 → after cycle {len(rows)}: **{growth:+.1f} MiB**",
            f"- First cycle {rows[0]['seconds']} s; later cycles median "
            f"{sorted(r['seconds'] for r in later)[len(later) // 2] if later else 'n/a'} s", "",
            *markdown_table(["cycle", "config", "seconds", "dynamo graphs", "reused", "compiled", "cached steps",
                             "RSS MiB"],
                            [[r["cycle"], r["config"], r["seconds"], r["dynamo_graphs"], r["reused"], r["compiled"],
                              r["cached_steps"], r["rss_mib"]] for r in rows])]
    md, _ = write_report(args.out / "sweep", "Config sweep: optimize -> generate -> disable", meta, body,
                         {"rows": rows, "new_graphs_after_first": new_graphs, "rss_growth_mib": growth})
    print(f"wrote {md}")
    return 0
