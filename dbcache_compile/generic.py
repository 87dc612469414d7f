"""The generic adapter: DBCache for any diffusers transformer whose block classes diffusers describes in
``diffusers.hooks._helpers.TransformerBlockRegistry`` (which output of a block is the hidden stream and which the
encoder stream), without an adapter file.

The model's own forward runs unchanged (embeddings, rope, masks, LoRA scaling, glue between block lists, output
projection); hooks on its blocks do the caching:

* the first Fn blocks of the chain (the block lists in order, as one chain) run; after the last of them the Fn
  residual (hidden stream out of block Fn-1 minus hidden stream into block 0) goes through the same gates and the
  same relative L1 diff as everywhere else (:mod:`dbcache_compile.decision`), one host read when the gates allow;
* on a compute step the middle blocks run and, per block list, the residual of its middle part (outputs of its
  last middle block minus inputs of its first) is stored (TaylorSeer: its ladder updated);
* on a hit, the first middle block of each list returns its inputs plus that list's cached (or forecast) residual
  without running, and the other middle blocks return their inputs unchanged; the model's glue between lists runs
  as usual, so lists that reshape the streams between them (FLUX.2 joins the encoder stream into the hidden one)
  stay correct;
* the last Bn blocks run.

With one list this is exactly DBCache; with several lists the residual is kept per list instead of over the whole
chain (the same hit, summed in another order). Fn must end in the first list and Bn start in the last. Lowerings:
``eager`` and ``regional`` (each block class compiled once as a region; the glue runs eagerly, so no CUDA graphs:
explicit adapters keep the segment graphs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .adapters import Adapter
from .config import DBCacheConfig
from .decision import DIFF_ALWAYS_HIT, cache_allowed, hit_predicate, read_decision_sync, relative_l1
from .lowerings import Compiled, regional_options
from .parallel import cp_group, relative_l1_over, split_like
from .runtime import Applied, BranchedRuntime, GenerationWatch, ModelHook, _block_region, check_call, run_region
from .state import BranchState, taylor_forecast, taylor_update
from .step import fresh_function, no_views

__all__ = ["GenericAdapter", "GenericRuntime", "generic_adapter", "GENERIC_LOWERINGS", "BLOCK_HOOK_NAME"]

GENERIC_LOWERINGS = ("eager", "regional")
BLOCK_HOOK_NAME = "dbcache_compile_block"


def _metadata(block_cls: type) -> Any:
    from diffusers.hooks._helpers import TransformerBlockRegistry
    try:
        return TransformerBlockRegistry.get(block_cls)
    except ValueError:
        return None


class GenericAdapter(Adapter):
    """Block lists found on the transformer: its direct ``ModuleList`` children whose blocks are all registered in
    diffusers' ``TransformerBlockRegistry``, in the order its forward uses them (checked at run time against the
    call order)."""

    name = "generic"

    def __init__(self, block_lists: tuple[str, ...]) -> None:
        self.block_lists = block_lists

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
    """The generic adapter for ``transformer``, or ``None`` when none of its block lists is described."""
    lists = [name for name, child in transformer.named_children()
             if isinstance(child, torch.nn.ModuleList) and len(child)
             and all(_metadata(type(block)) is not None for block in child)]
    return GenericAdapter(tuple(_forward_order(transformer, lists))) if lists else None


class GenericState(BranchState):
    """A branch's state for the generic adapter: the Fn residual as in :class:`BranchState`, and per block list a
    ladder of its middle residual (hidden and encoder streams), allocated at the first compute."""

    def __init__(self, terms: int) -> None:
        super().__init__(terms)
        self.segments: dict[int, tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]] = {}

    def drop_buffers(self) -> None:
        self.fn_residual = None
        self.segments = {}


class _Step:
    """What the block hooks of one forward share."""

    __slots__ = ("state", "step", "hit", "h0", "inputs", "window", "n")

    def __init__(self, state: GenericState, step: int) -> None:
        self.state, self.step = state, step
        self.hit = False
        self.h0: Optional[torch.Tensor] = None
        self.inputs: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.window, self.n = 0, 0


class _BlockHook(ModelHook):
    def __init__(self, runtime: "GenericRuntime", index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.block_forward(self.index, module, self.fn_ref.original_forward, args, kwargs)


class GenericRuntime(BranchedRuntime):
    """DBCache through block hooks around the model's own forward (module doc)."""

    block_hook_name = BLOCK_HOOK_NAME

    def __init__(self, transformer: torch.nn.Module, adapter: GenericAdapter, config: DBCacheConfig,
                 lowering: str, mode: Optional[str], options: Optional[dict], applied: Applied,
                 watch: Optional[GenerationWatch] = None) -> None:
        lists = [list(getattr(transformer, name)) for name in adapter.block_lists]
        chain = [block for blocks in lists for block in blocks]
        super().__init__(transformer, config, applied, watch, len(chain), GenericState)
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        if fn > len(lists[0]) or bn > len(lists[-1]):
            raise ValueError(
                f"the generic adapter needs the first Fn={fn} blocks inside the first block list "
                f"({adapter.block_lists[0]}: {len(lists[0])} blocks) and the last Bn={bn} inside the last "
                f"({adapter.block_lists[-1]}: {len(lists[-1])} blocks)")
        self.adapter = adapter.name
        self.block_lists = adapter.block_lists
        self.lowering = lowering
        self.mode = mode
        self.fn, self.mid_end = fn, len(chain) - bn
        self.meta = [_metadata(type(block)) for block in chain]
        # middle segments: per block list, the chain indices of its first and last middle block
        self.first_mid: dict[int, int] = {}  # chain index -> segment
        self.last_mid: dict[int, int] = {}
        start = 0
        for seg, blocks in enumerate(lists):
            idx = [i for i in range(start, start + len(blocks)) if fn <= i < self.mid_end]
            if idx:
                self.first_mid[idx[0]] = seg
                self.last_mid[idx[-1]] = seg
            start += len(blocks)
        self.chain = chain
        self.ctx: Optional[_Step] = None
        self._next = 0  # the chain index the next block call must have
        self.structure: dict[int, Any] = {}  # chain index -> output structure seen on a compute step
        self.regions: dict[type, Callable] = {}
        self.fallbacks: dict[str, int] = {}
        if lowering == "regional":
            opts = regional_options(options or {})
            for block in chain:
                if type(block) not in self.regions:
                    self.regions[type(block)] = Compiled(type(block).__name__, fresh_function(_block_region), opts,
                                                         self.fallbacks)
        self.block_hooks = {block: _BlockHook(self, i) for i, block in enumerate(chain)}

    def _on_new_generation(self, state: BranchState) -> None:
        pass

    def cudagraph_status(self) -> str:
        return "off (generic adapter: the model's own glue runs between the blocks)"

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.fallbacks

    # ------------------------------------------------------------------------------------------------ per call
    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        if not check_call(module):
            return original(*args, **kwargs)
        state, step, key = self._begin(args, kwargs)
        if state.key != key:
            state.drop_buffers()
        ctx = self.ctx = _Step(state, step)
        self._next = 0
        try:
            out = original(*args, **kwargs)
        finally:
            self.ctx = None
        if self._next != len(self.chain):
            raise RuntimeError(f"{type(module).__name__}'s forward called {self._next} of the {len(self.chain)} "
                               f"blocks of {', '.join(self.block_lists)}: the generic adapter needs every block "
                               f"called once per forward, in order")
        if not ctx.hit:
            state.record_compute(step, ctx.n)
        self._end(state, key)
        return out

    def _run(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        region = self.regions.get(type(module))
        if region is None:
            return original(*args, **kwargs)
        return run_region(region, module, BLOCK_HOOK_NAME, args, kwargs)

    def _streams(self, i: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        meta = self.meta[i]
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        encoder = None
        if meta.return_encoder_hidden_states_index is not None:
            encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        return hidden, encoder

    def _out_streams(self, i: int, out: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        meta = self.meta[i]
        if not isinstance(out, tuple):
            return out, None
        e = meta.return_encoder_hidden_states_index
        return out[meta.return_hidden_states_index], (out[e] if e is not None else None)

    def _build(self, i: int, hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> Any:
        """Block ``i``'s output structure (seen on a compute step) holding these streams."""
        kind = self.structure.get(i)
        if kind is None:
            raise RuntimeError(f"block {i} is skipped before it was ever computed (internal error)")
        if kind == "tensor":
            return hidden
        meta = self.meta[i]
        out: list[Any] = [None] * kind
        out[meta.return_hidden_states_index] = hidden
        if meta.return_encoder_hidden_states_index is not None:
            out[meta.return_encoder_hidden_states_index] = encoder
        return tuple(out)

    def block_forward(self, i: int, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        ctx = self.ctx
        if ctx is None:  # a block called outside a cached forward
            return original(*args, **kwargs)
        if i != self._next:
            raise RuntimeError(f"the generic adapter expected block {self._next} of the chain "
                               f"({', '.join(self.block_lists)}) and got block {i}: this model calls its blocks in "
                               f"another order; it needs an explicit adapter")
        self._next += 1
        if i < self.fn:
            if i == 0:
                # under context parallelism a split hook inside ours may shard the stream: the same shard
                ctx.h0 = split_like(module, self._streams(i, args, kwargs)[0],
                                    self.meta[i].hidden_states_argument_name, before=BLOCK_HOOK_NAME)
            out = self._run(module, original, args, kwargs)
            if i == self.fn - 1:
                self._decide(ctx, self._out_streams(i, out)[0] - ctx.h0)
            return out
        if i >= self.mid_end:
            return self._run(module, original, args, kwargs)
        state = ctx.state
        if ctx.hit:
            hidden, encoder = self._streams(i, args, kwargs)
            seg = self.first_mid.get(i)
            if seg is not None:
                ladder_h, ladder_e = state.segments[seg]
                coeffs = state.forecast_coefficients(ctx.step)
                hidden = hidden + taylor_forecast(ladder_h, coeffs)
                if encoder is not None and ladder_e[0] is not None:
                    encoder = encoder + taylor_forecast(ladder_e, coeffs)
            return self._build(i, hidden, encoder)
        if i in self.first_mid:
            ctx.inputs[self.first_mid[i]] = self._streams(i, args, kwargs)
        out = self._run(module, original, args, kwargs)
        if i not in self.structure:
            self.structure[i] = "tensor" if not isinstance(out, tuple) else len(out)
        seg = self.last_mid.get(i)
        if seg is not None:
            self._store(ctx, seg, *self._out_streams(i, out))
        return out

    def _decide(self, ctx: _Step, residual: torch.Tensor) -> None:
        """After the last Fn block: the gates, the diff (one host read when the gates allow), the Fn residual."""
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

    def _store(self, ctx: _Step, seg: int, hidden: torch.Tensor, encoder: Optional[torch.Tensor]) -> None:
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
