"""The cache step as pure functions of tensors and a branch's state buffers: what the lowerings run, compile or
capture (:mod:`dbcache_compile.lowerings`). The host-side decision around them is :func:`decide_on_host`.

Blocks are called by their **contract** (:class:`BlockIO`: which argument and output is the hidden stream and which
the encoder stream), so one definition serves every family. A chain (block lists deciding together) has three
**groups**: the first Fn blocks, the middle blocks (per block list: a list keeps its own middle residual, so the
model's glue between lists stays correct) and the last Bn blocks.

Two drivers run the groups:

* **whole steps** (:class:`CacheStep`, families with a prologue: FLUX.1, Qwen-Image): our forward is
  ``head`` (embeddings + Fn blocks + the Fn residual and its diff) then ``miss`` (store the Fn residual, middle
  blocks, cache their residual, Bn blocks, output projection) or ``hit`` (cached or forecast residual, Bn blocks,
  output projection); ``cond_step_functional`` is the whole step as one function with ``torch.cond`` and the state
  carried functionally (the ``cond`` lowering and :func:`dbcache_compile.export`). ControlNet residuals (the call's
  ``controls``) are added after their blocks in this loop as the model's forward adds them; the cached middle
  residual is the middle blocks' own contribution (without the residuals added after them) and a hit adds it plus
  this step's residuals of the skipped blocks, so each counts once with its current value;
* **groups inside the model's own forward** (:class:`GroupStep`, every family): block hooks run ``head`` (Fn group
  + residual + diff) at the chain's first block, ``middle`` (one list's middle blocks + its residual into the
  TaylorSeer ladder) or ``hit`` (the cached residual added) at a list's first middle block, ``tail`` (the Bn group)
  at the first Bn block; the other blocks of a group hand their inputs through. A call with an index-added input
  (the model adds something to the hidden stream after block i, outside the block) runs block by block instead and
  caches the sum of the middle blocks' own residuals (:meth:`GroupStep.add_delta`), so the model's glue adds its
  part once on a hit (:mod:`dbcache_compile.runtime`).
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from typing import Any, Callable, Optional

import torch

from .config import DBCacheConfig
from .decision import (DIFF_ALWAYS_HIT, Gates, cache_allowed, gates_of, hit_predicate, read_decision_sync,
                       recorded_diff, relative_l1)
from .parallel import relative_l1_over, split_like
from .state import BranchState, taylor_coefficients_tensor, taylor_forecast, taylor_update

__all__ = ["BlockIO", "BlockCall", "call_block", "plain_call", "region_call", "run_block_hooks", "CacheStep",
           "GroupStep", "decide_on_host",
           "fold_records", "initial_counters", "counters_from_host", "no_views", "standard_strides",
           "transformer_output", "fresh_function", "CACHED", "CONSECUTIVE", "HAS_PREV", "LAST_COMPUTE", "VALID",
           "LAST_CACHED"]

# device counters of the cond lowering and of packages, one int64 vector per branch
CACHED, CONSECUTIVE, HAS_PREV, LAST_COMPUTE, VALID, LAST_CACHED = range(6)


class BlockIO:
    """How one block class takes and returns its two streams, from its contract ``(hidden output index, encoder
    output index or None, hidden argument, encoder argument or None)``."""

    def __init__(self, block_cls: type, contract: tuple) -> None:
        self.hidden_out, self.encoder_out, self.hidden_arg, self.encoder_arg = contract
        self.name = block_cls.__name__
        try:
            params = list(inspect.signature(block_cls.forward).parameters)[1:]
        except (TypeError, ValueError):
            params = []
        self.params = params

    def _get(self, name: Optional[str], args: tuple, kwargs: dict) -> Any:
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        if name in self.params and self.params.index(name) < len(args):
            return args[self.params.index(name)]
        return None

    def streams(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(hidden, encoder)`` a call passes (``encoder`` is ``None`` for single-stream blocks)."""
        encoder = self._get(self.encoder_arg, args, kwargs) if self.encoder_out is not None else None
        return self._get(self.hidden_arg, args, kwargs), encoder

    def with_streams(self, args: tuple, kwargs: dict, hidden: torch.Tensor,
                     encoder: Optional[torch.Tensor]) -> tuple[tuple, dict]:
        """The call's arguments with these streams in place of its own."""
        args, kwargs = list(args), dict(kwargs)
        for name, value in ((self.hidden_arg, hidden), (self.encoder_arg, encoder)):
            if name is None or (value is None and name == self.encoder_arg and self.encoder_out is None):
                continue
            if name not in kwargs and name in self.params and self.params.index(name) < len(args):
                args[self.params.index(name)] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def out_streams(self, out: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(hidden, encoder)`` of a block's output (a tensor output is the hidden stream alone)."""
        if not isinstance(out, tuple):
            return out, None
        e = self.encoder_out
        return out[self.hidden_out], (out[e] if e is not None else None)

    @staticmethod
    def structure(out: Any) -> Any:
        """What :meth:`output` needs to rebuild an output like ``out``: ``"tensor"`` or ``(length, None positions)``."""
        if not isinstance(out, tuple):
            return "tensor"
        return len(out), frozenset(k for k, o in enumerate(out) if o is None)

    def output(self, structure: Any, hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> Any:
        """An output of the recorded ``structure`` holding these streams (``None`` where the block returned
        ``None``, e.g. SD3's last block for the encoder stream)."""
        if structure == "tensor":
            return hidden
        length, nones = structure
        out: list[Any] = [None] * length
        out[self.hidden_out] = hidden
        if self.encoder_out is not None and self.encoder_out not in nones:
            out[self.encoder_out] = encoder
        return tuple(out)


#: ``(block, io, args, kwargs) -> output``: how a segment calls one block (plainly, or through a compiled region)
BlockCall = Callable[[torch.nn.Module, BlockIO, tuple, dict], Any]


def call_block(block: torch.nn.Module, io: BlockIO, args: tuple, kwargs: dict) -> Any:
    return block(*args, **kwargs)


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


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _plain(t: Any) -> Any:
    """A region input as a plain standard-strided tensor: a view (Dynamo would guard on its base) or a tensor with
    other strides (a split chunk, a flattened patch embedding, a CUDA-graph-owned copy of one) is copied."""
    if not isinstance(t, torch.Tensor):
        return t
    if t._base is not None or t.stride() != _contiguous_strides(t.shape):
        return standard_strides(t)
    return t


def fresh_function(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object. Dynamo keeps compiled entries (and its recompile limit, 8) per code
    object, so compiling a fresh copy per cached transformer gives each model its own budget: one server process
    with several pipelines, or a notebook sweep of configs, cannot exhaust another model's entries."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _region_body(forward: Callable, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The compiled region of one block: the block class's own ``forward`` (the block's diffusers hooks, e.g.
    context-parallel splits, run around it eagerly), standard-strided outputs."""
    return standard_strides(forward(block, *args, **kwargs))


def run_block_hooks(region: Callable, block: torch.nn.Module, args: tuple, kwargs: dict,
                    skip: Optional[str] = None) -> Any:
    """Call ``block`` as its diffusers hooks would (each hook's ``pre_forward`` outermost first, its ``post_forward``
    innermost first, hook ``skip`` and those outside it left out) with the class ``forward`` through ``region`` in
    between. Compiling through the hooks instead would trace each block's own hook objects and recompile per block
    (e.g. the context-parallel split hooks on every Qwen-Image block)."""
    registry = getattr(block, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    if skip is not None and skip in order:
        order = order[:order.index(skip)]
    hooks = [registry.hooks[name] for name in reversed(order)] if registry is not None else []
    for hook in hooks:
        args, kwargs = hook.pre_forward(block, *args, **kwargs)
    # a view makes Dynamo guard on its base, and a split's chunk is a view with the full tensor's strides, which the
    # other blocks' inputs do not have (a recompile): inputs enter the region as standard-strided tensors
    args = tuple(_plain(a) for a in args)
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    out = region(type(block).forward, block, args, kwargs)
    for hook in reversed(hooks):
        out = hook.post_forward(block, out)
    return out


def plain_call(skip_hook: str) -> BlockCall:
    """A :data:`BlockCall` for blocks that carry our own block hook ``skip_hook``: what that hook wraps (the hooks
    registered before ours, then the block's own forward); calling the block itself would enter our hook again."""

    def call(block: torch.nn.Module, io: BlockIO, args: tuple, kwargs: dict) -> Any:
        return block._diffusers_hook.hooks[skip_hook].fn_ref.original_forward(*args, **kwargs)

    return call


def block_structure(block: torch.nn.Module) -> tuple:
    """What of a block's make-up changes its region's graphs, besides input shapes: its class, the classes of its
    submodules by name and of its attention processors. Blocks of one class differ there (SD3's last block is
    ``context_pre_only``, SD3.5's first blocks have a second attention, IP-Adapter processors replace the default
    ones): one compiled region per structure, so that they do not share (and exhaust) one function's recompile
    budget in a process that runs several models."""
    modules = tuple((name, type(m).__qualname__) for name, m in block.named_modules())
    processors = tuple((name, type(m.processor).__qualname__) for name, m in block.named_modules()
                       if getattr(m, "processor", None) is not None)
    return type(block).__module__, type(block).__qualname__, modules, processors


def compile_region(compiled: Any, block: torch.nn.Module, options: dict[str, Any]) -> Callable:
    """The compiled region of ``block`` from ``compiled`` (a :class:`~dbcache_compile.compiled.CompiledSet`): one
    per block structure (:func:`block_structure`), shared by every block, model and runtime of that structure."""
    return compiled.compile(type(block).__name__, _region_body, options, structural=False,
                            extra=block_structure(block))


def region_call(options: dict[str, Any], compiled: Any, skip_hook: Optional[str] = None) -> BlockCall:
    """A :data:`BlockCall` that runs each block's class ``forward`` through a compiled region, one ``torch.compile``
    per block structure (:func:`compile_region`: no block class ever recompiles for another, nor one structure for
    another), each with its own code object (:func:`fresh_function`), compiled in ``compiled`` (a
    :class:`~dbcache_compile.compiled.CompiledSet`: fallback counts, release). The block's diffusers hooks run
    eagerly around it (``skip_hook`` and hooks registered after it excluded: those are the ones calling us)."""
    regions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> its region

    def call(block: torch.nn.Module, io: BlockIO, args: tuple, kwargs: dict) -> Any:
        region = regions.get(block)
        if region is None:
            region = regions[block] = compile_region(compiled, block, options)
        return run_block_hooks(region, block, args, kwargs, skip_hook)

    return call


def passes(kwargs: dict, name: str) -> bool:
    """Whether a call's keyword arguments pass ``name`` (not ``None``); ``"<argument>.<key>"``: a key of a dict
    argument (``"joint_attention_kwargs.ip_adapter_image_embeds"``)."""
    arg, _, key = name.partition(".")
    value = kwargs.get(arg)
    if key:
        return isinstance(value, dict) and value.get(key) is not None
    return value is not None


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


def decide_on_host(config: DBCacheConfig, state: BranchState, step: int, diff: torch.Tensor) -> bool:
    """The decision of one step of one chain, taken by the host: the gates, then (only where they allow a hit) ONE
    device-to-host read of the predicate and the diff (a sync on CUDA), recorded as cache-dit records it; none with a
    threshold >= 1, where the gates alone decide (a hit, recorded as cache-dit's -1.0). Every host-deciding lowering
    and both drivers decide here."""
    if not cache_allowed(config, step, len(state.cached_steps), state.consecutive, state.has_prev):
        return False
    if config.residual_diff_threshold >= 1.0:
        state.diffs[step] = DIFF_ALWAYS_HIT
        return True
    hit, value = read_decision_sync(hit_predicate(config, True, diff), diff)
    state.diffs[step] = value
    return hit


def run_blocks(blocks: list[torch.nn.Module], ios: list[BlockIO], call: BlockCall, hidden: torch.Tensor,
               encoder: Optional[torch.Tensor], args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, Any]:
    """Run ``blocks`` in order, each given the streams the previous one returned and otherwise ``args`` /
    ``kwargs``: ``(hidden, encoder, last block's output)``."""
    out = None
    for block, io in zip(blocks, ios):
        block_args, block_kwargs = io.with_streams(args, kwargs, hidden, encoder)
        out = call(block, io, block_args, block_kwargs)
        hidden, encoder = io.out_streams(out)
    return hidden, encoder, out


class GroupStep:
    """The groups of one chain, run from inside the model's own forward by block hooks (module doc). Pure functions
    of their tensor arguments and the branch's buffers (updated in place), so a lowering can run them plainly,
    compile them whole or capture them as CUDA graphs.

    Args:
        lists: the chain's block lists (modules), in forward order.
        ios: the :class:`BlockIO` of every block of the chain, in order.
        fn, bn: the block split.
        block_call: how a block is called (plain, or through a compiled region).
    """

    def __init__(self, lists: list[list[torch.nn.Module]], ios: list[BlockIO], fn: int, bn: int,
                 block_call: BlockCall = call_block) -> None:
        self.blocks = [block for blocks in lists for block in blocks]
        self.ios = ios
        self.fn, self.mid_end = fn, len(self.blocks) - bn
        self.block_call = block_call
        #: chain index of each list's first / last middle block -> the list's index (its middle residual)
        self.first_mid: dict[int, int] = {}
        self.last_mid: dict[int, int] = {}
        #: list index -> (first, end) chain indices of its middle blocks
        self.mid_spans: dict[int, tuple[int, int]] = {}
        start = 0
        starts = set()
        for j, blocks in enumerate(lists):
            starts.add(start)
            idx = [i for i in range(start, start + len(blocks)) if fn <= i < self.mid_end]
            if idx:
                self.first_mid[idx[0]] = self.last_mid[idx[-1]] = j
                self.mid_spans[j] = (idx[0], idx[-1] + 1)
            start += len(blocks)
        #: whether block Fn exists and continues the Fn blocks' list: then a call with index-added inputs measures the
        #: Fn residual at block Fn's input (the glue after block Fn-1 included), else at block Fn-1's output
        self.fn_entry = fn < len(self.blocks) and fn not in starts
        #: the context-parallel group (set by the runtime per call): the diff is reduced over all ranks
        self.cp_group: Any = None

    def group_of(self, i: int) -> tuple[int, int]:
        """``(first, end)`` chain indices of the group block ``i`` belongs to."""
        if i < self.fn:
            return 0, self.fn
        if i >= self.mid_end:
            return self.mid_end, len(self.blocks)
        for first, end in self.mid_spans.values():
            if first <= i < end:
                return first, end
        raise AssertionError(i)

    def _run(self, first: int, end: int, hidden: torch.Tensor, encoder: Optional[torch.Tensor], args: tuple,
             kwargs: dict) -> tuple[torch.Tensor, Any]:
        hidden, encoder, _ = run_blocks(self.blocks[first:end], self.ios[first:end], self.block_call, hidden, encoder,
                                        args, kwargs)
        return hidden, encoder

    def head(self, fn_residual: torch.Tensor, base: torch.Tensor, hidden: torch.Tensor,
             encoder: Optional[torch.Tensor], args: tuple, kwargs: dict):
        """The Fn group from the chain's first block: ``(hidden, encoder, Fn residual, its diff to fn_residual)``
        (``base``: the hidden stream entering the chain, sharded like the blocks shard it)."""
        hidden, encoder = self._run(0, self.fn, hidden, encoder, args, kwargs)
        residual = hidden - base
        if self.cp_group is not None:
            return hidden, encoder, residual, relative_l1_over(fn_residual, residual, self.cp_group)
        return hidden, encoder, residual, relative_l1(fn_residual, residual)

    def middle(self, j: int, ladder_h: list[torch.Tensor], ladder_e: list[Optional[torch.Tensor]],
               hidden: torch.Tensor, encoder: Optional[torch.Tensor], args: tuple, kwargs: dict, window: Any,
               n_derivatives: Any) -> tuple[torch.Tensor, Any]:
        """List ``j``'s middle blocks on a computed step; their residual (hidden, and encoder where the list has
        one) goes into the ladders in place."""
        first, end = self.mid_spans[j]
        mid_h, mid_e = self._run(first, end, hidden, encoder, args, kwargs)
        mid_de = mid_e - encoder if mid_e is not None and encoder is not None else None
        self.store(ladder_h, ladder_e, mid_h - hidden, mid_de, window, n_derivatives)
        return mid_h, mid_e

    def add_delta(self, deltas: dict[int, tuple], i: int, inputs: tuple[torch.Tensor, Optional[torch.Tensor]],
                  hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> None:
        """Middle block ``i``'s own residual (its output minus its input, per stream) added to its list's running
        sum in ``deltas`` (list index -> ``(hidden sum, encoder sum or None)``); an encoder stream a block does not
        return (SD3's last block) ends the encoder sum."""
        h_in, e_in = inputs
        dh = hidden - h_in
        de = encoder - e_in if encoder is not None and e_in is not None else None
        j = next(j for j, (first, end) in self.mid_spans.items() if first <= i < end)
        if j in deltas:
            sum_h, sum_e = deltas[j]
            dh = sum_h + dh
            de = sum_e + de if sum_e is not None and de is not None else None
        deltas[j] = dh, de

    @staticmethod
    def store(ladder_h: list[torch.Tensor], ladder_e: list[Optional[torch.Tensor]], dh: torch.Tensor,
              de: Optional[torch.Tensor], window: Any, n_derivatives: Any) -> None:
        """A list's middle residual (``dh``, and ``de`` where the list has an encoder stream) into its TaylorSeer
        ladders, in place."""
        for buf, new in zip(ladder_h, taylor_update(ladder_h, dh, window, n_derivatives)):
            buf.copy_(new)
        if de is not None and ladder_e[0] is not None:
            for buf, new in zip(ladder_e, taylor_update(ladder_e, de, window, n_derivatives)):
                buf.copy_(new)

    def hit(self, ladder_h: list[torch.Tensor], ladder_e: list[Optional[torch.Tensor]], hidden: torch.Tensor,
            encoder: Optional[torch.Tensor], coeffs: Any) -> tuple[torch.Tensor, Any]:
        """A list's middle blocks on a cached step: the cached (TaylorSeer: forecast) residual added."""
        hidden = hidden + taylor_forecast(ladder_h, coeffs)
        if encoder is not None and ladder_e[0] is not None:
            encoder = encoder + taylor_forecast(ladder_e, coeffs)
        return hidden, encoder

    def tail(self, hidden: torch.Tensor, encoder: Optional[torch.Tensor], args: tuple,
             kwargs: dict) -> tuple[torch.Tensor, Any]:
        """The Bn group."""
        return self._run(self.mid_end, len(self.blocks), hidden, encoder, args, kwargs)


class CacheStep:
    """The whole-step segments of a family with a prologue (module doc); one chain.

    Args:
        transformer: the diffusers transformer.
        family: its :class:`~dbcache_compile.families.Family` (embed / project / block lists / contracts).
        config: the cache config (block split, thresholds, TaylorSeer terms).
        block_call: how a block is called (plain, or through a compiled region).
    """

    def __init__(self, transformer: torch.nn.Module, family: Any, config: DBCacheConfig,
                 block_call: BlockCall = call_block) -> None:
        blocks = family.blocks(transformer)
        self.transformer = transformer
        self.family = family
        self.config = config
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        ios = {type(b): BlockIO(type(b), family.contract(type(b))) for b in blocks}
        self.ios = [ios[type(b)] for b in blocks]
        self.fn_blocks = blocks[:fn]
        self.mid_blocks = blocks[fn:len(blocks) - bn]
        self.bn_blocks = blocks[len(blocks) - bn:] if bn else []
        self.num_blocks = len(blocks)
        self.block_call = block_call
        #: the context-parallel process group while the transformer runs under context parallelism (set by the
        #: runtime per call): the diff is then reduced over all ranks (:mod:`dbcache_compile.parallel`)
        self.cp_group: Any = None

    def _run_blocks(self, first: int, end: int, hidden: torch.Tensor, encoder: torch.Tensor,
                    block_kwargs: dict[str, Any], controls: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``first:end`` of the chain; with ``controls`` (the call's ControlNet inputs), each block's
        residual (:meth:`~dbcache_compile.families.Family.block_residuals`) is added to the hidden stream right after
        the block, as the model's own loop adds it."""
        blocks = (self.fn_blocks + self.mid_blocks + self.bn_blocks)[first:end]
        residuals = self.block_residuals(controls)
        if residuals is None:
            hidden, encoder, _ = run_blocks(blocks, self.ios[first:end], self.block_call, hidden, encoder, (),
                                            block_kwargs)
            return hidden, encoder
        for i, block in zip(range(first, end), blocks):
            hidden, encoder, _ = run_blocks([block], self.ios[i:i + 1], self.block_call, hidden, encoder, (),
                                            block_kwargs)
            if residuals[i] is not None:
                hidden = hidden + residuals[i]
        return hidden, encoder

    def block_residuals(self, controls: Optional[dict]) -> Optional[list[Optional[torch.Tensor]]]:
        """Per chain block, the tensor the model's forward adds to the hidden stream after it (ControlNet
        residuals, indexed as the model indexes them), or ``None`` without ControlNet inputs."""
        return self.family.block_residuals(self.transformer, controls) if controls else None

    def middle_controls(self, controls: Optional[dict]) -> Optional[torch.Tensor]:
        """The sum of the residuals the forward adds after the middle blocks (``None`` when there are none): the
        cached middle residual leaves it out and a hit adds the current one, so each counts once, with the value
        of this step."""
        residuals = self.block_residuals(controls)
        if residuals is None:
            return None
        first = len(self.fn_blocks)
        total = None
        for c in residuals[first:first + len(self.mid_blocks)]:
            if c is not None:
                total = c if total is None else total + c
        return total

    def head(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """Embeddings + Fn blocks (and the ControlNet residuals the forward adds after them) → ``(hidden, encoder,
        Fn residual, (block kwargs, output kwargs))``."""
        named = self.family.named_inputs(args, kwargs)
        emb = self.family.embed(self.transformer, **named)
        hidden, encoder = self._run_blocks(0, len(self.fn_blocks), emb.hidden, emb.encoder, emb.block_kwargs,
                                           self.family.control_inputs(named))
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

    def tail(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict],
             controls: Optional[dict] = None) -> torch.Tensor:
        """Bn blocks (with their ControlNet residuals) and the output projection."""
        start = len(self.fn_blocks) + len(self.mid_blocks)
        hidden, encoder = self._run_blocks(start, self.num_blocks, hidden, encoder, kw[0], controls)
        return self.family.project(self.transformer, hidden, kw[1])

    def middle(self, hidden: torch.Tensor, encoder: torch.Tensor, kw: tuple[dict, dict],
               controls: Optional[dict] = None):
        first = len(self.fn_blocks)
        mid_h, mid_e = self._run_blocks(first, first + len(self.mid_blocks), hidden, encoder, kw[0], controls)
        return mid_h.contiguous(), mid_e.contiguous()

    def miss(self, fn_residual: torch.Tensor, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor],
             hidden: torch.Tensor, encoder: torch.Tensor, residual: torch.Tensor, kw: tuple[dict, dict],
             window: Any, n_derivatives: Any, controls: Optional[dict] = None) -> torch.Tensor:
        """Compute step: store the Fn residual, run the middle blocks, cache their residual (in place), Bn, output.
        With ControlNet inputs the cached middle residual is the blocks' own contribution: the residuals the
        forward added after the middle blocks are left out of it (:meth:`middle_controls`)."""
        fn_residual.copy_(residual)
        mid_h, mid_e = self.middle(hidden, encoder, kw, controls)
        delta = mid_h - hidden
        added = self.middle_controls(controls)
        if added is not None:
            delta = delta - added
        for buf, new in zip(ladder_h, taylor_update(ladder_h, delta, window, n_derivatives)):
            buf.copy_(new)
        for buf, new in zip(ladder_e, taylor_update(ladder_e, mid_e - encoder, window, n_derivatives)):
            buf.copy_(new)
        return self.tail(mid_h, mid_e, kw, controls)

    def hit(self, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor], hidden: torch.Tensor,
            encoder: torch.Tensor, kw: tuple[dict, dict], coeffs: Any, controls: Optional[dict] = None
            ) -> torch.Tensor:
        """Cached step: add the cached (TaylorSeer: forecast) middle residual and this step's ControlNet residuals
        of the skipped blocks (each once), then Bn + output."""
        forecast = taylor_forecast(ladder_h, coeffs)
        added = self.middle_controls(controls)
        if added is not None:
            forecast = forecast + added
        hidden = (forecast + hidden).contiguous()
        encoder = (taylor_forecast(ladder_e, coeffs) + encoder).contiguous()
        return self.tail(hidden, encoder, kw, controls)

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
        controls = self.family.control_inputs(self.family.named_inputs(args, kwargs))
        added = self.middle_controls(controls)
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
            mid_h, mid_e = self.middle(h, e, kw, controls)
            delta = mid_h - h if added is None else mid_h - h - added  # the blocks' own residual (miss above)
            # both branches must return the same layout; block outputs can be strided slices (FLUX single blocks).
            # Flat (1-D) outputs: torch.cond cannot merge the strides of a dim whose symbolic size is an expression
            # (a context-parallel shard of a dynamic length, 32*Max(1, (s+1)//2): KeyError; docs/context_parallel.md)
            return delta.contiguous().flatten(), (mid_e - e).contiguous().flatten()

        dh, de = torch.cond(pred, hit_fn, miss_fn, (hidden, encoder, coeffs, list(ladder_h), list(ladder_e)))
        dh, de = dh.view(hidden.shape), de.view(encoder.shape)
        mid_h = hidden + dh if added is None else hidden + dh + added  # this step's ControlNet residuals, once
        out = self.tail(mid_h.contiguous(), (encoder + de).contiguous(), kw, controls)

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
        """The first step of a branch at a new input signature when the family cannot predict the stream shapes:
        there is no stored residual, so the gates force a compute. Runs the segments as plain calls (the blocks as
        ``block_call`` runs them), allocates the branch's buffers from the real Fn outputs (the embeddings and Fn
        blocks run once, as in the model's own forward) and fills them."""
        hidden, encoder, residual, kw = self.head(*args, **kwargs)
        state.allocate(hidden, encoder)
        n = state.derivatives_for_update(step)
        out = self.miss(state.fn_residual, state.ladder_h, state.ladder_e, hidden, encoder, residual, kw,
                        step - state.last_compute, n, self.family.control_inputs(self.family.named_inputs(args, kwargs)))
        state.record_compute(step, n)
        return out
