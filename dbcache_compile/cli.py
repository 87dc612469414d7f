"""Command line: ``python -m dbcache_compile demo --out DIR`` (also the ``dbcache-compile`` console script).

The demo generates the same batch of digits with the embedded, really trained tiny FLUX-architecture model three
ways — uncached eager, cached eager, cached compiled — and prints what each costs and what it changes.
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

if TYPE_CHECKING:
    from .digits.demo import DigitSamples

DEFAULT_CONFIG = "F1B0_W4M0MC2_T0O1_R0.2"


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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbcache_compile", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="cached vs uncached digits on the embedded model (CPU, ~1-3 min)")
    demo.add_argument("--out", type=Path, required=True, help="output folder (grid.png, report.json, samples.npz)")
    demo.add_argument("--config", default=DEFAULT_CONFIG, help=f"cache config (default {DEFAULT_CONFIG})")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    demo.add_argument("--mode", default="default", help="torch.compile mode of the compiled row (default 'default')")
    demo.add_argument("--graph", default="auto", choices=("auto", "regional", "segments", "cond"),
                      help="compiled lowering")
    demo.add_argument("--per-class", type=int, default=4, help="digits per class (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    # the tiny model runs fastest single-threaded; more threads only add synchronisation on 2-core machines
    torch.set_num_threads(1)
    from .config import DBCacheConfig
    from .optimize import COMPILE_MODES
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
