"""Cold compile time and per-step times of the compiled lowerings, each variant in a fresh process.

    python -m bench.steps --random-weights flux --height 1024 --width 1024 --graphs regional,segments \\
        --quantize none,fp8 --mode max-autotune --out bench/results/h100-steps-1024

Each (lowering, quantization) variant runs in its own Python process with an empty Inductor cache directory, so
its first call pays the whole compile (and, on CUDA, the graph captures), as a user's first call does. Per variant:

* ``first call s`` / ``steady call s``: pipeline wall of the first and of the median later generation, and
  ``compile s`` = their difference;
* ``miss ms`` / ``hit ms``: median wall of the transformer calls that computed / used the cache, the device
  synchronized before and after each call (what a step costs the pipeline);
* ``miss GPU ms`` / ``hit GPU ms``: CUDA-event time of the same calls, events recorded on the stream around the
  call without a host sync inside (includes any GPU idle time the host causes);
* ``graph ms`` (``regional`` on CUDA): replay time of each hand-captured segment graph alone (head, miss, hit),
  back to back, CUDA events: the floor a step can reach. ``hit ms / (head + hit graph ms)`` is the host overhead
  factor of a hit step (target <= 1.1, DESIGN.md §5).

The cache config defaults to the forced schedule ``F1B0_W4MC6_R1.0`` (R >= 1: every step the gates allow is a
hit), so hits and misses are the same steps for every variant. Writes ``steps_<tag>.md`` / ``.json`` into
``--out``; on a CPU the GPU columns are n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

DEFAULT_CONFIG = "F1B0_W4MC6_R1.0"


def _variant(args: argparse.Namespace, graph: str, quantize: Optional[str], fuse_qkv: bool) -> dict[str, Any]:
    """Runs in the child process: build, optimize, time."""
    import torch

    import dbcache_compile as dbc

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = load_model(None, args.random_weights, device, dtype, args.steps, args.height, args.width, seed=0)
    pipe = model.pipe
    dbc.optimize(pipe, cache=args.config, mode=args.mode, graph=graph, quantize=quantize, fuse_qkv=fuse_qkv,
                 attention=args.attention)
    transformer = pipe.transformer
    runtime = transformer._dbcache_compile
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def generation(i: int) -> float:
        sync()
        start = time.perf_counter()
        pipe(**model.make_inputs(i, ""))
        sync()
        return time.perf_counter() - start

    first = generation(0)
    walls = [generation(i) for i in range(1, 1 + args.repeats)]

    # per-call timing of one more generation
    forward = transformer.forward
    calls: list[tuple[float, float]] = []

    def timed_forward(*a: Any, **k: Any) -> Any:
        sync()
        start = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        out = forward(*a, **k)
        if cuda:
            end.record()
        sync()
        wall = time.perf_counter() - start
        calls.append((wall, begin.elapsed_time(end) / 1e3 if cuda else float("nan")))
        return out

    transformer.forward = timed_forward
    try:
        pipe(**model.make_inputs(0, ""))
    finally:
        transformer.forward = forward
    summary = dbc.summary(pipe)
    per_step = 2 if summary.separate_cfg else 1  # with separate CFG, call 2k+1 is step k's unconditional branch
    hits = [set(summary.cached_steps), set(summary.cfg_cached_steps)]
    is_hit = [i // per_step in hits[i % per_step] for i in range(len(calls))]
    ms = lambda xs: round(1e3 * statistics.median(xs), 3) if xs else None  # noqa: E731
    miss = [c for c, h in zip(calls, is_hit) if not h]
    hit = [c for c, h in zip(calls, is_hit) if h]
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
        "miss_gpu_ms": ms([g for _, g in miss]) if cuda else None, "hit_gpu_ms": ms([g for _, g in hit]) if cuda else None,
        "graph_ms": graph_ms or None, "cached_calls": sum(is_hit), "calls": len(calls),
        "cudagraphs": summary.cudagraphs, "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__.split("\n")[0])
    parser.add_argument("--random-weights", default="flux", help="flux | flux-narrow | flux-tiny | qwen-image")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--graphs", default="regional,segments", help="comma-separated lowerings")
    parser.add_argument("--quantize", default="none", help="comma-separated: none, fp8, int8, ...")
    parser.add_argument("--fuse-qkv", default="off", help="comma-separated: off, on (diffusers fuse_qkv_projections)")
    parser.add_argument("--mode", default="max-autotune")
    parser.add_argument("--attention", default=None,
                        help="optimize(attention=...): 'auto' (cuDNN SDPA on Hopper) or a diffusers backend name "
                             "(default: leave the model's)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="steady generations after the first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: model-height-device)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: "graph:quantize:fuse"
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.one is not None:
        graph, quantize, fuse = args.one.split(":")
        result = _variant(args, graph, None if quantize == "none" else quantize, fuse == "on")
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    child_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    variants = [(g, q, f) for g in args.graphs.split(",") for q in args.quantize.split(",")
                for f in args.fuse_qkv.split(",")]
    for graph, quantize, fuse in variants:
        cache_dir = tempfile.mkdtemp(prefix="dbc_steps_inductor_")
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
        print(f"[bench.steps] {graph} / quantize={quantize} / fuse_qkv={fuse} (fresh Inductor cache "
              f"{cache_dir})", flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "bench.steps", *child_args, "--one",
                                   f"{graph}:{quantize}:{fuse}"], env=env, capture_output=True, text=True,
                                  timeout=args.timeout, cwd=Path(__file__).resolve().parent.parent)
            result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                          None)
            if result is None:
                result = {"graph": graph, "quantize": quantize, "fuse_qkv": fuse == "on",
                          "error": done.stderr.strip()[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"graph": graph, "quantize": quantize, "fuse_qkv": fuse == "on",
                      "error": f"timed out after {args.timeout} s"}
        print(json.dumps(result), flush=True)
        rows.append(result)
    props = torch.cuda.get_device_properties(0) if device == "cuda" else None
    meta = {
        "date": time.strftime("%F %H:%M"), "torch": torch.__version__,
        "device": props.name if props else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": args.random_weights, "resolution": f"{args.height}x{args.width}", "steps": args.steps,
        "config": args.config, "mode": args.mode, "dtype": args.dtype, "attention": args.attention,
        "command": "python -m bench.steps " + " ".join(child_args), "rows": rows,
    }
    tag = args.tag or f"{args.random_weights}-{args.height}-{device}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"steps_{tag}.json").write_text(json.dumps(meta, indent=2) + "\n")
    cols = ["graph", "quantize", "fuse_qkv", "first_call_s", "compile_s", "steady_call_s", "miss_ms", "hit_ms", "miss_gpu_ms",
            "hit_gpu_ms", "graph_ms", "cached_calls", "graph_breaks", "cudagraph_skips", "cudagraphs"]
    lines = [f"# Compile and step times: {meta['model']} {meta['resolution']}, {args.steps} steps ({meta['device']})",
             "", f"Finished {meta['date']} (UTC), torch {meta['torch']}, mode {args.mode}, {args.dtype}, config {args.config}. "
             f"Command: `{meta['command']}`. Each row is a fresh process with an empty Inductor cache.", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['graph']} | {row['quantize']} | {row['fuse_qkv']} | failed: "
                         f"{row['error'][-300:]!r} |")
        else:
            lines.append("| " + " | ".join("n/a" if row.get(c) is None else str(row.get(c)) for c in cols) + " |")
    (args.out / f"steps_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
