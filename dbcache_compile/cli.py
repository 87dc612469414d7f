"""Command line: ``python -m dbcache_compile demo --out DIR``, ``python -m dbcache_compile calibrate --model tiny
--min-psnr 35`` and ``python -m dbcache_compile warmup --model ... --compile-cache DIR`` (also the
``dbcache-compile`` console script).

The demo generates the same batch of digits with the embedded, really trained tiny FLUX-architecture model three
ways — uncached eager, cached eager, cached compiled — and prints what each costs and what it changes.

``calibrate`` runs :func:`dbcache_compile.calibrate` on the embedded model (even digits, two seeds), writes
``calibration.json`` and checks the recommended config on held-out calls (odd digits, two other seeds) next to the
hand-picked configs of the README and cache-dit's published FLUX configs, all measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from .warmup import add_warmup_parser, run_warmup

if TYPE_CHECKING:
    from .digits.demo import DigitSamples

DEFAULT_CONFIG = "F1B0_W4M0MC2_T0O1_R0.2"
#: hand-picked configs the calibrated one is compared with: the demo's default, the README's, cache-dit's FLUX ones
#: (README "Calibration" shows this table; tests/test_calibrate.py checks that the two agree)
HAND_PICKED = {
    DEFAULT_CONFIG: "demo default",
    "F1B0_W4MC6_R0.24": "README / cache-dit FLUX",
    "F1B0_W4MC2_R0.2": "README export",
    "F8B0_W8M0MC0_T0O1_R0.08": "README notation",
    "F8B0_W4MC0_R0.08": "cache-dit FLUX",
    "F4B0_W4MC3_R0.12": "cache-dit FLUX",
    "F4B0_W4MC4_R0.12": "cache-dit FLUX",
}
#: the held-out comparison with the hand-picked configs meeting the target: the calibrated config must execute fewer
#: FLOPs than each (a higher FLOP ratio: deterministic) and be no slower than any by more than this fraction of wall
#: clock. Wall speedups of a few seconds of CPU work on a shared machine are noisy: two configs caching the very
#: same 28 steps measured 1.92x and 1.53x in one run (bench/results/calibrate-cpu-2026-11-26). Whether it is
#: strictly faster on the wall clock is reported too.
WALL_TOLERANCE = 0.15
#: the tiny model's calibration workload (even digits) and held-out workload (odd digits, other seeds)
CALIBRATION_DIGITS, CALIBRATION_SEEDS = (0, 2, 4, 6, 8), (0, 1)
HELD_OUT_DIGITS, HELD_OUT_SEEDS = (1, 3, 5, 7, 9), (100, 101)


@dataclass
class Variant:
    """One row of the demo table (``report.json`` holds every field but ``samples``)."""

    name: str
    mode: Optional[str]
    seconds: float
    compile_seconds: Optional[float]
    cached_steps: list[int]
    flop_ratio: Optional[float]
    psnr: Optional[float]
    accuracy: float
    samples: "DigitSamples"

    @property
    def images(self) -> np.ndarray:
        """float32 (N, 16, 16) in [0, 1]."""
        return self.samples.images


def run_demo(out: Path, config: str = DEFAULT_CONFIG, steps: int = 20, mode: str = "default", graph: str = "auto",
             per_class: int = 4, seed: int = 0, progress: bool = True) -> list[Variant]:
    """Generate ``per_class`` digits of each class three ways and write ``grid.png``, ``report.json`` and
    ``samples.npz`` to ``out``. Returns the measured variants (uncached eager, cached eager, cached compiled)."""
    import torch

    import dbcache_compile as dbc
    from .digits import load_digits_pipeline
    from .digits.demo import balanced_labels, generate_digits, image_grid
    from .export import capture_transformer_inputs
    from .flops import flop_ratio
    from .metrics import psnr

    out.mkdir(parents=True, exist_ok=True)
    pipe = load_digits_pipeline()
    kwargs = dict(per_class=per_class, num_inference_steps=steps, seed=seed, progress=False)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    example = capture_transformer_inputs(pipe, labels=balanced_labels(per_class), progress=False)
    variants: list[Variant] = []

    def measure(name: str, compiled_mode: Optional[str]) -> None:
        compile_seconds = None
        log(f"  {name}: " + ("compiling (first call; tens of seconds on CPU) ..." if compiled_mode else "running ..."))
        if compiled_mode is not None:
            start = time.perf_counter()
            generate_digits(pipe, **kwargs)  # warm-up: compiles the graphs
            compile_seconds = time.perf_counter() - start
        samples = generate_digits(pipe, **kwargs)
        summary = dbc.summary(pipe) if name != "uncached eager" else None
        reference = variants[0].images if variants else samples.images
        variants.append(Variant(
            name=name, mode=compiled_mode, seconds=samples.seconds, compile_seconds=compile_seconds,
            cached_steps=summary.cached_steps if summary else [],
            flop_ratio=flop_ratio(pipe.transformer, summary, example) if summary else 1.0,
            psnr=float(psnr(samples.images, reference).mean()) if variants else None,
            accuracy=samples.accuracy, samples=samples))
        log(f"  {name}: {samples.seconds:.2f} s, {len(variants[-1].cached_steps)} cached steps")

    measure("uncached eager", None)
    dbc.optimize(pipe, cache=config)
    measure("cached eager", None)
    dbc.disable(pipe)
    dbc.optimize(pipe, cache=config, mode=mode, graph=graph)
    measure(f"cached compiled ({dbc.summary(pipe).lowering}, {mode})", mode)
    dbc.disable(pipe)

    labels = variants[0].samples.labels
    image_grid([(v.name, v.samples) for v in variants]).save(out / "grid.png")
    to_uint8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    np.savez(out / "samples.npz", labels=labels, uncached=to_uint8(variants[0].images),
             cached=to_uint8(variants[-1].images))
    report = {
        "config": config, "steps": steps, "images": int(len(labels)), "seed": seed, "date": time.strftime("%F"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "psnr": "dB against the uncached eager images, mean over the images ('inf': identical)",
        "variants": [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(var).items()
                      if k != "samples"} for var in variants],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return variants


def format_table(variants: list[Variant], config: str) -> str:
    """The table the demo prints: one line per variant (PSNR against the uncached row, mean over the images)."""
    rows = [("variant", "config", "wall s", "compile s", "cached steps", "FLOP ratio", "PSNR dB", "accuracy")]
    for v in variants:
        rows.append((v.name, "-" if v.name == "uncached eager" else config, f"{v.seconds:.2f}",
                     "-" if v.compile_seconds is None else f"{v.compile_seconds:.1f}",
                     f"{len(v.cached_steps)} {v.cached_steps}" if v.cached_steps else "0",
                     f"{v.flop_ratio:.2f}x", "-" if v.psnr is None else f"{v.psnr:.1f}", f"{v.accuracy:.0%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def digit_calls(digits: tuple[int, ...], seeds: tuple[int, ...], per_class: int, steps: int) -> list[dict]:
    """Pipeline calls of the digits model: one call per seed, ``per_class`` images of each digit."""
    import torch

    labels = [d for d in digits for _ in range(per_class)]
    return [dict(labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                 progress=False) for seed in seeds]


def run_calibration(out: Path, min_psnr: Optional[float] = None, speedup: Optional[float] = None, steps: int = 20,
                    per_class: int = 2, mode: Optional[str] = None, graph: str = "auto", quantize: Optional[str] = None,
                    budget: float = 10.0, validate: bool = True, progress: bool = True) -> dict:
    """Calibrate on the embedded digits model, write ``out`` (the calibration JSON, with a ``validation`` entry when
    ``validate``) and return what was written. The validation measures the recommended config and every hand-picked
    config that fits the 8-block model on held-out calls (other digits, other seeds), in one run."""
    import dbcache_compile as dbc
    from .calibrate import evaluate, format_table as format_rows
    from .config import DBCacheConfig
    from .digits import load_digits_pipeline

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    pipe = load_digits_pipeline()
    options = dict(mode=mode, graph=graph, progress=progress)
    log(f"calibrating on digits {CALIBRATION_DIGITS} x {per_class}, seeds {CALIBRATION_SEEDS}, {steps} steps ...")
    result = dbc.calibrate(pipe, digit_calls(CALIBRATION_DIGITS, CALIBRATION_SEEDS, per_class, steps),
                           min_psnr=min_psnr, speedup=speedup, quantize=quantize, budget=budget, **options)
    report = result.to_dict()
    report["printed"] = str(result)
    if validate:
        blocks = result.settings["num_blocks"]
        names: dict[str, DBCacheConfig] = {"calibrated": result.config}
        skipped = {}
        for text, source in HAND_PICKED.items():
            cfg = DBCacheConfig.from_string(text)
            if cfg.Fn_compute_blocks + cfg.Bn_compute_blocks >= blocks:
                skipped[text] = (f"{source}: Fn + Bn = {cfg.Fn_compute_blocks + cfg.Bn_compute_blocks} leaves no "
                                 f"middle block of the {blocks}-block model")
            elif cfg not in names.values():  # the README's export config is the demo default
                names[source if source not in names else f"{source} {text}"] = cfg
        log(f"checking on held-out digits {HELD_OUT_DIGITS} x {per_class}, seeds {HELD_OUT_SEEDS}: "
            f"{len(names)} configs ...")
        # no quantize here: calibrate left the weights quantized, the held-out runs use them as they are
        rows = evaluate(pipe, digit_calls(HELD_OUT_DIGITS, HELD_OUT_SEEDS, per_class, steps), names, **options)
        ours, hand = rows[0], rows[1:]
        checks = {}
        if min_psnr is not None:
            checks["min_psnr"] = {"target": min_psnr, "measured": ours.psnr, "met": ours.psnr >= min_psnr,
                                  "miss_db": max(0.0, min_psnr - ours.psnr)}
        if speedup is not None:
            checks["speedup"] = {"target": speedup, "measured": ours.speedup, "met": ours.speedup >= speedup,
                                 "miss_x": max(0.0, speedup - ours.speedup)}
        if min_psnr is not None:  # the fastest meeting the PSNR: faster than every hand-picked config meeting it
            rivals = [r for r in hand if r.psnr >= min_psnr]
            beats = all(ours.flop_ratio > r.flop_ratio and ours.speedup >= r.speedup * (1 - WALL_TOLERANCE)
                        for r in rivals)
        else:  # the best quality meeting the speedup: at least the PSNR of every hand-picked config meeting it
            rivals = [r for r in hand if r.speedup >= speedup]
            beats = all(ours.psnr >= r.psnr for r in rivals)
        report["validation"] = {
            "calls": f"digits {HELD_OUT_DIGITS} x {per_class} per call, seeds {HELD_OUT_SEEDS}, {steps} steps "
                     f"(calibrated on digits {CALIBRATION_DIGITS}, seeds {CALIBRATION_SEEDS})",
            "table": [r.to_dict() for r in rows], "checks": checks, "met": all(c["met"] for c in checks.values()),
            "hand_picked_meeting_target": [str(r.config) for r in rivals],
            "comparison": "faster" if min_psnr is not None else "higher or equal PSNR",
            # None: no hand-picked config meets the target, nothing to compare with
            "beats_hand_picked": beats if rivals else None,
            "rule": (f"higher FLOP ratio than each, wall speedup no more than {WALL_TOLERANCE:.0%} below any"
                     if min_psnr is not None else "PSNR at least each one's"),
            "faster_wall": all(ours.speedup > r.speedup for r in rivals) if rivals else None,
            "rivals": [{"config": str(r.config), "speedup": r.speedup, "flop_ratio": r.flop_ratio, "psnr": r.psnr}
                       for r in rivals],
            "skipped": skipped, "printed": format_rows(rows),
        }
    out.write_text(json.dumps(report, indent=2))
    return report


def format_validation(validation: dict) -> str:
    """The held-out part of the calibrate command's output."""
    lines = [f"held-out check: {validation['calls']}", validation["printed"], ""]
    for name, check in validation["checks"].items():
        if name == "min_psnr":
            verdict = ("meets it" if check["met"] else f"MISSES it by {check['miss_db']:.2f} dB")
            lines.append(f"min PSNR {check['target']:g} dB: calibrated config gives {check['measured']:.2f} dB on "
                         f"held-out calls: {verdict}")
        else:
            verdict = "meets it" if check["met"] else f"MISSES it by {check['miss_x']:.2f}x"
            lines.append(f"speedup {check['target']:g}x: calibrated config gives {check['measured']:.2f}x on "
                         f"held-out calls: {verdict}")
    rivals = validation["hand_picked_meeting_target"]
    if not rivals:
        lines.append("no hand-picked config meets the target: nothing to compare with")
    else:
        ours = validation["table"][0]
        lines.append(f"{validation['comparison']} than every hand-picked config meeting the target "
                     f"({', '.join(rivals)}; {validation['rule']}): "
                     f"{'yes' if validation['beats_hand_picked'] else 'NO'}")
        if validation["comparison"] == "faster":
            best = max(validation["rivals"], key=lambda r: r["speedup"])
            lines.append(f"  calibrated {ours['speedup']:.2f}x wall / {ours['flop_ratio']:.2f}x FLOPs; fastest of them "
                         f"{best['config']} {best['speedup']:.2f}x wall / {best['flop_ratio']:.2f}x FLOPs; strictly "
                         f"faster on the wall clock than each: {'yes' if validation['faster_wall'] else 'no'}")
    for text, why in validation["skipped"].items():
        lines.append(f"not compared: {text} ({why})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from .lowerings import GRAPHS, lowering_named

    parser = argparse.ArgumentParser(prog="python -m dbcache_compile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="cached vs uncached digits on the embedded model (CPU, ~1-3 min)")
    demo.add_argument("--out", type=Path, required=True, help="output folder (grid.png, report.json, samples.npz)")
    demo.add_argument("--config", default=DEFAULT_CONFIG, help=f"cache config (default {DEFAULT_CONFIG})")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    demo.add_argument("--mode", default="default", help="torch.compile mode of the compiled row (default 'default')")
    demo.add_argument("--graph", default="auto", choices=GRAPHS, help="compiled lowering")
    demo.add_argument("--per-class", type=int, default=4, help="digits per class (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    cal = sub.add_parser("calibrate", help="find the fastest config meeting a PSNR (or the best meeting a speedup) on "
                                           "the embedded model, check it on held-out digits (CPU, ~30 s); exit "
                                           "status 1 when a target is missed")
    cal.add_argument("--model", choices=("tiny",), default="tiny",
                     help="tiny: the embedded trained digits model (FLUX architecture, 8 blocks)")
    cal.add_argument("--min-psnr", type=float, help="fastest config whose worst-call PSNR meets this (dB)")
    cal.add_argument("--speedup", type=float, help="best-quality config whose measured speedup meets this (x); with "
                                                   "--min-psnr both must hold, and min PSNR wins when they conflict")
    cal.add_argument("--out", type=Path, default=Path("calibration.json"), help="result file (calibration.json)")
    cal.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    cal.add_argument("--per-class", type=int, default=2, help="digits per class per call (default 2)")
    cal.add_argument("--mode", default=None, help="torch.compile mode (default: eager)")
    # not a lowering that decides on the device: its graph holds the gates, which calibration swaps per candidate
    cal.add_argument("--graph", default="auto", help="compiled lowering",
                     choices=[g for g in GRAPHS if g == "auto" or not lowering_named(g).decides_on_device])
    cal.add_argument("--quantize", default=None, help="torchao quantization (int8, int8-wo, fp8-wo, ...)")
    cal.add_argument("--budget", type=float, default=10.0, help="uncached generations per call (default 10)")
    cal.add_argument("--no-validate", action="store_true", help="skip the held-out check")
    add_warmup_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "warmup":
        return run_warmup(parser, args)
    import torch

    # the tiny model runs fastest single-threaded; more threads only add synchronisation on 2-core machines
    torch.set_num_threads(1)
    from .config import DBCacheConfig
    from .optimize import COMPILE_MODES
    if args.command == "calibrate":
        if args.min_psnr is None and args.speedup is None:
            parser.error("calibrate needs --min-psnr and/or --speedup")
        if args.mode is not None and args.mode not in COMPILE_MODES[1:]:
            parser.error(f"--mode must be one of {COMPILE_MODES[1:]}")
        if args.steps < 2 or args.per_class < 1:
            parser.error("--steps must be >= 2 and --per-class >= 1")
        try:
            report = run_calibration(args.out, args.min_psnr, args.speedup, args.steps, args.per_class, args.mode,
                                     args.graph, args.quantize, args.budget, not args.no_validate)
        except ValueError as e:
            parser.error(str(e))
        print(report["printed"])
        if "validation" in report:
            print()
            print(format_validation(report["validation"]))
        print(f"\nwrote {args.out}: use it with dbcache_compile.optimize(pipe, cache={str(args.out)!r})")
        return 0 if report["met"] and report.get("validation", {}).get("met", True) else 1
    try:
        DBCacheConfig.from_string(args.config)
    except ValueError as e:
        parser.error(str(e))
    if args.mode not in COMPILE_MODES[1:]:
        parser.error(f"--mode must be one of {COMPILE_MODES[1:]}")
    print(f"dbcache_compile demo: {args.per_class * 10} digits, {args.steps} steps, config {args.config}; "
          f"the compiled row compiles first (tens of seconds on CPU)", file=sys.stderr)
    variants = run_demo(args.out, args.config, args.steps, args.mode, args.graph, args.per_class, args.seed)
    print(format_table(variants, args.config))
    print(f"\nwrote {args.out / 'grid.png'} (rows: {', '.join(v.name for v in variants)}), "
          f"{args.out / 'report.json'}, {args.out / 'samples.npz'}")
    return 0
