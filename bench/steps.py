"""Cold compile time and per-step times of the compiled lowerings (and eager), each variant in a fresh process.

    python -m bench steps --random-weights flux --height 1024 --width 1024 --graphs regional,segments \\
        --quantize none,fp8 --mode max-autotune --out bench/results/h100-steps-1024
    # per-call host overhead on the CPU, where the host dominates (bench/results/host_overhead_redesign_cpu.md)
    python -m bench steps --random-weights flux-tiny --height 32 --width 32 --steps 10 \\
        --config F1B0_W2M0MC2_T0O1_R0.4 --graphs eager,regional --mode default --dtype fp32 --threads 1 \\
        --repeats 2 --timed-generations 30 --device cpu --tag host-overhead

Each (lowering, quantization, fused QKV) variant runs in its own Python process (``python -m bench steps ... --one
VARIANT``) with an empty Inductor cache directory, so its first call pays the whole compile (and, on CUDA, the graph
captures), as a user's first call does. Per variant:

* ``first call s`` / ``steady call s``: pipeline wall (:func:`bench.measure.timed_call`) of the first and of the
  median later generation, and ``compile s`` = their difference;
* ``miss ms`` / ``hit ms``: median wall of the transformer calls that computed / used the cache, timed by
  :class:`bench.measure.TransformerTimer` hooks with the device synchronized before and after each call (what a step
  costs the pipeline), over the calls of ``--timed-generations`` generations after the steady ones; ``_min``: their
  minimum, the least disturbed by other jobs on a shared machine;
* ``miss GPU ms`` / ``hit GPU ms``: CUDA-event time of the same calls, events recorded on the stream around the
  call (includes any GPU idle time the host causes inside the call);
* ``graph ms`` (``regional`` on CUDA): replay time of each hand-captured segment graph alone (head, miss, hit),
  back to back, CUDA events: the floor a step can reach. ``hit ms / (head + hit graph ms)`` is the host overhead
  factor of a hit step (target <= 1.1, ``docs/design.md`` "Numbers to beat").

The cache config defaults to the forced schedule ``F1B0_W4MC6_R1.0`` (R >= 1: every step the gates allow is a
hit), so hits and misses are the same steps for every variant. Writes ``steps_<tag>.md`` / ``.json`` into
``--out``; on a CPU the GPU columns are n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

DEFAULT_CONFIG = "F1B0_W4MC6_R1.0"


def _variant(args: argparse.Namespace, graph: str, quantize: Optional[str], fuse_qkv: bool) -> dict[str, Any]:
    """Runs in the child process: build, optimize, time."""
    import torch

    import dbcache_compile as dbc
    from dbcache_compile.lowerings import GRAPHS, lowering_named

    from .measure import TransformerTimer, timed_call
    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = load_model(None, args.random_weights, device, dtype, args.steps, args.height, args.width, seed=0)
    pipe = model.pipe
    # a name of optimize(graph=...) ("auto" or a compiled lowering), or a lowering that runs without a mode (eager)
    compiled = graph in GRAPHS or lowering_named(graph).compiled
    dbc.optimize(pipe, cache=args.config, quantize=quantize, fuse_qkv=fuse_qkv, attention=args.attention,
                 mode=args.mode if compiled else None, graph=graph if compiled else "auto")
    transformer = pipe.transformer
    runtime = dbc.runtime_of(pipe)
    cuda = device.type == "cuda"

    def generation(i: int) -> float:
        return timed_call(pipe, model.make_inputs(i, ""), device)[0]

    first = generation(0)
    walls = [generation(i) for i in range(1, 1 + args.repeats)]

    # per-call timing of --timed-generations more generations (the same inputs): hooks, the device synchronized
    # around each call; each call is a hit or a miss by the summary of its own generation
    timer = TransformerTimer(transformer, device, sync_each_call=True)
    miss: list[tuple[float, Optional[float]]] = []
    hit: list[tuple[float, Optional[float]]] = []
    schedule: Optional[tuple[int, int]] = None
    try:
        for _ in range(args.timed_generations):
            timer.start()
            pipe(**model.make_inputs(0, ""))
            calls = timer.per_call()
            summary = dbc.summary(pipe)
            per_step = 2 if summary.separate_cfg else 1  # with separate CFG, call 2k+1 is step k's unconditional one
            hits = [set(summary.cached_steps), set(summary.cfg_cached_steps)]
            is_hit = [i // per_step in hits[i % per_step] for i in range(len(calls))]
            schedule = schedule or (sum(is_hit), len(calls))
            miss += [c for c, h in zip(calls, is_hit) if not h]
            hit += [c for c, h in zip(calls, is_hit) if h]
    finally:
        timer.remove()
    ms = lambda xs: round(1e3 * statistics.median(xs), 3) if xs else None  # noqa: E731
    low = lambda xs: round(1e3 * min(xs), 3) if xs else None  # noqa: E731
    graph_ms: dict[str, float] = {}
    if runtime.graphs is not None and cuda:
        for key, entry in runtime.graphs.entries.items():
            times = []
            for _ in range(20):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                entry.graph.replay()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            graph_ms[key[0]] = round(statistics.median(times), 3)
    from torch._dynamo.utils import counters
    return {
        "graph": summary.lowering, "quantize": quantize or "none", "fuse_qkv": fuse_qkv, "mode": args.mode,
        "first_call_s": round(first, 2), "steady_call_s": round(statistics.median(walls), 3),
        "compile_s": round(first - statistics.median(walls), 1),
        "miss_ms": ms([w for w, _ in miss]), "hit_ms": ms([w for w, _ in hit]),
        "miss_ms_min": low([w for w, _ in miss]), "hit_ms_min": low([w for w, _ in hit]),
        "timed_generations": args.timed_generations, "timed_hits": len(hit), "timed_misses": len(miss),
        "miss_gpu_ms": ms([g for _, g in miss]) if cuda else None,
        "hit_gpu_ms": ms([g for _, g in hit]) if cuda else None,
        "graph_ms": graph_ms or None, "cached_calls": schedule[0], "calls": schedule[1],
        "cudagraphs": summary.cudagraphs, "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench steps``."""
    parser.add_argument("--random-weights", default="flux", help="flux | flux-narrow | flux-tiny | qwen-image")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--graphs", default="regional,segments",
                        help="comma-separated lowerings (dbcache_compile.lowerings: the compiled ones, 'auto', and "
                             "the eager one, optimize without a compile mode)")
    parser.add_argument("--quantize", default="none", help="comma-separated: none, fp8, int8, ...")
    parser.add_argument("--fuse-qkv", default="off", help="comma-separated: off, on (diffusers fuse_qkv_projections)")
    parser.add_argument("--mode", default="max-autotune")
    parser.add_argument("--attention", default=None,
                        help="optimize(attention=...): 'auto' (cuDNN SDPA on Hopper) or a diffusers backend name "
                             "(default: leave the model's)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="steady generations after the first")
    parser.add_argument("--timed-generations", type=int, default=1,
                        help="generations whose transformer calls are timed one by one (hit / miss ms: median and "
                             "minimum over all their calls); default 1")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant (its process group is killed)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: model-height-device)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: "graph:quantize:fuse"


COLUMNS = ["graph", "quantize", "fuse_qkv", "first_call_s", "compile_s", "steady_call_s", "miss_ms", "hit_ms",
           "miss_ms_min", "hit_ms_min", "miss_gpu_ms", "hit_gpu_ms", "graph_ms", "cached_calls", "graph_breaks",
           "cudagraph_skips", "cudagraphs"]


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from dbcache_compile.lowerings import GRAPHS, registered

    if args.timed_generations < 1 or args.repeats < 1:
        parser.error("--timed-generations and --repeats must be >= 1")
    known = list(dict.fromkeys([*GRAPHS, *(c.name for c in registered())]))
    unknown = [g for g in args.graphs.split(",") if g not in known]
    if unknown:
        parser.error(f"--graphs: unknown {unknown}; choose from {', '.join(known)}")


def execute(args: argparse.Namespace) -> int:
    """Child (``--one``): run one variant and print ``RESULT {json}``. Parent: one child per variant, then the
    report; 1 when a variant failed."""
    if args.one is not None:
        graph, quantize, fuse = args.one.split(":")
        result = _variant(args, graph, None if quantize == "none" else quantize, fuse == "on")
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    from .measure import run_child
    from .report import ROOT, markdown_table, metadata, write_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = metadata(args.command_line, device)
    rows = []
    variants = [(g, q, f) for g in args.graphs.split(",") for q in args.quantize.split(",")
                for f in args.fuse_qkv.split(",")]
    for graph, quantize, fuse in variants:
        with tempfile.TemporaryDirectory(prefix="dbc_steps_inductor_") as cache_dir:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
            print(f"[bench steps] {graph} / quantize={quantize} / fuse_qkv={fuse} (fresh Inductor cache "
                  f"{cache_dir})", flush=True)
            child = run_child([sys.executable, "-m", "bench", *args.argv, "--one", f"{graph}:{quantize}:{fuse}"],
                              cap=args.timeout, env=env, cwd=ROOT)
        result = next((json.loads(line[7:]) for line in child.output.splitlines() if line.startswith("RESULT ")),
                      None)
        if result is None:
            error = f"timed out after {args.timeout} s" if child.timed_out else child.output.strip()[-2000:]
            result = {"graph": graph, "quantize": quantize, "fuse_qkv": fuse == "on", "error": error}
        print(json.dumps(result), flush=True)
        rows.append(result)
    meta.update({"model": args.random_weights, "resolution": f"{args.height}x{args.width}", "steps": args.steps,
                 "config": args.config, "mode": args.mode, "dtype": args.dtype, "attention": args.attention})
    table = []
    for row in rows:
        if "error" in row:
            table.append([row["graph"], row["quantize"], row["fuse_qkv"], f"failed: {row['error'][-300:]!r}"]
                         + [""] * (len(COLUMNS) - 4))
        else:
            table.append([row.get(c) for c in COLUMNS])
    tag = args.tag or f"{args.random_weights}-{args.height}-{device}"
    body = [f"{meta['model']} {meta['resolution']}, {args.steps} steps, mode {args.mode}, {args.dtype}, config "
            f"{args.config}. Each row is a fresh process with an empty Inductor cache; ms columns are medians (`_min`: "
            f"minima) over the transformer calls of {args.timed_generations} timed generation(s).", "",
            *markdown_table(COLUMNS, table)]
    md, _ = write_report(args.out / f"steps_{tag}", f"Compile and step times: {meta['model']} {meta['resolution']}",
                         meta, body, {"rows": rows})
    print(md.read_text())
    return 0 if all("error" not in r for r in rows) else 1
