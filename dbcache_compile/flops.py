"""FLOPs of cached and uncached transformer forwards, counted with calflops (as the seed's tables do).

This is the one FLOP count of the project: the demo's FLOP ratio (:func:`flop_ratio`) and the benchmark's TFLOPs
column (``bench``) both come from here.

Two forwards are counted on the inputs the pipeline really passes to its transformer:

* a **full** forward (:func:`full_forward_flops`): the transformer's own ``forward`` (embeddings, every block, output
  projection);
* a **cached** forward of a split ``(Fn, Bn)`` (:func:`cached_forward_flops`): embeddings, the first ``Fn`` and the
  last ``Bn`` blocks and the output projection, built from the family's prologue ``embed`` / ``project``. What a cached
  step adds on top (the residual adds, the relative-L1 diff: element-wise, < 0.01 % of a block) is not counted.

calflops 0.3.2 patches ``F.linear``, ``torch.matmul``, norms and activations but not
``F.scaled_dot_product_attention``, which the diffusers attention processors call, so :func:`count_attention` adds
the attention matmuls by hand while calflops runs: ``2·B·H·Lq·Lk·(D + Dv)`` FLOPs per call (``Q·Kᵀ`` and
``P·V``; softmax and scaling not counted). A FLUX.1-dev forward at 1024² is then 74.39 TFLOPs (59.52 calflops + 14.87
attention), the count cache-dit's tables use. Both parts are kept apart in :class:`ForwardFlops`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .families import family_for
from .stats import CacheSummary

__all__ = ["ForwardFlops", "count_attention", "count_forward", "full_forward_flops", "cached_forward_flops",
           "generation_flops", "flop_ratio"]


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one transformer forward.

    Attributes:
        calflops: FLOPs counted by ``calflops.calculate_flops`` (linears, matmuls, norms, activations).
        attention: FLOPs of the ``scaled_dot_product_attention`` calls, counted by hand.
    """

    calflops: int
    attention: int

    @property
    def total(self) -> int:
        """calflops + attention, in FLOPs."""
        return self.calflops + self.attention


@contextlib.contextmanager
def count_attention() -> Iterator[list[int]]:
    """Count the FLOPs of every ``torch.nn.functional.scaled_dot_product_attention`` call inside the block.

    Yields a one-element list holding the running total: ``2·B·H·Lq·Lk·(D + Dv)`` per call, with ``B·H`` the
    product of the query's leading dimensions. The original function is restored on exit.
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


class _BoundCall(torch.nn.Module):
    """``fn(**tensors, **constants)`` as a module: calflops moves every keyword argument with ``.to(device)``, so
    only tensors may travel through it; the other arguments (``img_shapes`` lists, ``return_dict`` ...) are bound
    here."""

    def __init__(self, owner: torch.nn.Module, fn: Callable[..., Any], constants: dict[str, Any]) -> None:
        super().__init__()
        self.owner = owner
        self.fn = fn
        self.constants = constants

    def forward(self, **tensors: torch.Tensor) -> Any:
        return self.fn(**tensors, **self.constants)


def count_forward(owner: torch.nn.Module, fn: Callable[..., Any], kwargs: dict[str, Any]) -> ForwardFlops:
    """FLOPs of ``fn(**kwargs)``, whose parameters belong to ``owner``: calflops plus hand-counted attention."""
    import calflops

    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    module = _BoundCall(owner, fn, constants)
    # always the plain modules: a compiled region or graph would trace calflops' counting into its graph
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), count_attention() as attention:
        flops, _macs, _params = calflops.calculate_flops(model=module, kwargs=tensors, print_results=False,
                                                         output_as_string=False)
    return ForwardFlops(calflops=int(flops), attention=int(attention[0]))


def full_forward_flops(transformer: torch.nn.Module, kwargs: dict[str, Any]) -> ForwardFlops:
    """FLOPs of one uncached forward on the transformer keyword arguments ``kwargs`` (as the pipeline passes them;
    :func:`dbcache_compile.export.capture_transformer_inputs` records them). The model's own forward is counted, also
    while the transformer is optimized (the class ``forward``, past the cache's hook)."""
    return count_forward(transformer, type(transformer).forward.__get__(transformer), kwargs)


def cached_forward_flops(transformer: torch.nn.Module, kwargs: dict[str, Any], fn_blocks: int,
                         bn_blocks: int) -> ForwardFlops:
    """FLOPs of one cached step: embeddings + first ``fn_blocks`` + last ``bn_blocks`` blocks + output projection."""
    family = family_for(transformer)
    if not family.has_prologue:
        raise ValueError(f"{type(transformer).__name__} ({family.name}): the FLOP split needs a family that writes out "
                         f"its prologue")
    blocks = family.blocks(transformer)
    if fn_blocks < 0 or bn_blocks < 0 or fn_blocks + bn_blocks > len(blocks):
        raise ValueError(f"Fn + Bn = {fn_blocks} + {bn_blocks} does not fit the {len(blocks)} blocks of "
                         f"{type(transformer).__name__}")
    computed = blocks[:fn_blocks] + blocks[len(blocks) - bn_blocks:]

    def cached_step(**call_kwargs: Any) -> torch.Tensor:
        emb = family.embed(transformer, **call_kwargs)
        hidden, encoder = emb.hidden, emb.encoder
        for block in computed:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, **emb.block_kwargs)
        return family.project(transformer, hidden, emb.out_kwargs)

    return count_forward(transformer, cached_step, kwargs)


def generation_flops(full: ForwardFlops, cached: ForwardFlops, calls: int, cached_calls: int) -> int:
    """FLOPs of one generation: ``calls`` transformer forwards of which ``cached_calls`` were cached steps."""
    if not 0 <= cached_calls <= calls:
        raise ValueError(f"cached_calls must be in [0, calls={calls}], got {cached_calls}")
    return (calls - cached_calls) * full.total + cached_calls * cached.total


def flop_ratio(transformer: torch.nn.Module, summary: CacheSummary, example_kwargs: dict[str, Any]) -> float:
    """Uncached FLOPs / executed FLOPs of the generation ``summary`` describes (the seed's "SpeedUp" column), with
    both forwards counted on ``example_kwargs``."""
    full = full_forward_flops(transformer, example_kwargs)
    cached = cached_forward_flops(transformer, example_kwargs, summary.Fn, summary.Bn)
    branches = getattr(summary, "branches", None)  # per cache context: {"calls": n, "cached_steps": [...]}
    if branches:
        calls = sum(b["calls"] for b in branches.values())
        hits = sum(len(b["cached_steps"]) for b in branches.values())
    else:
        calls = summary.num_steps * (2 if summary.separate_cfg else 1)
        hits = len(summary.cached_steps) + len(summary.cfg_cached_steps)
    return calls * full.total / generation_flops(full, cached, calls, hits)
