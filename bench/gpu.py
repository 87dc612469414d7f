"""``python -m bench gpu``: the whole GPU proof in one command of at most 9 minutes (one lent H100 / H200 call).

    python -m bench gpu --out $OUT             # on the GPU machine (bash bench/gpu_suite.sh quick does the same,
                                               # installing carried wheels first)
    python -m bench gpu --dry-run --out DIR    # on a CPU: same parts, same files, tiny sizes (the test suite runs it)

Parts, in this order, each a child process with its own time cap and a hard kill (its whole process group) at the
cap, so a hang cannot eat the parts after it; a part starts only if the total budget (``--budget``, 540 s) still
holds its minimum:

1. ``tests``: the CUDA tests that matter most (tiny models, ``reduce-overhead``): hand-captured regional graphs and
   cudagraph-tree segments replayed with images equal to eager, exactly one host read per free step
   (``torch.cuda.set_sync_debug_mode``), the uncached baseline as one captured graph, fp8 with regional, and the
   clear error of a capture that synchronizes.
2. ``e2e-1024``: FLUX.1-dev architecture (random weights, bf16), 1024², 50 steps, ``F1B0_W4MC6_R1.0`` (a forced
   schedule: 40 of 50 steps cached), whole pipeline wall including the VAE decode, median of 3 after one warm-up
   call, all rows in one process and one table: ours + fp8, cache-dit 1.5.3 + regional compile + fp8 (its best
   stack), ours bf16, uncached bf16 (ours, regional + one CUDA graph). The key comparison runs first.
3. ``e2e-512``: the same four rows at 512².
4. ``fp8-shift`` and ``fuse-qkv`` (only if time is left): the fp8 threshold shift on the tiny FLUX
   (``python -m bench threshold-shift``), and fused QKV projections on/off at 1024² (``python -m bench steps``).

Parts 2 and 3 are ``python -m bench run`` command lines; :func:`bench.measure.run_child` runs every part.

Compiled rows use ``--compile-mode reduce-overhead`` (Inductor's default kernels, our hand-captured CUDA graphs):
max-autotune's kernel search on the FLUX-size blocks does not fit the budget, and cache-dit's regional compile uses
Inductor's default mode too, so kernels are alike and the rows differ in what each library does around them.

Everything lands in ``--out``: one log per part, each bench part's ``results.md`` / ``results.json``, and
``summary.md`` / ``summary.json`` with pass/fail per part and the two ratios that matter (ours + fp8 vs cache-dit's
best stack at 1024² and at 512²; targets: >= 1.24x at 1024², i.e. <= 1.0 s where cache-dit's stack measured 1.24 s
on an H100, and >= 2x at 512²).

``--dry-run`` runs the same parts on a CPU with the tiny FLUX (32² and 16², 8 steps, 1 prompt, one torch thread),
``compile+int8`` in place of fp8 (fp8 needs SM >= 8.9) and ``TORCHDYNAMO_DISABLE=1`` in the children (torch.compile
runs the functions eagerly: the dry run checks the driver, the rows, attach/detach, quantization and the files; the
compiled paths have their own tests). The CUDA tests are collected and skip with their printed reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .measure import run_child
from .report import ROOT, markdown_table, metadata, write_report

__all__ = ["Part", "plan", "configure", "validate", "execute", "TARGETS"]

#: (resolution, minimum speedup of ours + fp8 over cache-dit's best stack). 1.24x at 1024² is 1.0 s where
#: cache-dit + regional compile + fp8 measured 1.24 s per image on an H100 (F1B0_W4MC6, 50 steps).
TARGETS = {1024: 1.24, 512: 2.0}
CONFIG = "F1B0_W4MC6_R1.0"
#: The CUDA tests of part 1 (test_quantize first: a failed capture may leave the CUDA context unusable for later
#: tests in the process, and the capture-failure test runs last in test_cudagraphs.py).
CUDA_TESTS = ["tests/test_quantize.py::test_fp8_compiled_on_gpu[regional]", "tests/test_cudagraphs.py",
              "-k", "cuda or fp8 or host_sync"]


@dataclasses.dataclass
class Part:
    """One child process: ``name``, its argv, the seconds it may run (``cap``) and the least it needs to start."""

    name: str
    argv: list[str]
    cap: float
    minimum: float
    optional: bool = False
    side: Optional[int] = None  # e2e parts: the image side in pixels
    status: str = "not run"  # pass | fail (rc N) | timeout | skipped (...)
    seconds: Optional[float] = None


def _bench_rows(quant: str) -> str:
    return f"ours:compile+{quant},cache-dit:compile+{quant},ours:compile,uncached:compile"


def plan(out: Path, dry_run: bool) -> list[Part]:
    """The parts, in run order."""
    py = [sys.executable]
    bench = py + ["-m", "bench"]
    tests = py + ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
    if dry_run:
        # one torch thread: on a small shared CPU, OpenMP threads competing with other processes slow tiny models
        model, sides, steps, prompts, quant = "flux-tiny", (32, 16), 8, 1, "int8"
        device = ["--device", "cpu", "--threads", "1"]
        caps = {"tests": 120.0, 32: 150.0, 16: 150.0}
    else:
        model, sides, steps, prompts, quant, device = "flux", (1024, 512), 50, 3, "fp8", []
        caps = {"tests": 130.0, 1024: 250.0, 512: 160.0}
    parts = [Part("tests", tests, caps["tests"], 30.0)]
    for side in sides:
        name = f"e2e-{1024 if side == sides[0] else 512}"
        parts.append(Part(name, bench + ["run", "--random-weights", model, "--height", str(side), "--width",
                                         str(side), "--steps", str(steps), "--num-prompts", str(prompts),
                                         "--configs", CONFIG, "--rows", _bench_rows(quant), "--compile-mode",
                                         "reduce-overhead", "--graph", "regional", *device, "--out", str(out / name)],
                          caps[side], 60.0 if not dry_run else 10.0, side=side))
    shift = bench + ["threshold-shift", "--model", "flux-tiny", "--out", str(out / "extras")]
    shift += (["--quantize", "int8"] if dry_run else ["--quantize", "fp8", "--device", "cuda", "--dtype", "bf16"])
    parts.append(Part("fp8-shift", shift, 60.0, 30.0, optional=True))
    if not dry_run:  # two fresh FLUX-size compiles: only when a rerun budget is left over
        parts.append(Part("fuse-qkv", bench + ["steps", "--random-weights", "flux", "--height", "1024", "--width",
                                               "1024", "--steps", "50", "--graphs", "regional", "--quantize", "fp8",
                                               "--fuse-qkv", "off,on", "--mode", "reduce-overhead", "--repeats", "2",
                                               "--timeout", "100", "--out", str(out / "extras")],
                          220.0, 200.0, optional=True))
    return parts


def _run_part(part: Part, out: Path, env: dict[str, str], cap: float) -> None:
    print(f"\n=== {part.name} (cap {cap:.0f} s): {shlex.join(part.argv)}", flush=True)
    child = run_child(part.argv, cap=cap, env=env, cwd=ROOT, log=out / f"{part.name}.log", echo=part.name)
    part.seconds = child.seconds
    part.status = "timeout" if child.timed_out else ("pass" if child.returncode == 0 else
                                                     f"fail (rc {child.returncode})")
    print(f"=== {part.name}: {part.status} in {part.seconds:.0f} s", flush=True)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())["rows"]


def _wall(rows: list[dict[str, Any]], method: str, mode: str) -> Optional[float]:
    for r in rows:
        if r["method"] == method and r["mode"] == mode and r["status"] == "ok":
            return r["wall_s_median"]
    return None


def summarize(parts: list[Part], out: Path, meta: dict[str, Any], quant: str) -> dict[str, Any]:
    """Write summary.md / summary.json: parts, the e2e tables, the two ratios."""
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    body = [f"Budget {meta['budget']:.0f} s, used {meta['used']:.0f} s.", "",
            *markdown_table(["part", "status", "seconds", "cap"],
                            [[p.name, p.status, fmt(p.seconds, 0), f"{p.cap:.0f}"] for p in parts])]
    ratios: dict[str, Any] = {}
    for part in parts:
        if not part.name.startswith("e2e-"):
            continue
        rows = _rows(out / part.name / "results.json")
        side = int(part.name.split("-")[1])
        table = []
        for r in rows:
            calls = r["per_prompt"]["calls"]
            cached = f"{r['per_prompt']['cached_calls'][0]}/{calls[0]}" if calls else "n/a"
            speedup = None if r["speedup_measured"] is None else f"{r['speedup_measured']:.2f}x"
            table.append([r["label"], r["mode"], fmt(r["wall_s_median"]), speedup,
                          fmt(r["compile_s"], 1), cached,
                          r["status"] + (f": {r['reason'][:120]}" if r["reason"] else "")])
        body += ["", f"## {part.name}: {CONFIG}, {part.side}² (see {part.name}/results.md)", "",
                 *markdown_table(["row", "mode", "wall s/img (median)", "vs uncached", "compile s", "cached steps",
                                  "status"], table)]
        ours, peer = _wall(rows, "ours", f"compile+{quant}"), _wall(rows, "cache-dit", f"compile+{quant}")
        ratio = peer / ours if ours and peer else None
        target = TARGETS.get(side)
        ratios[part.name] = {"ours_s": ours, "cache_dit_s": peer, "ratio": ratio, "target": target,
                             "met": None if ratio is None or meta["dry_run"] else ratio >= target}
    table = [[f"{name[4:]}²", fmt(r["ours_s"]), fmt(r["cache_dit_s"]),
              "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x", f">= {r['target']}x",
              "n/a" if r["met"] is None else ("yes" if r["met"] else "no")] for name, r in ratios.items()]
    body += ["", f"## Ours + {quant} vs cache-dit + regional compile + {quant}", "",
             *markdown_table(["resolution", "ours s/img", "cache-dit s/img", "ratio", "target", "met"], table)]
    if meta["dry_run"]:
        body += ["", "Dry run: tiny model on a CPU with TorchDynamo disabled; the numbers only prove the script runs."]
    data = {"parts": [dataclasses.asdict(p) for p in parts], "ratios": ratios}
    md, _ = write_report(out / "summary", f"GPU proof ({'dry run, CPU' if meta['dry_run'] else 'one call'})", meta,
                         body, data)
    print("\n" + md.read_text(), flush=True)
    return {"meta": meta, **data}


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench gpu``."""
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu")),
                        help="output directory (default: $OUT, else out/gpu)")
    parser.add_argument("--budget", type=float, default=540.0, help="total seconds for all parts (default: 540)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of the parts to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, same parts and files")


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A GPU unless ``--dry-run``; ``--parts`` from the plan."""
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --dry-run on a CPU")
    names = [p.name for p in plan(args.out, args.dry_run)]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    unknown = set(args.parts or []) - set(names)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {names}")


def execute(args: argparse.Namespace) -> int:
    """Run the parts within the budget, then the summary; 0 when every required part passed."""
    args.out.mkdir(parents=True, exist_ok=True)
    parts = plan(args.out, args.dry_run)
    if args.parts:
        parts = [p for p in parts if p.name in args.parts]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    if args.dry_run:
        env["TORCHDYNAMO_DISABLE"] = "1"
    started, clock = datetime.datetime.now().astimezone(), time.monotonic()
    for i, part in enumerate(parts):
        left = args.budget - (time.monotonic() - clock)
        # what the required parts after this one need at least
        reserve = sum(p.minimum for p in parts[i + 1:] if not p.optional)
        cap = min(part.cap, left - (0 if part.optional else reserve))
        if cap < part.minimum:
            part.status = f"skipped ({left:.0f} s of the budget left, needs {part.minimum:.0f} s)"
            print(f"=== {part.name}: {part.status}", flush=True)
            continue
        _run_part(part, args.out, env, cap)
    meta = {**metadata(args.command_line, "cpu" if args.dry_run else "cuda", started), "budget": args.budget,
            "used": time.monotonic() - clock, "dry_run": args.dry_run}
    summarize(parts, args.out, meta, "int8" if args.dry_run else "fp8")
    return 0 if all(p.status == "pass" for p in parts if not p.optional) else 1
