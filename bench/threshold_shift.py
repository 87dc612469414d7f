"""How quantization shifts the residual diffs that DBCache thresholds (peers report 0.08 → 0.12 for FLUX fp8).

    python -m bench threshold-shift --out bench/results [--model digits|flux-tiny] [--quantize int8]

Runs the same generation with a threshold that never caches (``R`` tiny, no warmup) so every step from 1 on records
its relative L1 diff, once in full precision and once quantized, and reports the per-step diffs, their ratio and the
threshold that keeps the same number of cached steps. Writes ``threshold_shift_<model>_<quantize>.md`` / ``.json``.

The generations run eagerly with the torchao config of the name applied directly (no device check): ``fp8-wo``
(fp8 weights, torchao's ``Float8WeightOnlyConfig``) runs on a CPU, so its rounding can be measured here; ``fp8``
(dynamic fp8 activations too) needs a GPU of compute capability >= 8.9.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Callable

NEVER_CACHE = "F1B0_W1M0MC0_T0O1_R1e-09"
STEPS = 20
THRESHOLDS = (0.05, 0.08, 0.12, 0.2, 0.3)


def _diffs(pipe: Any, call: Callable[[Any], Any], quantize: Any) -> list[float]:
    import dbcache_compile as dbc
    from dbcache_compile.quantize import named_config
    dbc.optimize(pipe, cache=NEVER_CACHE, quantize=None if quantize is None else named_config(quantize))
    call(pipe)
    diffs = dbc.summary(pipe).residual_diffs
    dbc.disable(pipe)
    return [diffs[k] for k in sorted(diffs)]


def _model(name: str, device: str, dtype: Any) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    import torch
    if name == "digits":
        from dbcache_compile.digits import load_digits_pipeline
        labels = [d for d in range(10) for _ in range(2)]
        return (lambda: load_digits_pipeline(device=device, torch_dtype=dtype),
                lambda p: p(labels, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                            progress=False))
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
    inputs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    return (lambda: tiny_flux_pipeline().to(device, dtype),
            lambda p: p(**inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)))


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of ``python -m bench threshold-shift``."""
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", default="digits", choices=("digits", "flux-tiny"))
    parser.add_argument("--quantize", default="int8", help="int8 | int8-wo | fp8-wo | fp8 (GPU, SM >= 8.9)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))


def execute(args: argparse.Namespace) -> int:
    """Both generations, the ratios, the threshold mapping, the report."""
    import torch

    from .report import markdown_table, metadata, write_report

    torch.set_num_threads(1)
    meta = metadata(args.command_line, args.device)
    build, call = _model(args.model, args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    full = _diffs(build(), call, None)
    quant = _diffs(build(), call, args.quantize)
    ratios = [q / f for f, q in zip(full, quant)]
    # for each full-precision threshold: the largest quantized diff among as many steps as it caches
    mapping = {}
    for r in THRESHOLDS:
        n = sum(d < r for d in full)
        mapping[r] = sorted(quant)[n - 1] if n else None
    median = statistics.median(ratios)
    meta.update({"model": args.model, "dtype": args.dtype, "quantize": args.quantize, "config": NEVER_CACHE,
                 "steps": STEPS})
    body = [f"{args.model}, {args.dtype}, {STEPS} steps, config {NEVER_CACHE} (never caches: every step's diff is "
            f"recorded), full precision vs {args.quantize}.", "",
            *markdown_table(["step", "diff full precision", "diff quantized", "ratio"],
                            [[i + 1, f"{f:.4f}", f"{q:.4f}", f"{q / f:.3f}"]
                             for i, (f, q) in enumerate(zip(full, quant))]),
            "", f"Median ratio quantized / full: {median:.3f}.", "",
            *markdown_table(["threshold (full precision)", "largest quantized diff among the steps it caches (a "
                             "quantized threshold just above caches as many)"],
                            [[k, "-" if v is None else f"{v:.4f}"] for k, v in mapping.items()])]
    md, _ = write_report(args.out / f"threshold_shift_{args.model}_{args.quantize}",
                         f"Residual-diff shift under {args.quantize} ({args.model}, {args.device}, {args.dtype})", meta,
                         body, {"diffs_full": full, "diffs_quantized": quant, "median_ratio": median,
                                "threshold_equivalents": {str(k): v for k, v in mapping.items()}})
    print(md.read_text())
    return 0
