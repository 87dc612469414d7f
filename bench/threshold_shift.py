"""How quantization shifts the residual diffs that DBCache thresholds (issue: 0.08 → 0.12 reported for FLUX fp8).

    python -m bench.threshold_shift --out bench/results [--model digits|flux-tiny] [--quantize int8]

Runs the same generation with a threshold that never caches (``R`` tiny, no warmup) so every step from 1 on records
its relative L1 diff, once in full precision and once quantized, and reports the per-step diffs, their ratio and the
threshold that keeps the same number of cached steps. Writes ``threshold_shift_<quantize>.md`` / ``.json``.

The generations run eagerly with the torchao config of the name applied directly (no device check): ``fp8-wo``
(fp8 weights, torchao's ``Float8WeightOnlyConfig``) runs on a CPU, so its rounding can be measured here; ``fp8``
(dynamic fp8 activations too) needs a GPU of compute capability >= 8.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

NEVER_CACHE = "F1B0_W1M0MC0_T0O1_R1e-09"


def _diffs(pipe, call, quantize):
    import dbcache_compile as dbc
    from dbcache_compile.quantize import named_config
    dbc.optimize(pipe, cache=NEVER_CACHE, quantize=None if quantize is None else named_config(quantize))
    call(pipe)
    diffs = dbc.summary(pipe).residual_diffs
    dbc.disable(pipe)
    return [diffs[k] for k in sorted(diffs)]


def _model(name: str, device: str, dtype: torch.dtype):
    if name == "digits":
        from dbcache_compile.digits import load_digits_pipeline
        labels = [d for d in range(10) for _ in range(2)]
        return (lambda: load_digits_pipeline(device=device, torch_dtype=dtype),
                lambda p: p(labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0), progress=False))
    from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline
    inputs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs().items()}
    return (lambda: tiny_flux_pipeline().to(device, dtype),
            lambda p: p(**inputs, num_inference_steps=20, generator=torch.Generator().manual_seed(0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threshold_shift", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", default="digits", choices=("digits", "flux-tiny"))
    parser.add_argument("--quantize", default="int8", help="int8 | int8-wo | fp8-wo | fp8 (GPU, SM >= 8.9)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = args.device
    build, call = _model(args.model, device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    full = _diffs(build(), call, None)
    quant = _diffs(build(), call, args.quantize)
    ratios = [q / f for f, q in zip(full, quant)]
    # threshold mapping: for each full-precision threshold, the quantized threshold caching the same steps
    mapping = {}
    for r in (0.05, 0.08, 0.12, 0.2, 0.3):
        n = sum(d < r for d in full)
        mapping[r] = sorted(quant)[n - 1] if n else None
    report = {"date": time.strftime("%F"), "torch": torch.__version__, "model": args.model, "device": device,
              "dtype": args.dtype,
              "quantize": args.quantize, "config": NEVER_CACHE, "steps": 20,
              "command": "python -m bench.threshold_shift " + " ".join(argv or sys.argv[1:]),
              "diffs_full": full, "diffs_quantized": quant, "median_ratio": statistics.median(ratios),
              "threshold_equivalents": {str(k): v for k, v in mapping.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"threshold_shift_{args.model}_{args.quantize}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Residual-diff shift under {args.quantize} ({args.model}, {device}, {args.dtype})", "",
             f"{report['date']}, torch {report['torch']}, command `{report['command']}`.", "",
             "| step | diff full precision | diff quantized | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {i + 1} | {f:.4f} | {q:.4f} | {q / f:.3f} |" for i, (f, q) in enumerate(zip(full, quant))]
    lines += ["", f"Median ratio quantized / full: {report['median_ratio']:.3f}.", "",
              "| threshold (full precision) | largest quantized diff among the steps it caches (a quantized threshold just above caches as many) |", "| --- | --- |"]
    lines += [f"| {k} | {'-' if v is None else f'{v:.4f}'} |" for k, v in mapping.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
