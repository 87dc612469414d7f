"""The cache step of a transformer with an explicit adapter: embed → Fn blocks → decide → middle blocks or cached
residual → Bn blocks → output, as pure functions of tensors and the branch's state buffers.

Segments (what the lowerings compile or capture):

* ``head``: embeddings, the first Fn blocks and the Fn residual; ``head_diff`` adds its relative L1 diff to the
  stored residual (the decision's input);
* ``miss``: store the Fn residual, run the middle blocks, update the cached middle residual (TaylorSeer ladder),
  then the last Bn blocks and the output projection;
* ``hit``: add the cached (or forecast) middle residual, then Bn and the output projection;
* ``cond_step_functional``: the whole step as one function with ``torch.cond`` on a device predicate and the state
  carried functionally (the ``cond`` lowering and :func:`dbcache_compile.export`).

How the segments run (eager, compiled, CUDA-graphed) is a lowering's business (:mod:`dbcache_compile.lowerings`).
"""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Optional

import torch

from .adapters import Adapter
from .config import DBCacheConfig
from .decision import Gates, cache_allowed, gates_of, hit_predicate, recorded_diff, relative_l1
from .parallel import relative_l1_over, split_like
from .state import BranchState, taylor_coefficients_tensor, taylor_forecast, taylor_update

__all__ = ["CacheStep", "BlockCall", "call_block", "region_call", "fold_records", "initial_counters",
           "counters_from_host", "no_views", "standard_strides", "transformer_output", "fresh_function",
           "CACHED", "CONSECUTIVE", "HAS_PREV", "LAST_COMPUTE", "VALID", "LAST_CACHED"]

# device counters of the cond lowering and of packages, one int64 vector per branch
CACHED, CONSECUTIVE, HAS_PREV, LAST_COMPUTE, VALID, LAST_CACHED = range(6)

#: ``(block, hidden, encoder, block_kwargs) -> (encoder, hidden)``: how a step calls one block.
BlockCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def call_block(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor,
               block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One block, ``(encoder, hidden)`` out (cache-dit's ForwardPattern_1, FLUX.1 and Qwen-Image)."""
    return block(hidden_states=hidden, encoder_hidden_states=encoder, **block_kwargs)


def standard_strides(out: Any) -> Any:
    """A region's outputs copied into standard-strided tensors (inside the compiled region, so fused into the
    producing kernel). FLUX single blocks return slices of one tensor (with batch 1 they even count as contiguous,
    but their batch stride differs and Dynamo guards on it); without the copy the next block of the class would
    recompile. With this, one graph per block class serves every block."""
    if isinstance(out, tuple):
        return tuple(standard_strides(t) for t in out)
    return out.clone(memory_format=torch.contiguous_format) if isinstance(out, torch.Tensor) else out


def no_views(t: Any) -> Any:
    """A view (e.g. a batch-1 linear's output) makes Dynamo guard on its base, which a later non-view input fails (a
    recompile): regions get plain tensors (one copy, only when needed)."""
    return t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t


def _region_body(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor,
                 block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled region of the ``regional`` lowering: one block, standard-strided outputs."""
    return standard_strides(call_block(block, hidden, encoder, block_kwargs))


def fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo keeps compiled entries (and its recompile limit, 8) per code
    object, so compiling a fresh copy per cached transformer gives each model its own budget: one server process
    with several pipelines, or a notebook sweep of configs, cannot exhaust another model's entries."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _class_region_body(forward: Callable, block: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """The compiled region of a block that carries diffusers hooks: the block class's own ``forward`` (the hooks run
    around the region, eagerly), standard-strided outputs."""
    return standard_strides(forward(block, **kwargs))


def _hooked_call(region: Callable, block: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """Call ``block`` as its diffusers hooks would (each hook's ``pre_forward`` outermost first, its ``post_forward``
    innermost first) with the class ``forward`` compiled in between. Compiling through the hooks instead would trace
    each block's own hook objects and recompile per block (e.g. the context-parallel split hooks on every
    Qwen-Image block)."""
    registry = block._diffusers_hook
    hooks = [registry.hooks[name] for name in reversed(registry._hook_order)]
    args: tuple = ()
    for hook in hooks:
        args, kwargs = hook.pre_forward(block, *args, **kwargs)
    # a split's chunk is a view with the full tensor's strides: the other blocks' inputs are not (a recompile)
    kwargs = {k: standard_strides(v) if getattr(v, "_base", None) is not None else v for k, v in kwargs.items()}
    if args:
        raise RuntimeError(f"a diffusers hook on {type(block).__name__} turned keyword arguments into positional "
                           f"ones; the regional lowering cannot run it")
    out = region(type(block).forward, block, kwargs)
    for hook in reversed(hooks):
        out = hook.post_forward(block, out)
    return out


def region_call(options: dict[str, Any], compiled: Any) -> BlockCall:
    """A :data:`BlockCall` that runs each block through a compiled region, one ``torch.compile`` per block class
    (so no block class ever recompiles for another, and ``recompile_limit=1`` holds), each with its own code
    object (see :func:`fresh_function`), compiled in ``compiled`` (a :class:`~dbcache_compile.lowerings.CompiledSet`:
    fallback counts, release). A block with diffusers hooks (context-parallel splits) runs them eagerly around its
    compiled class forward."""
    regions: dict[tuple, Callable] = {}

    def call(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor,
             block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        hooked = bool(getattr(getattr(block, "_diffusers_hook", None), "hooks", None))
        region = regions.get((type(block), hooked))
        if region is None:
            body = _class_region_body if hooked else _region_body
            region = regions[(type(block), hooked)] = compiled.compile(type(block).__name__, fresh_function(body),
                                                                       options)
        hidden, encoder = no_views(hidden), no_views(encoder)
        if hooked:
            return _hooked_call(region, block, dict(block_kwargs, hidden_states=hidden, encoder_hidden_states=encoder))
        return region(block, hidden, encoder, block_kwargs)

    call.regions = regions  # type: ignore[attr-defined]
    return call


def transformer_output(sample: torch.Tensor, return_dict: bool) -> Any:
    """What a diffusers transformer's forward returns: ``Transformer2DModelOutput`` or the ``(sample,)`` tuple."""
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=sample)


def initial_counters(device: torch.device) -> torch.Tensor:
    """Device counters of a fresh generation (cond lowering and packages): nothing cached, no compute yet."""
    init = [0] * 6
    init[LAST_COMPUTE] = init[LAST_CACHED] = -1
    return torch.tensor(init, dtype=torch.int64, device=device)


def counters_from_host(state: BranchState, device: torch.device) -> torch.Tensor:
    """Device counters equal to a branch's host counters (after a step the host ran itself, e.g. the first step at
    a new input signature)."""
    last_cached = state.cached_steps[-1] if state.cached_steps else -1
    values = [len(state.cached_steps), state.consecutive, int(state.has_prev), state.last_compute, state.valid,
              last_cached]
    return torch.tensor(values, dtype=torch.int64, device=device)


def fold_records(branches: list[BranchState]) -> None:
    """Move each branch's device records ``(step, hit predicate, diff or NaN)`` into its host lists, with one
    device-to-host copy per branch, and clear them."""
    for branch in branches:
        if not branch.records:
            continue
        values = torch.stack([torch.stack([p.to(torch.float64), d.to(torch.float64)]) for _, p, d in branch.records])
        for (step, _, _), (hit, diff) in zip(branch.records, values.tolist()):
            if hit:
                branch.cached_steps.append(step)
            if not math.isnan(diff):
                branch.diffs[step] = diff
        branch.records = []


class CacheStep:
    """The segments of one transformer's cached step (see the module doc).

    Args:
        transformer: the diffusers transformer.
        adapter: its explicit adapter (embed / project / block lists).
        config: the cache config (block split, thresholds, TaylorSeer terms).
        block_call: how a block is called (plain, or through a compiled region).
    """

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, config: DBCacheConfig,
                 block_call: BlockCall = call_block) -> None:
        blocks = adapter.blocks(transformer)
        self.transformer = transformer
        self.adapter = adapter
        self.config = config
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        self.fn_blocks = blocks[:fn]
        self.mid_blocks = blocks[fn:len(blocks) - bn]
        self.bn_blocks = blocks[len(blocks) - bn:] if bn else []
        self.num_blocks = len(blocks)
        self.block_call = block_call
        #: the context-parallel process group while the transformer runs under context parallelism (set by the
        #: runtime per call): the diff is then reduced over all ranks (:mod:`dbcache_compile.parallel`)
        self.cp_group: Any = None

    def _run_blocks(self, blocks: list[torch.nn.Module], hidden: torch.Tensor, encoder: torch.Tensor,
                    block_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        for block in blocks:
            encoder, hidden = self.block_call(block, hidden, encoder, block_kwargs)
        return hidden, encoder

    def head(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """Embeddings + Fn blocks → ``(hidden, encoder, Fn residual, (block kwargs, output kwargs))``."""
        emb = self.adapter.embed(self.transformer, *args, **kwargs)
        hidden, encoder = self._run_blocks(self.fn_blocks, emb.hidden, emb.encoder, emb.block_kwargs)
        base = emb.hidden
        if self.cp_group is not None:  # the first block may shard the stream (Qwen-Image): the same shard
            base = split_like(self.fn_blocks[0], base)
        return hidden, encoder, hidden - base, (emb.block_kwargs, emb.out_kwargs)

    def head_diff(self, fn_residual: torch.Tensor, *args: Any, **kwargs: Any):
        """:meth:`head` plus the relative L1 diff of the Fn residual to ``fn_residual`` (0-dim tensor; over all
        ranks under context parallelism)."""
        hidden, encoder, residual, kw = self.head(*args, **kwargs)
        if self.cp_group is not None:
            return hidden, encoder, residual, relative_l1_over(fn_residual, residual, self.cp_group), kw
        return hidden, encoder, residual, relative_l1(fn_residual, residual), kw

    def tail(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict]) -> torch.Tensor:
        """Bn blocks and the output projection."""
        hidden, encoder = self._run_blocks(self.bn_blocks, hidden, encoder, kw[0])
        return self.adapter.project(self.transformer, hidden, kw[1])

    def middle(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict]):
        mid_h, mid_e = self._run_blocks(self.mid_blocks, hidden, encoder, kw[0])
        return mid_h.contiguous(), mid_e.contiguous()

    def miss(self, fn_residual: torch.Tensor, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor],
             hidden: torch.Tensor, encoder: torch.Tensor, residual: torch.Tensor, kw: tuple[dict, dict],
             window: Any, n_derivatives: Any) -> torch.Tensor:
        """Compute step: store the Fn residual, run the middle blocks, cache their residual (in place), Bn, output."""
        fn_residual.copy_(residual)
        mid_h, mid_e = self.middle(hidden, encoder, kw)
        for buf, new in zip(ladder_h, taylor_update(ladder_h, mid_h - hidden, window, n_derivatives)):
            buf.copy_(new)
        for buf, new in zip(ladder_e, taylor_update(ladder_e, mid_e - encoder, window, n_derivatives)):
            buf.copy_(new)
        return self.tail(mid_h, mid_e, kw)

    def hit(self, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], hidden: torch.Tensor,
            encoder: torch.Tensor, kw: tuple[dict, dict], coeffs: Any) -> torch.Tensor:
        """Cached step: add the cached (TaylorSeer: forecast) middle residual, then Bn + output."""
        hidden = (taylor_forecast(ladder_h, coeffs) + hidden).contiguous()
        encoder = (taylor_forecast(ladder_e, coeffs) + encoder).contiguous()
        return self.tail(hidden, encoder, kw)

    def cond_step_functional(self, step: torch.Tensor, counters: torch.Tensor, fn_residual: torch.Tensor,
                             ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], *args: Any,
                             gates: Optional[Gates] = None, **kwargs: Any):
        """The whole cached forward as a pure function (the ``cond`` lowering; what :func:`dbcache_compile.export`
        exports): returns ``(output, hit predicate, diff or NaN when not computed, new counters, new fn_residual,
        new ladder_h, new ladder_e)``. The cond branches only return the middle residuals (no mutation, no alias).

        ``gates``: the config's gate numbers as device tensors (the ``cond`` lowering: graph inputs, so another
        threshold, warm-up, limit or mask needs no recompile); ``None``: the config's, as constants (an export).
        """
        terms = self.config.taylorseer_terms
        gates = gates_of(self.config) if gates is None else gates
        hidden, encoder, residual, diff, kw = self.head_diff(fn_residual, *args, **kwargs)
        # Fn ending in a FLUX single block: both streams are slices of one output, and cond operands must not alias
        # one another ("cond_true might be aliasing the input or the output"); the encoder stream is the smaller one
        encoder = encoder.clone()
        consecutive = torch.where(counters[LAST_CACHED] == step - 1, counters[CONSECUTIVE], 0)
        allowed = cache_allowed(gates, step, counters[CACHED], consecutive, counters[HAS_PREV])
        pred = hit_predicate(gates, allowed, diff)
        coeffs = taylor_coefficients_tensor(step - counters[LAST_COMPUTE], counters[VALID], terms)

        def hit_fn(h, e, coeffs, ladder_h, ladder_e):
            dh, de = taylor_forecast(ladder_h, coeffs), taylor_forecast(ladder_e, coeffs)
            return (dh.clone().flatten(), de.clone().flatten()) if terms == 1 else (dh.flatten(), de.flatten())

        def miss_fn(h, e, coeffs, ladder_h, ladder_e):
            mid_h, mid_e = self.middle(h, e, kw)
            # both branches must return the same layout; block outputs can be strided slices (FLUX single blocks).
            # Flat (1-D) outputs: torch.cond cannot merge the strides of a dim whose symbolic size is an expression
            # (a context-parallel shard of a dynamic length, 32*Max(1, (s+1)//2): KeyError; docs/context_parallel.md)
            return (mid_h - h).contiguous().flatten(), (mid_e - e).contiguous().flatten()

        dh, de = torch.cond(pred, hit_fn, miss_fn, (hidden, encoder, coeffs, list(ladder_h), list(ladder_e)))
        dh, de = dh.view(hidden.shape), de.view(encoder.shape)
        out = self.tail((hidden + dh).contiguous(), (encoder + de).contiguous(), kw)

        n = torch.where(step > 2, torch.clamp(counters[VALID], max=terms - 1), 0)
        window = (step - counters[LAST_COMPUTE]).to(torch.float32)
        new_h = [torch.where(pred, old, new) for old, new in zip(ladder_h, taylor_update(ladder_h, dh, window, n))]
        new_e = [torch.where(pred, old, new) for old, new in zip(ladder_e, taylor_update(ladder_e, de, window, n))]
        new_fn = torch.where(pred, fn_residual, residual)
        one = torch.ones_like(counters[CACHED])
        on_hit = torch.stack([counters[CACHED] + 1, consecutive + 1, counters[HAS_PREV],
                              counters[LAST_COMPUTE], counters[VALID], step * one])
        on_miss = torch.stack([counters[CACHED], consecutive, one, step * one, 1 + n, counters[LAST_CACHED]])
        new_counters = torch.where(pred, on_hit, on_miss)
        return out, pred, recorded_diff(gates, allowed, diff), new_counters, new_fn, new_h, new_e

    def cond_step(self, step: torch.Tensor, counters: torch.Tensor, fn_residual: torch.Tensor,
                  ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], *args: Any,
                  gates: Optional[Gates] = None, **kwargs: Any):
        """:meth:`cond_step_functional` with the new state copied into the static buffers (in the same graph)."""
        out, pred, diff, new_counters, new_fn, new_h, new_e = self.cond_step_functional(
            step, counters, fn_residual, ladder_h, ladder_e, *args, gates=gates, **kwargs)
        for buf, value in zip([counters, fn_residual, *ladder_h, *ladder_e], [new_counters, new_fn, *new_h, *new_e]):
            buf.copy_(value)
        return out, pred, diff

    def first_step(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The first step of a branch at a new input signature: there is no stored residual, so the gates force a
        compute. Runs the segments as plain calls (the blocks as ``block_call`` runs them), allocates the branch's
        buffers from the real Fn outputs (the embeddings and Fn blocks run once, as in the model's own forward) and
        fills them."""
        hidden, encoder, residual, kw = self.head(*args, **kwargs)
        state.allocate(hidden, encoder)
        n = state.derivatives_for_update(step)
        out = self.miss(state.fn_residual, state.ladder_h, state.ladder_e, hidden, encoder, residual, kw,
                        step - state.last_compute, n)
        state.record_compute(step, n)
        return out
