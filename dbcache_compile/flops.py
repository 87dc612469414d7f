"""FLOPs of cached and uncached transformer forwards, counted with calflops (as the seed's tables do).

calflops counts ``nn.Module`` and ``torch.nn.functional`` FLOPs per module during one real forward. Blocks are
counted individually, so the FLOPs of a cached step (everything but the skipped middle blocks) follow from one
uncached forward. calflops 0.3.2 does not count ``F.scaled_dot_product_attention`` (which the diffusers attention
processors call), so :func:`count_attention` adds the attention matmuls by hand, per block: ``2·B·H·Lq·Lk·(D + Dv)``
per call (``Q·Kᵀ`` and ``P·V``; softmax and scaling not counted) — a FLUX.1-dev forward at 1024² is then 74.39
TFLOPs, as cache-dit's tables count it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .adapters import adapter_for
from .stats import CacheSummary

__all__ = ["count_attention", "forward_flops", "flop_ratio"]


@contextlib.contextmanager
def count_attention() -> Iterator[list[int]]:
    """Count the FLOPs of every ``torch.nn.functional.scaled_dot_product_attention`` call in the block.

    Yields a one-element list holding the running total: ``2·B·H·Lq·Lk·(D + Dv)`` per call, with ``B·H`` the
    product of the query's leading dimensions.
    """
    total = [0]
    original = F.scaled_dot_product_attention

    def counting(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        batch_heads = math.prod(query.shape[:-2])
        lq, d = query.shape[-2:]
        total[0] += 2 * batch_heads * lq * key.shape[-2] * (d + value.shape[-1])
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        yield total
    finally:
        F.scaled_dot_product_attention = original


def forward_flops(transformer: torch.nn.Module, example_kwargs: dict[str, Any]) -> tuple[int, list[int]]:
    """(total FLOPs of one uncached forward, FLOPs of each block in cache-chain order) for ``example_kwargs``,
    attention included."""
    from calflops.calculate_pipline import CalFlopsPipline
    from calflops.utils import get_module_flops

    blocks = adapter_for(transformer).blocks(transformer)
    block_attention = [0] * len(blocks)
    pipeline = CalFlopsPipline(model=transformer, include_backPropagation=False, compute_bp_factor=2.0)
    pipeline.start_flops_calculate()
    hooks = []
    try:
        with torch.no_grad(), count_attention() as attention:
            for i, block in enumerate(blocks):
                start = [0]
                hooks.append(block.register_forward_pre_hook(lambda *_, s=start: s.__setitem__(0, attention[0])))
                hooks.append(block.register_forward_hook(
                    lambda *_, i=i, s=start: block_attention.__setitem__(i, block_attention[i] + attention[0] - s[0])))
            type(transformer).forward(transformer, **example_kwargs)
        total = pipeline.get_total_flops() + attention[0]
        per_block = [get_module_flops(block) + attn for block, attn in zip(blocks, block_attention)]
    finally:
        for hook in hooks:
            hook.remove()
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
