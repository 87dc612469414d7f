"""The generic adapter: DBCache for any diffusers transformer whose block classes are described — by a family entry
(:mod:`dbcache_compile.families`) or by diffusers' ``TransformerBlockRegistry`` (which output of a block is the
hidden stream and which the encoder stream) — without an adapter file.

The model's own forward runs unchanged (embeddings, rope, masks, LoRA scaling, glue between block lists, output
projection); hooks on its blocks do the caching, per **chain** (a family's chains are cache-dit's cache contexts:
usually one block list each, each with its own Fn/Bn split, residual and decision; without a family entry all block
lists form one chain):

* the first Fn blocks of the chain run; after the last of them the Fn residual (hidden stream out of block Fn-1
  minus hidden stream into block 0) goes through the same gates and the same relative L1 diff as everywhere else
  (:mod:`dbcache_compile.decision`), one host read when the gates allow;
* on a compute step the middle blocks run and, per block list, the residual of its middle part (outputs of its
  last middle block minus inputs of its first) is stored (TaylorSeer: its ladder updated);
* on a hit, the first middle block of each list returns its inputs plus that list's cached (or forecast) residual
  without running, and the other middle blocks return their inputs unchanged; the model's glue between lists runs
  as usual, so lists that reshape the streams between them (FLUX.2 joins the encoder stream into the hidden one)
  stay correct;
* the last Bn blocks run.

With one list per chain this is exactly DBCache; a chain of several lists keeps the residual per list instead of
over the whole chain (the same hit, summed in another order). Fn must end in a chain's first list and Bn start in
its last. Lowerings: ``eager`` and ``regional`` (each block class compiled once as a region; the glue runs eagerly,
so no CUDA graphs: explicit adapters keep the segment graphs).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch

from .adapters import Adapter
from .config import DBCacheConfig
from .decision import DIFF_ALWAYS_HIT, cache_allowed, hit_predicate, read_decision_sync, relative_l1
from .families import REFUSED, Family, contract_for, family_for
from .lowerings import CompiledSet, regional_options
from .parallel import cp_group, relative_l1_over, split_like
from .runtime import (Applied, BranchedRuntime, Branches, GenerationWatch, ModelHook, _block_region, check_call,
                      run_region)
from .state import BranchState, taylor_forecast, taylor_update
from .step import fresh_function

__all__ = ["GenericAdapter", "GenericRuntime", "generic_adapter", "GENERIC_LOWERINGS", "BLOCK_HOOK_NAME"]

GENERIC_LOWERINGS = ("eager", "regional")
BLOCK_HOOK_NAME = "dbcache_compile_block"


def _metadata(block_cls: type, family: Optional[Family]) -> Any:
    """diffusers' ``TransformerBlockMetadata`` for a block class (built from the family's contract when it has one:
    its argument lookup handles keyword and positional calls), or ``None``."""
    contract = contract_for(block_cls, family)
    if contract is None:
        return None
    from diffusers.hooks._helpers import TransformerBlockMetadata
    hidden_out, encoder_out, hidden_arg, encoder_arg = contract
    return TransformerBlockMetadata(return_hidden_states_index=hidden_out, return_encoder_hidden_states_index=encoder_out,
                                    hidden_states_argument_name=hidden_arg,
                                    encoder_hidden_states_argument_name=encoder_arg, _cls=block_cls)


class GenericAdapter(Adapter):
    """The block lists of a transformer grouped into chains (a family's, or all described lists as one chain, in
    the order the forward uses them; checked at run time against the call order)."""

    name = "generic"

    def __init__(self, chains: tuple[tuple[str, ...], ...], family: Optional[Family]) -> None:
        self.chains = chains
        self.family = family
        self.block_lists = tuple(name for chain in chains for name in chain)
        if family is not None:
            self.name = f"generic ({family.name})"

    def embed(self, transformer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the generic adapter runs the model's own forward")

    def project(self, transformer: torch.nn.Module, hidden: torch.Tensor, out_kwargs: dict) -> torch.Tensor:
        raise NotImplementedError("the generic adapter runs the model's own forward")


def _forward_order(transformer: torch.nn.Module, names: list[str]) -> list[str]:
    """``names`` in the order the model's ``forward`` source first mentions ``self.<name>`` (its block loops), so
    that a list re-assigned after construction (which moves it to the end of ``named_children``) keeps its place;
    definition order where the source is not available. The runtime checks the real call order anyway."""
    import inspect
    import re
    try:
        source = inspect.getsource(type(transformer).forward)
    except (OSError, TypeError):
        return names
    positions = {}
    for name in names:
        match = re.search(rf"self\.{re.escape(name)}\b", source)
        positions[name] = match.start() if match else len(source) + names.index(name)
    return sorted(names, key=positions.__getitem__)


def generic_adapter(transformer: torch.nn.Module) -> Optional[GenericAdapter]:
    """The generic adapter for ``transformer``, or ``None`` when none of its block lists is described; a
    ``ValueError`` for a model the cache would silently get wrong (``families.REFUSED``)."""
    reason = REFUSED.get(type(transformer).__name__)
    if reason is not None:
        raise ValueError(f"{type(transformer).__name__}: {reason}. Call optimize() on the supported families only "
                         f"(dbcache_compile.supported_models(); README 'Models')")
    family = family_for(type(transformer))
    if family is not None:
        return GenericAdapter(family.chains, family)
    lists = [name for name, child in transformer.named_children()
             if isinstance(child, torch.nn.ModuleList) and len(child)
             and all(_metadata(type(block), None) is not None for block in child)]
    return GenericAdapter((tuple(_forward_order(transformer, lists)),), None) if lists else None


class ChainState(BranchState):
    """One chain's state in one branch: the Fn residual and counters of :class:`BranchState`, and per block list a
    ladder of its middle residual (hidden and encoder streams), allocated at the first compute."""

    def __init__(self, terms: int) -> None:
        super().__init__(terms)
        self.segments: dict[int, tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]] = {}

    def drop_buffers(self) -> None:
        self.fn_residual = None
        self.segments = {}


class GenericState(BranchState):
    """A branch (cache context) of the generic adapter: its call count, and one :class:`ChainState` per chain, whose
    cached steps and diffs are the summary's per chain. The branch's own ``cached_steps`` / ``diffs`` are the first
    chain's."""

    def __init__(self, terms: int) -> None:
        super().__init__(terms)
        self.chains: list[ChainState] = []

    def reset(self) -> None:
        super().reset()
        for chain in getattr(self, "chains", ()):
            chain.reset()

    def chain(self, c: int) -> ChainState:
        while len(self.chains) <= c:
            self.chains.append(ChainState(self.terms))
        return self.chains[c]


class _ChainStep:
    """What the block hooks of one chain share during one forward."""

    __slots__ = ("state", "step", "hit", "h0", "inputs", "window", "n", "next")

    def __init__(self, state: ChainState, step: int) -> None:
        self.state, self.step = state, step
        self.hit = False
        self.h0: Optional[torch.Tensor] = None
        self.inputs: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.window, self.n = 0, 0
        self.next = 0  # the chain index the next block call must have


def _passed(kwargs: dict, name: str) -> bool:
    """Whether a call passes ``name`` (not ``None``); ``"<argument>.<key>"``: a key of a dict argument."""
    arg, _, key = name.partition(".")
    value = kwargs.get(arg)
    if key:
        return isinstance(value, dict) and value.get(key) is not None
    return value is not None


class _Chain:
    """A chain's static layout: its blocks, Fn / middle / Bn split, and the first / last middle block of each list."""

    def __init__(self, name: str, lists: list[list[torch.nn.Module]], fn: int, bn: int) -> None:
        self.name = name
        self.blocks = [block for blocks in lists for block in blocks]
        self.fn, self.mid_end = fn, len(self.blocks) - bn
        self.first_mid: dict[int, int] = {}  # chain index -> list (segment) index
        self.last_mid: dict[int, int] = {}
        start = 0
        for seg, blocks in enumerate(lists):
            idx = [i for i in range(start, start + len(blocks)) if fn <= i < self.mid_end]
            if idx:
                self.first_mid[idx[0]] = seg
                self.last_mid[idx[-1]] = seg
            start += len(blocks)


class _BlockHook(ModelHook):
    def __init__(self, runtime: "GenericRuntime", chain: int, index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.chain = chain
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.block_forward(self.chain, self.index, module, self.fn_ref.original_forward, args, kwargs)


class GenericRuntime(BranchedRuntime):
    """DBCache through block hooks around the model's own forward (module doc)."""

    block_hook_name = BLOCK_HOOK_NAME

    def __init__(self, transformer: torch.nn.Module, adapter: GenericAdapter, config: DBCacheConfig,
                 lowering: str, mode: Optional[str], options: Optional[dict], applied: Applied,
                 watch: Optional[GenerationWatch] = None, pipeline: Any = None) -> None:
        family = adapter.family
        if family is not None and lowering not in family.lowerings:
            raise ValueError(f"{type(transformer).__name__} ({family.name}) supports the lowerings "
                             f"{', '.join(family.lowerings)} only, not {lowering!r}: {family.lowering_note}. Use "
                             f"mode=None (the eager cache)")
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        chains = []
        for names in adapter.chains:
            lists = [list(getattr(transformer, name)) for name in names]
            if fn > len(lists[0]) or bn > len(lists[-1]):
                raise ValueError(
                    f"{type(transformer).__name__}: Fn={fn} must lie inside the first block list of each chain and "
                    f"Bn={bn} inside the last ({'+'.join(names)}: {len(lists[0])} / {len(lists[-1])} blocks)")
            chains.append(_Chain("+".join(names), lists, fn, bn))
        super().__init__(transformer, config, applied, watch, sum(len(c.blocks) for c in chains), GenericState)
        self.adapter = adapter.name
        self.family = adapter.family
        self.supported_lowerings = tuple(family.lowerings) if family is not None else GENERIC_LOWERINGS
        self.block_lists = adapter.block_lists
        self.chains = chains
        self.lowering = lowering
        self.mode = mode
        self.meta = {block: _metadata(type(block), adapter.family) for c in chains for block in c.blocks}
        missing = sorted({type(b).__name__ for b, m in self.meta.items() if m is None})
        if missing:
            raise ValueError(f"{type(transformer).__name__}: no stream contract for the block classes {missing} (not in "
                             f"diffusers' TransformerBlockRegistry nor in dbcache_compile.families)")
        self.unsupported = adapter.family.unsupported if adapter.family else ()
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.steps: Optional[list[_ChainStep]] = None
        self.structure: dict[tuple[int, int], Any] = {}  # (chain, index) -> output structure seen on a compute step
        self.regions: dict[type, Callable] = {}
        self.compiled = CompiledSet()
        if lowering == "regional":
            opts = regional_options(options or {})
            for c in chains:
                for block in c.blocks:
                    if type(block) not in self.regions:
                        self.regions[type(block)] = self.compiled.compile(type(block).__name__,
                                                                          fresh_function(_block_region), opts)
        self.block_hooks = {block: _BlockHook(self, ci, i) for ci, c in enumerate(chains)
                            for i, block in enumerate(c.blocks)}
        if adapter.family is not None and adapter.family.cfg == "separate":
            self.branches = _FamilyBranches(self.branches, self._separate_calls)

    def _separate_calls(self) -> bool:
        """Whether this call's pipeline runs cond and uncond as two calls without naming them (the family's
        pipelines do when CFG is on)."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        if pipeline is None:
            return False
        if hasattr(pipeline, "do_classifier_free_guidance"):
            return bool(pipeline.do_classifier_free_guidance)
        return float(getattr(pipeline, "guidance_scale", 1.0) or 1.0) > 1.0  # Kandinsky 5: no property

    def cudagraph_status(self) -> str:
        return "off (generic adapter: the model's own glue runs between the blocks)"

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.compiled.fallbacks

    def release(self) -> None:
        self.compiled.release()

    def _plan_chains(self) -> list[tuple[list[torch.nn.Module], int, int]]:
        return [(list(c.blocks), self.cache_config.Fn_compute_blocks, self.cache_config.Bn_compute_blocks)
                for c in self.chains]

    def summary(self) -> Any:
        summary = super().summary()
        states = self.branches.states
        order = self.branches.order or ["cond"]
        main = states.get(order[0])
        cfg = states.get("uncond") if "uncond" in order[1:] else (states.get(order[1]) if len(order) > 1 else None)
        summary.chains = {c.name: {"cached_steps": list(main.chain(ci).cached_steps) if main else [],
                                   "cfg_cached_steps": list(cfg.chain(ci).cached_steps) if cfg else [],
                                   "residual_diffs": dict(main.chain(ci).diffs) if main else {},
                                   "num_blocks": len(c.blocks),
                                   "branches": {n: list(states[n].chain(ci).cached_steps) for n in order
                                                if n in states}}
                          for ci, c in enumerate(self.chains)}
        return summary

    # ------------------------------------------------------------------------------------------------ per call
    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        if not check_call(module):
            return original(*args, **kwargs)
        refused = [name for name in self.unsupported if _passed(kwargs, name)]
        if refused:
            why = ("IP-Adapter image embeddings are not implemented with the cache" if "ip_adapter" in refused[0]
                   else "it feeds blocks by index from outside the cached chain")
            raise NotImplementedError(f"{type(module).__name__}: the cache does not implement `{refused[0]}` ({why}); "
                                      f"call dbcache_compile.disable() for this pipeline")
        state, step, key = self._begin(args, kwargs)
        chain_states = [state.chain(ci) for ci in range(len(self.chains))]
        if state.key != key:
            for chain_state in chain_states:
                chain_state.drop_buffers()
        for chain_state in chain_states:
            chain_state.begin_step(step)
        steps = self.steps = [_ChainStep(cs, step) for cs in chain_states]
        try:
            out = original(*args, **kwargs)
        finally:
            self.steps = None
        for c, chain_step in zip(self.chains, steps):
            if chain_step.next != len(c.blocks):
                raise RuntimeError(f"{type(module).__name__}'s forward called {chain_step.next} of the "
                                   f"{len(c.blocks)} blocks of {c.name}: the generic adapter needs every block "
                                   f"called once per forward, in order")
            if not chain_step.hit:
                chain_step.state.record_compute(step, chain_step.n)
        first = chain_states[0]
        state.cached_steps, state.diffs = first.cached_steps, first.diffs
        self._end(state, key)
        return out

    def _run(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        region = self.regions.get(type(module))
        if region is None:
            return original(*args, **kwargs)
        return run_region(region, module, BLOCK_HOOK_NAME, args, kwargs)

    def _streams(self, module: torch.nn.Module, args: tuple, kwargs: dict
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        meta = self.meta[module]
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        encoder = None
        if meta.return_encoder_hidden_states_index is not None and meta.encoder_hidden_states_argument_name:
            encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        return hidden, encoder

    def _out_streams(self, module: torch.nn.Module, out: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        meta = self.meta[module]
        if not isinstance(out, tuple):
            return out, None
        e = meta.return_encoder_hidden_states_index
        return out[meta.return_hidden_states_index], (out[e] if e is not None else None)

    def _build(self, key: tuple[int, int], module: torch.nn.Module, hidden: torch.Tensor,
               encoder: Optional[torch.Tensor]) -> Any:
        """The block's output structure (seen on a compute step) holding these streams (``None`` where the block
        returned ``None``, e.g. SD3's last block for the encoder stream)."""
        kind = self.structure.get(key)
        if kind is None:
            raise RuntimeError(f"block {key} is skipped before it was ever computed (internal error)")
        if kind == "tensor":
            return hidden
        length, nones = kind
        meta = self.meta[module]
        out: list[Any] = [None] * length
        out[meta.return_hidden_states_index] = hidden
        e = meta.return_encoder_hidden_states_index
        if e is not None and e not in nones:
            out[e] = encoder
        return tuple(out)

    def block_forward(self, c: int, i: int, module: torch.nn.Module, original: Callable, args: tuple,
                      kwargs: dict) -> Any:
        steps = self.steps
        if steps is None:  # a block called outside a cached forward
            return original(*args, **kwargs)
        chain, ctx = self.chains[c], steps[c]
        if i != ctx.next:
            raise RuntimeError(f"the generic adapter expected block {ctx.next} of the chain {chain.name} and got "
                               f"block {i}: this model calls its blocks in another order; it needs an explicit "
                               f"adapter")
        ctx.next += 1
        if i < chain.fn:
            if i == 0:
                # under context parallelism a split hook inside ours may shard the stream: the same shard
                ctx.h0 = split_like(module, self._streams(module, args, kwargs)[0],
                                    self.meta[module].hidden_states_argument_name, before=BLOCK_HOOK_NAME)
            out = self._run(module, original, args, kwargs)
            if i == chain.fn - 1:
                self._decide(ctx, self._out_streams(module, out)[0] - ctx.h0)
            return out
        if i >= chain.mid_end:
            return self._run(module, original, args, kwargs)
        state = ctx.state
        if ctx.hit:
            hidden, encoder = self._streams(module, args, kwargs)
            seg = chain.first_mid.get(i)
            if seg is not None:
                ladder_h, ladder_e = state.segments[seg]
                coeffs = state.forecast_coefficients(ctx.step)
                hidden = hidden + taylor_forecast(ladder_h, coeffs)
                if encoder is not None and ladder_e[0] is not None:
                    encoder = encoder + taylor_forecast(ladder_e, coeffs)
            return self._build((c, i), module, hidden, encoder)
        if i in chain.first_mid:
            ctx.inputs[chain.first_mid[i]] = self._streams(module, args, kwargs)
        out = self._run(module, original, args, kwargs)
        if (c, i) not in self.structure:
            self.structure[c, i] = ("tensor" if not isinstance(out, tuple)
                                    else (len(out), {k for k, o in enumerate(out) if o is None}))
        seg = chain.last_mid.get(i)
        if seg is not None:
            self._store(ctx, seg, *self._out_streams(module, out))
        return out

    def _decide(self, ctx: _ChainStep, residual: torch.Tensor) -> None:
        """After the chain's last Fn block: the gates, the diff (one host read when the gates allow), the Fn
        residual."""
        state, step, config = ctx.state, ctx.step, self.cache_config
        if state.fn_residual is None:
            state.fn_residual = torch.zeros_like(residual)
        if cache_allowed(config, step, len(state.cached_steps), state.consecutive, state.has_prev):
            group = cp_group(self.transformer)
            diff = (relative_l1(state.fn_residual, residual) if group is None
                    else relative_l1_over(state.fn_residual, residual, group))
            ctx.hit, diff_value = read_decision_sync(hit_predicate(config, True, diff), diff)
            state.diffs[step] = DIFF_ALWAYS_HIT if config.residual_diff_threshold >= 1.0 else diff_value
        if ctx.hit:
            state.record_hit(step)
            return
        state.fn_residual.copy_(residual)
        ctx.n = state.derivatives_for_update(step)
        ctx.window = step - state.last_compute

    def _store(self, ctx: _ChainStep, seg: int, hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> None:
        """After a list's last middle block on a compute step: its middle residual into the ladder."""
        h_in, e_in = ctx.inputs.pop(seg)
        state = ctx.state
        res_h = hidden - h_in
        res_e = encoder - e_in if encoder is not None and e_in is not None else None
        if seg not in state.segments:
            state.segments[seg] = ([torch.zeros_like(res_h) for _ in range(state.terms)],
                                   [torch.zeros_like(res_e) if res_e is not None else None
                                    for _ in range(state.terms)])
        ladder_h, ladder_e = state.segments[seg]
        for buf, new in zip(ladder_h, taylor_update(ladder_h, res_h, ctx.window, ctx.n)):
            buf.copy_(new)
        if res_e is not None:
            for buf, new in zip(ladder_e, taylor_update(ladder_e, res_e, ctx.window, ctx.n)):
                buf.copy_(new)


class _FamilyBranches(Branches):
    """:class:`Branches` for a family whose pipelines run CFG as two calls without naming them: calls outside any
    cache context alternate between ``cond`` and ``uncond`` while the pipeline's CFG is on."""

    def __init__(self, base: Branches, separate_calls: Callable[[], bool]) -> None:
        super().__init__(base._init_args[0], base.separate, base._state_cls)
        self._separate_calls = separate_calls

    def peek(self) -> str:
        if self._context is None and self.separate is None and self._separate_calls():
            self.separate = True
            try:
                return super().peek()
            finally:
                self.separate = None
        return super().peek()
