"""The DBCache decision as pure functions of counters and tensors.

Every function here works on Python ints (the host-side counters of the eager and ``segments`` lowerings) and on
0-dim tensors (the device-side counters of the ``cond`` lowering) alike, so the compiled graphs reuse the same
definition; the config's own numbers (:class:`Gates`) may be host values or device tensors too, so that a graph
need not bake them in. :func:`read_decision_sync` is the one place that turns a predicate into a Python bool.

Semantics follow cache-dit 1.5.3 (``CachedContextManager.can_cache`` / ``similarity``): gates in order warmup →
steps mask → ``max_cached_steps`` → ``max_continuous_cached_steps`` → threshold ``<= 0`` → no previous residual →
threshold ``>= 1`` (hit, no diff) → relative L1 diff ``< threshold``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch

from .config import DBCacheConfig

__all__ = ["Gates", "gates_of", "gate_tensors", "warmup_steps", "cache_allowed", "relative_l1", "hit_predicate",
           "recorded_diff", "read_decision_sync", "DIFF_NOT_COMPUTED", "DIFF_ALWAYS_HIT"]

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


class Gates(NamedTuple):
    """The numbers a config's gates read: host values (:func:`gates_of`: the eager, ``segments`` and ``regional``
    lowerings, and constants of an exported graph) or device tensors (:func:`gate_tensors`: inputs of the ``cond``
    graph, so that :meth:`~dbcache_compile.runtime.BranchedRuntime.reconfigure` swaps them without a recompile).

    On the device every number is a one-element vector (float64 threshold, int64 counts): torch 2.13 traces a 0-dim
    CPU tensor input as a symbolic number, and a symbolic float makes Dynamo restart its analysis (a second trace).

    Attributes:
        threshold: ``residual_diff_threshold``.
        warmup_stop, warmup_interval: the warm-up set is ``range(0, warmup_stop, warmup_interval)``
            (:func:`warmup_steps`: ``W`` cut to the mask's leading run of 1s).
        max_cached, max_consecutive: ``max_cached_steps`` / ``max_continuous_cached_steps``, ``-1`` = unlimited.
        mask: ``steps_computation_mask`` as a tuple (empty: no mask) or, on the device, a bool vector of the mask
            followed by at least one ``False`` (steps past the mask are indexed there: no length is baked in).
    """

    threshold: Any
    warmup_stop: Any
    warmup_interval: Any
    max_cached: Any
    max_consecutive: Any
    mask: Any


def gates_of(config: DBCacheConfig) -> Gates:
    """The gate numbers of ``config`` as host values."""
    warm = warmup_steps(config)
    return Gates(config.residual_diff_threshold, warm.stop, warm.step, config.max_cached_steps,
                 config.max_continuous_cached_steps, config.steps_computation_mask or ())


def gate_tensors(config: DBCacheConfig, device: torch.device, out: Optional[Gates] = None) -> Gates:
    """The gate numbers of ``config`` as device tensors. With ``out`` (tensors made here before), they are filled in
    place (kernel launches, no host sync), so graphs that took ``out`` as inputs read the new values; only a mask of
    another length is a new tensor (mark its length dynamic where a graph must not specialize on it)."""
    host = gates_of(config)
    mask = torch.tensor([*host.mask, 0] + [0] * (1 - len(host.mask)), dtype=torch.bool)  # >= 2 entries: not 0/1
    if out is None:
        scalars = [torch.tensor([float(host.threshold)], dtype=torch.float64, device=device)]
        scalars += [torch.tensor([v], dtype=torch.int64, device=device) for v in host[1:5]]
        return Gates(*scalars, mask.to(device))
    for buf, value in zip(out[:5], host[:5]):
        buf.fill_(value)
    if out.mask.shape == mask.shape:
        out.mask.copy_(mask)
        return out
    return out._replace(mask=mask.to(device))


def _numbers(config: Union[DBCacheConfig, Gates]) -> Gates:
    """The gate numbers to compute with: a config's host values, or the device vectors read as 0-dim tensors."""
    if not isinstance(config, Gates):
        return gates_of(config)
    return Gates(*(v.reshape(()) if isinstance(v, torch.Tensor) else v for v in config[:5]), config.mask)


def _not(value: IntLike) -> IntLike:
    return ~value if isinstance(value, torch.Tensor) else not value


def _mask_forces(mask: Any, step: IntLike) -> IntLike:
    """Whether the steps mask forces ``step`` to compute. A device step indexes a device vector (the host mask becomes
    a constant one, e.g. in an exported graph) with ``index_select``: no host read, no specialization on the step."""
    if isinstance(step, torch.Tensor) or isinstance(mask, torch.Tensor):
        if not isinstance(mask, torch.Tensor):
            mask = torch.tensor([*mask, 0], dtype=torch.bool, device=step.device)
        index = torch.clamp(torch.as_tensor(step, device=mask.device), min=0, max=mask.shape[0] - 1)
        return mask.index_select(0, index.reshape(1)).reshape(()) != 0
    return step < len(mask) and mask[step] == 1


def cache_allowed(config: Union[DBCacheConfig, Gates], step: IntLike, cached_count: IntLike, consecutive: IntLike,
                  has_prev: IntLike) -> IntLike:
    """All gates that do not need the residual diff.

    Args:
        config: the config, or its :class:`Gates` (host values or device tensors).
        step: denoising step index of this call (per CFG branch: both calls of a step share it).
        cached_count: cached steps so far in this generation and branch.
        consecutive: cached steps in a row right before this step (0 if the previous step computed).
        has_prev: whether a previous Fn residual exists in this branch.

    Returns a Python bool when everything is a host value, else a bool tensor.
    """
    gates = _numbers(config)
    in_warmup = (step < gates.warmup_stop) & (step % gates.warmup_interval == 0)
    allowed = _not(in_warmup) & _not(_mask_forces(gates.mask, step)) & (gates.threshold > 0.0)
    allowed = allowed & ((gates.max_cached < 0) | (cached_count < gates.max_cached))
    allowed = allowed & ((gates.max_consecutive < 0) | (consecutive < gates.max_consecutive))
    return allowed & (has_prev != 0) if isinstance(has_prev, torch.Tensor) else allowed & bool(has_prev)


def relative_l1(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """``mean(|prev - cur|) / mean(|prev|)`` over all elements, batch included, in the inputs' dtype (0-dim)."""
    return (prev - cur).abs().mean() / prev.abs().mean()


def hit_predicate(config: Union[DBCacheConfig, Gates], allowed: IntLike, diff: torch.Tensor) -> torch.Tensor:
    """Combine the gates with the diff: a 0-dim bool tensor, True = use the cache.

    The comparison runs in float64 against the threshold, as cache-dit compares ``diff.item()``; a threshold ``>= 1``
    hits without looking at the diff (even NaN).
    """
    threshold = _numbers(config).threshold if isinstance(config, Gates) else config.residual_diff_threshold
    return ((diff.to(torch.float64) < threshold) | (threshold >= 1.0)) & allowed


def recorded_diff(gates: Gates, allowed: IntLike, diff: torch.Tensor) -> torch.Tensor:
    """The diff a device-side record keeps (``cond``, packages): :data:`DIFF_ALWAYS_HIT` where the threshold is
    ``>= 1`` (cache-dit records -1.0), :data:`DIFF_NOT_COMPUTED` where the gates forced a compute."""
    always = _numbers(gates).threshold >= 1.0
    if isinstance(always, torch.Tensor):
        diff = torch.where(always, torch.full_like(diff, DIFF_ALWAYS_HIT), diff)
    elif always:
        diff = torch.full_like(diff, DIFF_ALWAYS_HIT)
    return torch.where(allowed, diff, torch.full_like(diff, DIFF_NOT_COMPUTED))


def read_decision_sync(pred: torch.Tensor, diff: torch.Tensor) -> tuple[bool, float]:
    """Copy the predicate and the diff to the host in ONE device-to-host transfer (a sync on CUDA)."""
    both = torch.stack([pred.to(torch.float64), diff.to(torch.float64)]).tolist()
    return bool(both[0]), float(both[1])
