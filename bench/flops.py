"""FLOPs of the transformer forwards a generation executes, counted with calflops.

Two forwards are counted on the inputs the pipeline really passes to its transformer (captured at the first call of
the reference row):

* a **full** forward: the transformer's own ``forward`` (embeddings, every block, output projection);
* a **cached** forward of a split ``(Fn, Bn)``: embeddings, the first ``Fn`` and last ``Bn`` blocks and the output
  projection, built from the library's model adapter. What a cached step adds on top (the residual adds, the
  relative-L1 diff: element-wise, < 0.01% of a block) is not counted.

calflops 0.3.2 patches ``F.linear``, ``torch.matmul``, norms and activations but not
``F.scaled_dot_product_attention``, which the diffusers attention processors call. The attention matmuls are added
by hand while calflops runs (:func:`dbcache_compile.flops.count_attention`: ``2·B·H·Lq·Lk·(D + Dv)`` FLOPs per call,
``Q·Kᵀ`` and ``P·V``; softmax and scaling not counted). Both parts are kept apart in :class:`ForwardFlops`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from dbcache_compile.adapters import adapter_for
from dbcache_compile.flops import count_attention

__all__ = ["ForwardFlops", "count_attention", "count_forward", "full_forward_flops", "cached_forward_flops",
           "generation_flops"]


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
    """FLOPs of ``fn(**kwargs)``, whose parameters belong to ``owner``, with calflops plus hand-counted attention."""
    import calflops

    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    module = _BoundCall(owner, fn, constants)
    with torch.no_grad(), count_attention() as attention:
        flops, _macs, _params = calflops.calculate_flops(model=module, kwargs=tensors, print_results=False,
                                                         output_as_string=False)
    return ForwardFlops(calflops=int(flops), attention=int(attention[0]))


def full_forward_flops(transformer: torch.nn.Module, kwargs: dict[str, Any]) -> ForwardFlops:
    """FLOPs of one uncached forward on the captured transformer ``kwargs``."""
    return count_forward(transformer, transformer, kwargs)


def cached_forward_flops(transformer: torch.nn.Module, kwargs: dict[str, Any], fn_blocks: int,
                         bn_blocks: int) -> ForwardFlops:
    """FLOPs of one cached step: embeddings + first ``fn_blocks`` + last ``bn_blocks`` blocks + output projection."""
    adapter = adapter_for(transformer)
    blocks = adapter.blocks(transformer)
    if fn_blocks + bn_blocks > len(blocks):
        raise ValueError(f"Fn + Bn = {fn_blocks} + {bn_blocks} exceeds the {len(blocks)} blocks of "
                         f"{type(transformer).__name__}")
    computed = blocks[:fn_blocks] + blocks[len(blocks) - bn_blocks:]

    def cached_step(**call_kwargs: Any) -> torch.Tensor:
        emb = adapter.embed(transformer, **call_kwargs)
        hidden, encoder = emb.hidden, emb.encoder
        for block in computed:
            encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, **emb.block_kwargs)
        return adapter.project(transformer, hidden, emb.out_kwargs)

    return count_forward(transformer, cached_step, kwargs)


def generation_flops(full: ForwardFlops, cached: ForwardFlops, calls: int, cached_calls: int) -> float:
    """FLOPs of one generation: ``calls`` transformer forwards of which ``cached_calls`` were cached steps."""
    if not 0 <= cached_calls <= calls:
        raise ValueError(f"cached_calls must be in [0, calls={calls}], got {cached_calls}")
    return (calls - cached_calls) * full.total + cached_calls * cached.total
