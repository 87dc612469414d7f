"""The DBCache decision as pure functions of counters and tensors.

Every function here works on Python ints (the host-side counters of the eager and ``segments`` lowerings) and on
0-dim tensors (the device-side counters of the ``cond`` lowering) alike, so the compiled graphs reuse the same
definition. :func:`read_decision_sync` is the one place that turns a predicate into a Python bool.

Semantics follow cache-dit 1.5.3 (``CachedContextManager.can_cache`` / ``similarity``): gates in order warmup →
steps mask → ``max_cached_steps`` → ``max_continuous_cached_steps`` → threshold ``<= 0`` → no previous residual →
threshold ``>= 1`` (hit, no diff) → relative L1 diff ``< threshold``.
"""

from __future__ import annotations

from typing import Union

import torch

from .config import DBCacheConfig

__all__ = ["warmup_steps", "cache_allowed", "relative_l1", "hit_predicate", "read_decision_sync",
           "DIFF_NOT_COMPUTED", "DIFF_ALWAYS_HIT"]

IntLike = Union[int, torch.Tensor]

#: cache-dit records these pseudo-diffs: -1.0 when the threshold is >= 1 (hit without a diff).
DIFF_ALWAYS_HIT = -1.0
#: marker for "gates forced compute, no diff computed" in device-side diff records.
DIFF_NOT_COMPUTED = float("nan")


def warmup_steps(config: DBCacheConfig) -> range:
    """The warmup set ``range(0, W, I)``, truncated to the leading run of 1s of the steps mask (as cache-dit)."""
    limit = config.max_warmup_steps
    mask = config.steps_computation_mask
    if mask is not None:
        leading = 0
        for m in mask:
            if m != 1:
                break
            leading += 1
        limit = min(limit, leading)
    return range(0, limit, config.warmup_interval)


def cache_allowed(config: DBCacheConfig, step: IntLike, cached_count: IntLike, consecutive: IntLike,
                  has_prev: IntLike) -> IntLike:
    """All gates that do not need the residual diff.

    Args:
        step: denoising step index of this call (per CFG branch: both calls of a step share it).
        cached_count: cached steps so far in this generation and branch.
        consecutive: cached steps in a row right before this step (0 if the previous step computed).
        has_prev: whether a previous Fn residual exists in this branch.

    Returns a Python bool for int inputs, a bool tensor for tensor inputs.
    """
    if config.residual_diff_threshold <= 0.0:
        return step != step  # always False, same type as the inputs
    warm = warmup_steps(config)
    in_warmup = (step < warm.stop) & (step % warm.step == 0) if len(warm) else step != step
    allowed = ~in_warmup if isinstance(in_warmup, torch.Tensor) else not in_warmup
    mask = config.steps_computation_mask
    if mask is not None:
        if isinstance(step, torch.Tensor):
            mask_t = torch.tensor(list(mask) + [0], dtype=torch.bool, device=step.device)
            forced = mask_t[torch.clamp(step, max=len(mask))]
        else:
            forced = step < len(mask) and mask[step] == 1
        allowed = allowed & ~forced if isinstance(forced, torch.Tensor) else allowed and not forced
    if config.max_cached_steps >= 0:
        allowed = allowed & (cached_count < config.max_cached_steps)
    if config.max_continuous_cached_steps >= 0:
        allowed = allowed & (consecutive < config.max_continuous_cached_steps)
    return allowed & (has_prev != 0) if isinstance(has_prev, torch.Tensor) else allowed and bool(has_prev)


def relative_l1(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """``mean(|prev - cur|) / mean(|prev|)`` over all elements, batch included, in the inputs' dtype (0-dim)."""
    return (prev - cur).abs().mean() / prev.abs().mean()


def hit_predicate(config: DBCacheConfig, allowed: IntLike, diff: torch.Tensor) -> torch.Tensor:
    """Combine the gates with the diff: a 0-dim bool tensor, True = use the cache.

    The comparison runs in float64 against the Python threshold, as cache-dit compares ``diff.item()``.
    """
    if config.residual_diff_threshold >= 1.0:
        hit = torch.ones((), dtype=torch.bool, device=diff.device)
    else:
        hit = diff.to(torch.float64) < config.residual_diff_threshold
    return hit & allowed


def read_decision_sync(pred: torch.Tensor, diff: torch.Tensor) -> tuple[bool, float]:
    """Copy the predicate and the diff to the host in ONE device-to-host transfer (a sync on CUDA)."""
    both = torch.stack([pred.to(torch.float64), diff.to(torch.float64)]).tolist()
    return bool(both[0]), float(both[1])
