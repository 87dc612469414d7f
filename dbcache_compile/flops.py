"""FLOPs of cached and uncached transformer forwards, counted with calflops (as the seed's tables do).

calflops counts ``nn.Module`` and ``torch.nn.functional`` FLOPs per module during one real forward. Blocks are
counted individually, so the FLOPs of a cached step (everything but the skipped middle blocks) follow from one
uncached forward. Note: calflops does not count ``F.scaled_dot_product_attention``; the attention matmuls are
missing from both sides of the ratio, which slightly favours caching when attention dominates (long sequences).
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import adapter_for
from .stats import CacheSummary

__all__ = ["forward_flops", "flop_ratio"]


def forward_flops(transformer: torch.nn.Module, example_kwargs: dict[str, Any]) -> tuple[int, list[int]]:
    """(total FLOPs of one uncached forward, FLOPs of each block in cache-chain order) for ``example_kwargs``."""
    from calflops.calculate_pipline import CalFlopsPipline
    from calflops.utils import get_module_flops

    blocks = adapter_for(transformer).blocks(transformer)
    pipeline = CalFlopsPipline(model=transformer, include_backPropagation=False, compute_bp_factor=2.0)
    pipeline.start_flops_calculate()
    try:
        with torch.no_grad():
            type(transformer).forward(transformer, **example_kwargs)
        total = pipeline.get_total_flops()
        per_block = [get_module_flops(block) for block in blocks]
    finally:
        pipeline.end_flops_calculate()
    return int(total), [int(f) for f in per_block]


def flop_ratio(transformer: torch.nn.Module, summary: CacheSummary, example_kwargs: dict[str, Any]) -> float:
    """Uncached FLOPs / executed FLOPs of the generation ``summary`` describes (the seed's "SpeedUp" column)."""
    total, per_block = forward_flops(transformer, example_kwargs)
    skipped = sum(per_block[summary.Fn:len(per_block) - summary.Bn])
    branches = 2 if summary.separate_cfg else 1
    calls = summary.num_steps * branches
    hits = len(summary.cached_steps) + len(summary.cfg_cached_steps)
    return calls * total / (calls * total - hits * skipped)
