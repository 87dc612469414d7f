"""The user's own ``torch.compile`` / ``transformer.compile()`` / ``torch.export`` around an optimized transformer.

What cannot run under the user's trace is refused with **our** message, even under Dynamo. A plain ``raise`` inside
traced code reaches the user as ``torch._dynamo.exc.Unsupported: Observed exception`` (the message only in the debug
context) with ``fullgraph=True``, and without it Dynamo falls back to running the frame eagerly, where
``torch.compiler.is_compiling()`` is ``False``: the refusal evaporated and the cache ran uncompiled. So a refusal
calls a function wrapped in ``torch.compiler.disable(fn, reason=...)``:

* ``fullgraph=True`` (and ``torch.export(strict=True)``, ``transformer.compile(fullgraph=True)``): Dynamo refuses to
  call it and its ``Unsupported`` error shows the ``reason`` (``Explanation: ... (reason: dbcache_compile: ...)``);
* without ``fullgraph``: Dynamo breaks the graph and runs it eagerly, and it raises :class:`UserCompileError` with
  the detailed message;
* non-strict ``torch.export`` (Python runs, ``is_compiling()`` is ``True``): it raises :class:`UserCompileError`.

The ``reason`` is fixed when the function is wrapped (Dynamo cannot wrap a function while tracing), so every kind of
refusal has its own wrapped function, made at import (:data:`REASONS`).

**What works: the fullgraph form of a family with a prologue** (FLUX.1, Qwen-Image; any lowering ``optimize`` chose,
unquantized, without context parallelism). Under the user's ``torch.compile`` (any backend and mode, ``fullgraph=True``,
``dynamic=True``) our forward traces :meth:`~dbcache_compile.step.CacheStep.cond_step_functional`: the decision is
``torch.cond`` on a device predicate, the counters, the step and the gate numbers are device tensors, as in
``optimize(graph="cond")``. The per-call bookkeeping (the generation rule of :class:`~dbcache_compile.runtime.InputWatch`
on the caller's very tensors, the scheduler watch, the branch of the cache context, buffers allocated at a new input
signature) runs at run time in two custom ops, ``dbcache_compile::user_begin`` and ``user_end`` (opaque to Dynamo and
Inductor, run eagerly at every call, given the caller's tensor objects): nothing of it is traced, so nothing is
specialised per step or per branch (no recompile across steps or between the cond / uncond contexts). ``user_begin``
hands the graph copies of the branch's state (counters, Fn residual, TaylorSeer ladders) and ``user_end`` copies the
new state back and records the step (``summary()``). ``torch.export`` is refused (:func:`dbcache_compile.export`
packages the same graph).

**A family through its own forward** (block hooks: SD3, Wan, FLUX.1 with ``prologue=False``, ...; not Chroma, whose
groups cannot run whole): :class:`UserCompiledHooks` lets the model's forward be traced as it is; the Fn and Bn
blocks run as the model calls them, the predicate is computed after the last Fn block, and each block list's middle
group is one ``torch.cond`` at its first block, its other blocks handing their inputs through. Its state is read per
buffer (``user_state``, shaped like the trace's tensors) and written back at the end (``user_end_hooks``).

**Blocks compiled in place** (``compile_repeated_blocks()``, ``block.compile()``) on such a family:
:class:`CompiledBlockCall` runs the cache around each block's compiled call.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Optional

import torch

from .decision import Gates, gate_tensors, gates_of
from .parallel import cp_group, inner_hooks
from .step import BlockIO, CacheStep, call_block, counters_from_host, passes, transformer_output

__all__ = ["UserCompileError", "REASONS", "refuse", "refuse_while_compiling", "UserCompiled", "traced_forward",
           "CompiledBlockCall", "route_compiled_blocks", "unroute_compiled_block"]

_COMPILE_THROUGH = ("Compile through the cache instead: dbcache_compile.optimize(pipe, cache=..., mode='default' or "
                    "'max-autotune') (graph='regional' or 'segments' run every family)")

#: kind of refusal -> its message (Dynamo's ``reason``; the start of the eager error)
REASONS: dict[str, str] = {
    "cache": ("dbcache_compile: torch.compile / transformer.compile() around a transformer optimized by "
              "dbcache_compile cannot trace the cache of this family: its forward feeds each block of a list "
              "something of its own (Family.ungroupable, e.g. Chroma's per-block modulation), so a list's middle "
              "blocks cannot be one torch.cond, and a host decision traced would be frozen into the graph (a wrong "
              "image). " + _COMPILE_THROUGH),
    "blocks": ("dbcache_compile: a block of a transformer optimized by dbcache_compile (a family whose cache runs from "
               "block hooks) was wrapped by torch.compile(block): the wrapper would trace the cache's per-block hook "
               "and its host decision. Compile the blocks in place instead, block.compile() or "
               "transformer.compile_repeated_blocks() (the cache then runs around each compiled block), or compile "
               "through the cache: dbcache_compile.optimize(pipe, cache=..., mode='default', graph='regional')"),
    "uncached": ("dbcache_compile: torch.compile / transformer.compile() / torch.export around a transformer "
                 "optimized by dbcache_compile.optimize(cache=None, ...) (the uncached baseline: compiled and/or "
                 "quantized by optimize) is not supported: call dbcache_compile.disable() first and compile the "
                 "model yourself, or keep optimize's compile"),
    "export": ("dbcache_compile: torch.export around a transformer optimized by dbcache_compile is not supported (its "
               "per-call bookkeeping runs outside the graph); export the cached step with dbcache_compile.export(pipe, "
               "example_inputs, path, cache=...) and run it with dbcache_compile.load(path)"),
    "quantized": ("dbcache_compile: torch.compile around a transformer optimized by dbcache_compile traces the cache "
                  "step with torch.cond, which rejects tensor-subclass (torchao) weights in torch 2.11-2.14; compile "
                  "through the cache instead: dbcache_compile.optimize(pipe, cache=..., quantize=..., mode='default', "
                  "graph='regional' or 'segments')"),
    "parallel": ("dbcache_compile: torch.compile around a transformer optimized by dbcache_compile under context "
                 "parallelism (or with other diffusers hooks inside the cache's) is not supported; "
                 + _COMPILE_THROUGH),
    "dynamic": ("dbcache_compile: torch.compile(..., dynamic=True) around a transformer optimized by dbcache_compile "
                "needs torch._dynamo.config.specialize_float = True: dynamic=True makes the blocks' float attributes "
                "symbolic, and torch.cond (the cache's decision) takes no symbolic float in torch 2.13"),
    "structure": ("dbcache_compile: under torch.compile, the output structure of a middle block of this family is not "
                  "known inside the trace (no block of its class ran outside the cache's torch.cond); run one "
                  "generation without the compile first (it records the structures), then compile"),
    "control": ("dbcache_compile: under your own torch.compile the cache does not run inputs that add to the hidden "
                "stream between the blocks a hit skips (ControlNet residuals, Wan VACE hints, Wan Animate's face "
                "adapter: Family.index_added / block_residual_inputs); run such calls through "
                "dbcache_compile.optimize(pipe, cache=..., mode=...) or without the compile"),
    "input": ("dbcache_compile: this call cannot run the cache (an input the cache does not implement, or another "
              "diffusers cache on the transformer); run it without torch.compile to see which"),
    "package": ("dbcache_compile: a transformer loaded from a dbcache_compile package (dbcache_compile.load) runs an "
                "AOTInductor package and cannot be traced by torch.compile / torch.export: it is already compiled"),
}


class UserCompileError(RuntimeError):
    """A combination of the user's own compile / export with the cache that cannot work (module doc)."""


def _raiser(kind: str) -> Callable[[str], None]:
    def raise_refusal(detail: str = "") -> None:
        raise UserCompileError(REASONS[kind] + (f" ({detail})" if detail else ""))

    raise_refusal.__name__ = raise_refusal.__qualname__ = f"dbcache_compile_refuses_{kind}"
    return torch.compiler.disable(raise_refusal, reason=REASONS[kind])


_RAISERS: dict[str, Callable[[str], None]] = {kind: _raiser(kind) for kind in REASONS}


def refuse(kind: str, detail: str = "") -> None:
    """Raise refusal ``kind`` (a key of :data:`REASONS`), as the module doc says, whether or not Dynamo traces."""
    _RAISERS[kind](detail)


def refuse_while_compiling(kind: str = "cache", detail: str = "") -> None:
    """:func:`refuse` when a trace (Dynamo or ``torch.export``) runs this code."""
    if torch.compiler.is_compiling():
        refuse(kind, detail)


# ------------------------------------------------------------------------------------------------ the fullgraph form
#: handle -> the UserCompiled of a live runtime (the custom ops take the handle as a string: Dynamo keeps it a
#: constant, where an int attribute becomes a symbol under dynamic=True)
_LIVE: "weakref.WeakValueDictionary[int, UserCompiled]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


@torch.library.custom_op("dbcache_compile::user_begin", mutates_args=())
def _user_begin(handle: str, names: str, top: list[torch.Tensor], conditioning: list[torch.Tensor],
                latents: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return _LIVE[int(handle)].begin(names.split(","), top, conditioning, latents)


@_user_begin.register_fake
def _user_begin_fake(handle, names, top, conditioning, latents):
    return _LIVE[int(handle)].begin_fake(names.split(","), top)


@torch.library.custom_op("dbcache_compile::user_end", mutates_args=())
def _user_end(handle: str, out: torch.Tensor, pred: torch.Tensor, diff: torch.Tensor, counters: torch.Tensor,
              fn_residual: torch.Tensor, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor]) -> torch.Tensor:
    return _LIVE[int(handle)].end(out, pred, diff, counters, fn_residual, ladder_h, ladder_e)


@_user_end.register_fake
def _user_end_fake(handle, out, pred, diff, counters, fn_residual, ladder_h, ladder_e):
    return torch.empty_like(out)


#: the steps mask rides in the graph as a bool vector padded to a multiple of this (so ``reconfigure`` with another
#: mask of the same bucket needs no recompile)
MASK_BUCKET = 64


def _mask_length(config: Any) -> int:
    """The padded length of the config's mask vector (``gate_tensors``: the mask and at least one ``False``)."""
    return -(-max(len(gates_of(config).mask) + 1, 2) // MASK_BUCKET) * MASK_BUCKET


def _padded_mask(mask: torch.Tensor) -> torch.Tensor:
    length = -(-mask.shape[0] // MASK_BUCKET) * MASK_BUCKET
    return torch.nn.functional.pad(mask, (0, length - mask.shape[0])) if length != mask.shape[0] else mask


class UserCompiled:
    """The fullgraph form of a prologue family's cached forward under the user's compile (module doc). Made with
    the runtime (eagerly: Dynamo cannot make custom-op handles or step objects while tracing)."""

    def __init__(self, runtime: Any) -> None:
        from diffusers.utils import apply_lora_scale

        self.runtime = runtime
        self.family = runtime.family_record
        # the same step as the runtime's, its blocks called plainly (the user's compile compiles them)
        self.step = CacheStep(runtime.transformer, runtime.family_record, runtime.cache_config, call_block)
        self.terms = runtime.cache_config.taylorseer_terms
        self.handle = str(next(_HANDLES))
        _LIVE[int(self.handle)] = self
        self._current: Optional[tuple] = None  # (state, step, key) between user_begin and user_end
        self._open = False  # a user_begin without its user_end: that call raised
        self._mask_len: Optional[int] = None  # the padded mask length the graph was traced with
        self._gates: Optional[tuple] = None  # (config, device, gate tensors)
        self.forward = apply_lora_scale(runtime.family_record.attention_kwargs)(self._forward)

    # ---------------------------------------------------------------------------------------- traced
    def _forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        return_dict = kwargs.pop("return_dict", True)
        named = self.family.named_inputs(args, kwargs)
        names = [name for name, value in named.items() if isinstance(value, torch.Tensor)]
        conditioning = runtime.inputs.conditioning(args, kwargs)
        latents = runtime.inputs.latents(args, kwargs)
        outs = torch.ops.dbcache_compile.user_begin(self.handle, ",".join(names), [named[n] for n in names], conditioning,
                                                    latents)
        terms = self.terms
        step, counters, fn_residual = outs[:3]
        ladder_h, ladder_e = list(outs[3:3 + terms]), list(outs[3 + terms:3 + 2 * terms])
        gates = Gates(*outs[3 + 2 * terms:])
        kwargs = self.family.eager_inputs(module, args, kwargs)
        self.step.config = runtime.cache_config
        out, pred, diff, counters, fn_residual, ladder_h, ladder_e = self.step.cond_step_functional(
            step, counters, fn_residual, ladder_h, ladder_e, *args, gates=gates, **kwargs)
        out = torch.ops.dbcache_compile.user_end(self.handle, out, pred, diff, counters, fn_residual, list(ladder_h),
                                                 list(ladder_e))
        return transformer_output(out, return_dict)

    # ---------------------------------------------------------------------------------------- run time
    def _shapes(self, names: list[str], top: list[torch.Tensor]) -> tuple:
        runtime = self.runtime
        shapes = self.family.stream_shapes(runtime.transformer, (), dict(zip(names, top)))
        if shapes is None:
            raise UserCompileError(f"dbcache_compile: the {self.family.name} family cannot predict its stream shapes "
                                   f"for these inputs, which the fullgraph form under torch.compile needs; compile "
                                   f"through the cache instead (optimize(..., mode='default'))")
        return shapes

    def _gate_tensors(self, device: torch.device) -> list[torch.Tensor]:
        config = self.runtime.cache_config
        if self._gates is None or self._gates[0] is not config or self._gates[1] != device:
            gates = gate_tensors(config, device)
            self._gates = (config, device, [*gates[:5], _padded_mask(gates.mask)])
        return self._gates[2]

    def begin_fake(self, names: list[str], top: list[torch.Tensor]) -> list[torch.Tensor]:
        (hidden_shape, hidden_dtype), (encoder_shape, encoder_dtype) = self._shapes(names, top)
        device = top[0].device
        self._mask_len = _mask_length(self.runtime.cache_config)
        gates = [torch.empty(1, dtype=torch.float64, device=device)]
        gates += [torch.empty(1, dtype=torch.int64, device=device) for _ in range(4)]
        gates.append(torch.empty(self._mask_len, dtype=torch.bool, device=device))
        state = [torch.empty((), dtype=torch.int64, device=device), torch.empty(6, dtype=torch.int64, device=device),
                 torch.empty(hidden_shape, dtype=hidden_dtype, device=device)]
        state += [torch.empty(hidden_shape, dtype=hidden_dtype, device=device) for _ in range(self.terms)]
        state += [torch.empty(encoder_shape, dtype=encoder_dtype, device=device) for _ in range(self.terms)]
        return state + gates

    def begin(self, names: list[str], top: list[torch.Tensor], conditioning: list[torch.Tensor],
              latents: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """The per-call bookkeeping of ``CacheRuntime._whole`` on the caller's tensors: the branch, its step, its
        buffers (allocated at a new input signature), copies of its state for the graph."""
        runtime = self.runtime
        if self._open:  # the previous call raised between user_begin and user_end: its state may be half updated
            runtime.reset()
        self._open = True
        runtime.inputs._pending = (list(conditioning), latents)
        kwargs = dict(zip(names, top))
        state, step, key = runtime._begin((), kwargs)
        device = top[0].device
        if state.key != key or state.fn_residual is None:
            (hidden_shape, hidden_dtype), (encoder_shape, encoder_dtype) = self._shapes(names, top)
            state.allocate_shapes(hidden_shape, hidden_dtype, encoder_shape, encoder_dtype, device)
            state.device_counters = None
        if state.device_counters is None or step == 0:
            state.device_counters = counters_from_host(state, device)
        self._current = (state, step, key)
        gates = self._gate_tensors(device)
        if self._mask_len is not None and gates[5].shape[0] != self._mask_len:
            raise UserCompileError(f"dbcache_compile: reconfigure() changed the steps mask to {gates[5].shape[0]} "
                                   f"entries, the compiled graph holds {self._mask_len}; call torch._dynamo.reset() "
                                   f"(or compile again) after such a reconfigure")
        step_t = torch.full((), step, dtype=torch.int64, device=device)
        # copies: Inductor may reuse a custom op's output buffers for its intermediates
        buffers = [state.device_counters, state.fn_residual, *state.ladder_h, *state.ladder_e, *gates]
        return [step_t, *(b.clone() for b in buffers)]

    def end(self, out: torch.Tensor, pred: torch.Tensor, diff: torch.Tensor, counters: torch.Tensor,
            fn_residual: torch.Tensor, ladder_h: list[torch.Tensor], ladder_e: list[torch.Tensor]) -> torch.Tensor:
        """The step's new state into the branch's buffers, its record for ``summary()``, the step counted."""
        state, step, key = self._current
        for buf, value in zip([state.device_counters, state.fn_residual, *state.ladder_h, *state.ladder_e],
                              [counters, fn_residual, *ladder_h, *ladder_e]):
            buf.copy_(value)
        state.records.append((step, pred.clone(), diff.clone()))
        self.runtime._end(state, key)
        self._current, self._open = None, False
        return out.clone()


def traced_forward(runtime: Any, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
    """``CacheRuntime.forward`` while a trace runs it: the fullgraph form where it works, else a named refusal."""
    if torch.compiler.is_exporting():
        refuse("export")
    user = getattr(runtime, "user_compiled", None)
    if user is None:
        user = getattr(runtime, "user_hooks", None)
        if user is None:
            refuse("cache")
    if runtime.applied.quantized:
        refuse("quantized")
    if cp_group(module) is not None or inner_hooks(module, "dbcache_compile"):
        refuse("parallel")
    if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
        return original(*args, **kwargs)
    config = torch._dynamo.config
    if not config.assume_static_by_default and not config.specialize_float:  # dynamic=True
        refuse("dynamic")
    named = runtime.family_record.named_inputs(args, kwargs)
    if getattr(module, "_cache_config", None) is not None or any(
            passes(named, name) for name in runtime.unsupported):
        refuse("input")
    # inputs added between blocks by index (families that name them; their eager / regional paths run them)
    added = (*getattr(runtime, "index_added", ()), *getattr(runtime.family_record, "block_residual_inputs", ()))
    by_name = dict(zip(runtime.inputs.params, args), **kwargs)
    passed = next((name for name in added if passes(by_name, name)), None)
    if passed is not None:
        refuse("control", f"`{passed}`")
    runtime.inputs._pending = None  # what the forward pre-hook captured is read at run time (UserCompiled.begin)
    if isinstance(user, UserCompiledHooks):
        return user.forward(module, original, args, kwargs)
    return user.forward(module, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ compiled blocks
class CompiledBlockCall:
    """Stands in a hooked block's ``_compiled_call_impl`` after ``compile_repeated_blocks()`` / ``block.compile()``
    on a family whose cache runs from block hooks: the block hook's bookkeeping and host decision run eagerly around
    the call, and the user's compiled ``_call_impl`` computes the block, with the block hook passing straight through
    to the block's forward inside it (:attr:`BlockHook.through`). So the user's compile traces the block alone: one
    graph per block class, nothing of the cache's state."""

    def __init__(self, hook: Any, block: torch.nn.Module, compiled: Callable) -> None:
        self.hook = hook
        self.block = weakref.ref(block)
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = self.hook
        return hook.runtime.block_forward(hook.chain, hook.index, self.block(), self.compiled, args, kwargs)


def route_compiled_blocks(block_hooks: dict) -> None:
    """Blocks compiled in place since the last check (``module.compile()`` sets ``_compiled_call_impl``): their
    compiled call goes through :class:`CompiledBlockCall`. Called at the start of every generation."""
    for block, hook in block_hooks.items():
        compiled = getattr(block, "_compiled_call_impl", None)
        if compiled is not None and not isinstance(compiled, CompiledBlockCall):
            hook.through = True
            block._compiled_call_impl = CompiledBlockCall(hook, block, compiled)


def unroute_compiled_block(block: torch.nn.Module) -> None:
    """The block hook is removed (``disable``): the block's compiled call is the user's again."""
    compiled = getattr(block, "_compiled_call_impl", None)
    if isinstance(compiled, CompiledBlockCall):
        block._compiled_call_impl = compiled.compiled


# ------------------------------------------------------------------------------------------------ hook families
@torch.library.custom_op("dbcache_compile::user_begin_hooks", mutates_args=())
def _user_begin_hooks(handle: str, names: str, top: list[torch.Tensor], conditioning: list[torch.Tensor],
                      latents: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return _LIVE[int(handle)].begin(names.split(","), top, conditioning, latents)


@_user_begin_hooks.register_fake
def _user_begin_hooks_fake(handle, names, top, conditioning, latents):
    return _LIVE[int(handle)].begin_fake(top)


@torch.library.custom_op("dbcache_compile::user_state", mutates_args=())
def _user_state(handle: str, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return _LIVE[int(handle)].load(key, like)


@_user_state.register_fake
def _user_state_fake(handle, key, like):
    return _LIVE[int(handle)].load_fake(key, like)


@torch.library.custom_op("dbcache_compile::user_end_hooks", mutates_args=())
def _user_end_hooks(handle: str, keys: str, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    return _LIVE[int(handle)].end(keys, tensors, out)


@_user_end_hooks.register_fake
def _user_end_hooks_fake(handle, keys, tensors, out):
    return torch.empty_like(out)


class _Trace:
    """What the block hooks of one traced forward share (Python values of the trace, never of a run)."""

    def __init__(self, step: torch.Tensor, gates: Gates, counters: list[torch.Tensor]) -> None:
        self.step, self.gates, self.counters = step, gates, counters
        self.chains: list[dict] = [{} for _ in counters]
        self.new: list[tuple[str, list[torch.Tensor]]] = []  # (key, tensors) handed to user_end_hooks
        self.structures: dict[tuple[int, int], Any] = {}  # output structures of the blocks run in this trace


class UserCompiledHooks:
    """The fullgraph form of a family whose cache runs from block hooks, under the user's compile (module doc):
    the model's forward traced as it is, the Fn and Bn blocks run as the model calls them, each block list's middle
    group is one ``torch.cond`` at its first block (the cached / forecast residual, or the group's blocks), its other
    blocks hand their inputs through. The bookkeeping runs in custom ops at run time: ``user_begin_hooks`` (the
    branch, its step, counters per chain, the gate numbers), ``user_state`` (a copy of one buffer, allocated like the
    trace's tensor at a new input signature), ``user_end_hooks`` (the new state back, the records)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.terms = runtime.cache_config.taylorseer_terms
        self.handle = str(next(_HANDLES))
        _LIVE[int(self.handle)] = self
        self.trace: Optional[_Trace] = None
        self._current: Optional[tuple] = None
        self._open = False
        self._mask_len: Optional[int] = None
        self._gates: Optional[tuple] = None
        from .step import plain_call
        from .runtime import BLOCK_HOOK_NAME
        self._call = plain_call(BLOCK_HOOK_NAME)
        # the custom ops' buffer keys, made here: under dynamic=True the hooks' chain / block indices are symbolic
        # ints, which a traced f-string cannot format
        self._keys = [{"fn": f"c{c}.fn", "cnt": f"c{c}.cnt", "rec": f"c{c}.rec",
                       "lists": [f"c{c}.l{j}" for j in range(max(chain.mid_spans, default=-1) + 1)]}
                      for c, chain in enumerate(runtime.chains)]

    _gate_tensors = UserCompiled._gate_tensors

    # ---------------------------------------------------------------------------------------- traced
    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        runtime = self.runtime
        named = dict(zip(runtime.inputs.params, args), **kwargs)
        names = [name for name, value in named.items() if isinstance(value, torch.Tensor)]
        conditioning = runtime.inputs.conditioning(args, kwargs)
        latents = runtime.inputs.latents(args, kwargs)
        outs = torch.ops.dbcache_compile.user_begin_hooks(self.handle, ",".join(names), [named[n] for n in names],
                                                          conditioning, latents)
        self.trace = _Trace(outs[0], Gates(*outs[1:7]), list(outs[7:]))
        try:
            out = original(*args, **kwargs)
        finally:
            trace, self.trace = self.trace, None
        leaves, spec = torch.utils._pytree.tree_flatten(out)
        first = next(k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        keys = ",".join(f"{key}:{len(tensors)}" for key, tensors in trace.new)
        leaves[first] = torch.ops.dbcache_compile.user_end_hooks(
            self.handle, keys, [t for _, tensors in trace.new for t in tensors], leaves[first])
        return torch.utils._pytree.tree_unflatten(leaves, spec)

    def block(self, c: int, i: int, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        from .decision import cache_allowed, hit_predicate, recorded_diff, relative_l1
        from .state import taylor_coefficients_tensor, taylor_forecast, taylor_update
        from .step import CACHED, CONSECUTIVE, HAS_PREV, LAST_CACHED, LAST_COMPUTE, VALID
        runtime, trace, terms = self.runtime, self.trace, self.terms
        chain, info = runtime.chains[c], trace.chains[c]
        io = chain.ios[i]
        hidden, encoder = io.streams(args, kwargs)
        step, gates, counters = trace.step, trace.gates, trace.counters[c]
        if i == 0:
            info["base"] = hidden
        first, end = chain.group_of(i)
        if chain.fn <= i < chain.mid_end:  # a middle group
            if i != first:
                return io.output(self._structure(c, i, chain), hidden, encoder)
            j = chain.first_mid[i]
            like = [hidden] + ([encoder] if encoder is not None else [])
            keys = self._keys[c]
            ladder = torch.ops.dbcache_compile.user_state(self.handle, keys["lists"][j], like)
            ladder_h, ladder_e = list(ladder[:terms]), list(ladder[terms:])
            pred = info["pred"]
            coeffs = taylor_coefficients_tensor(step - counters[LAST_COMPUTE], counters[VALID], terms)
            group_args, group_kwargs = io.with_streams(args, kwargs, None, None)
            blocks, ios, call = chain.blocks[first:end], chain.ios[first:end], self._call

            def hit_fn(h, e, coeffs, ladder_h, ladder_e):
                out = [taylor_forecast(ladder_h, coeffs)]
                out += [taylor_forecast(ladder_e, coeffs)] if ladder_e else []
                return tuple((d.clone() if terms == 1 else d).flatten() for d in out)

            def miss_fn(h, e, coeffs, ladder_h, ladder_e):
                mid_h, mid_e = h, (e if encoder is not None else None)
                for block, block_io in zip(blocks, ios):
                    a, kw = block_io.with_streams(group_args, group_kwargs, mid_h, mid_e)
                    mid_h, mid_e = block_io.out_streams(call(block, block_io, a, kw))
                out = [(mid_h - h).contiguous().flatten()]
                if ladder_e:  # a block that drops the encoder stream (SD3's last): no encoder residual
                    out.append(((mid_e if mid_e is not None else e) - e).contiguous().flatten())
                return tuple(out)

            enc = encoder.clone() if encoder is not None else hidden.new_zeros(())
            deltas = torch.cond(pred, hit_fn, miss_fn, (hidden.clone(), enc, coeffs, ladder_h, ladder_e))
            dh = deltas[0].view(hidden.shape)
            window = (step - counters[LAST_COMPUTE]).to(torch.float32)
            n = torch.where(step > 2, torch.clamp(counters[VALID], max=terms - 1), 0)
            new = [torch.where(pred, old, upd) for old, upd in zip(ladder_h, taylor_update(ladder_h, dh, window, n))]
            hidden = hidden + dh
            if ladder_e:
                de = deltas[1].view(encoder.shape)
                new += [torch.where(pred, old, upd)
                        for old, upd in zip(ladder_e, taylor_update(ladder_e, de, window, n))]
                encoder = encoder + de
            trace.new.append((keys["lists"][j], new))
            return io.output(self._structure(c, i, chain), hidden, encoder)
        out = original(*args, **kwargs)  # an Fn or Bn block, as the model calls it
        trace.structures[c, i] = BlockIO.structure(out)  # (never into the runtime's: a guard on its length)
        if i == chain.fn - 1:
            out_h, _ = io.out_streams(out)
            residual = out_h - info["base"]
            keys = self._keys[c]
            fn_prev = torch.ops.dbcache_compile.user_state(self.handle, keys["fn"], [residual])[0]
            diff = relative_l1(fn_prev, residual)
            consecutive = torch.where(counters[LAST_CACHED] == step - 1, counters[CONSECUTIVE], 0)
            allowed = cache_allowed(gates, step, counters[CACHED], consecutive, counters[HAS_PREV])
            pred = hit_predicate(gates, allowed, diff)
            info["pred"] = pred
            n = torch.where(step > 2, torch.clamp(counters[VALID], max=terms - 1), 0)
            one = torch.ones_like(counters[CACHED])
            on_hit = torch.stack([counters[CACHED] + 1, consecutive + 1, counters[HAS_PREV],
                                  counters[LAST_COMPUTE], counters[VALID], step * one])
            on_miss = torch.stack([counters[CACHED], consecutive, one, step * one, 1 + n, counters[LAST_CACHED]])
            trace.new.append((keys["fn"], [torch.where(pred, fn_prev, residual)]))
            trace.new.append((keys["cnt"], [torch.where(pred, on_hit, on_miss)]))
            trace.new.append((keys["rec"], [pred, recorded_diff(gates, allowed, diff)]))
        return out

    def _structure(self, c: int, i: int, chain: Any) -> Any:
        """The output structure of middle block ``i`` (it runs inside the cond): recorded by an eager step, else
        that of a block of the same class run in this trace (the Fn blocks), else, for a dual-stream block, both
        streams at its contract's positions; a single-stream block of a class not seen yet is refused by name."""
        known = self.runtime.structure.get((c, i))
        if known is not None:
            return known
        cls = type(chain.blocks[i])
        for (c2, k), structure in self.trace.structures.items():
            if type(self.runtime.chains[c2].blocks[k]) is cls:
                return structure
        io = chain.ios[i]
        if io.encoder_out is not None:  # a dual-stream block returns both streams (its contract's positions)
            return max(io.hidden_out, io.encoder_out) + 1, frozenset()
        refuse("structure")

    # ---------------------------------------------------------------------------------------- run time
    def begin_fake(self, top: list[torch.Tensor]) -> list[torch.Tensor]:
        device = top[0].device
        self._mask_len = _mask_length(self.runtime.cache_config)
        out = [torch.empty((), dtype=torch.int64, device=device), torch.empty(1, dtype=torch.float64, device=device)]
        out += [torch.empty(1, dtype=torch.int64, device=device) for _ in range(4)]
        out.append(torch.empty(self._mask_len, dtype=torch.bool, device=device))
        return out + [torch.empty(6, dtype=torch.int64, device=device) for _ in self.runtime.chains]

    def begin(self, names: list[str], top: list[torch.Tensor], conditioning: list[torch.Tensor],
              latents: Optional[torch.Tensor]) -> list[torch.Tensor]:
        runtime = self.runtime
        if self._open:
            runtime.reset()
        self._open = True
        runtime.inputs._pending = (list(conditioning), latents)
        state, step, key = runtime._begin((), dict(zip(names, top)))
        device = top[0].device
        if state.key != key:
            state.drop_buffers()
        counters = []
        for c in range(len(runtime.chains)):
            chain_state = state.chain(c)
            chain_state.begin_step(step)
            if chain_state.device_counters is None or step == 0 or state.key != key:
                chain_state.device_counters = counters_from_host(chain_state, device)
            counters.append(chain_state.device_counters.clone())
        self._current = (state, step, key)
        gates = self._gate_tensors(device)
        if self._mask_len is not None and gates[5].shape[0] != self._mask_len:
            raise UserCompileError(f"dbcache_compile: reconfigure() changed the steps mask to {gates[5].shape[0]} "
                                   f"entries, the compiled graph holds {self._mask_len}; call torch._dynamo.reset() "
                                   f"(or compile again) after such a reconfigure")
        return [torch.full((), step, dtype=torch.int64, device=device), *(g.clone() for g in gates), *counters]

    def load_fake(self, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        if key.endswith(".fn"):
            return [torch.empty_like(like[0])]
        return [torch.empty_like(t) for t in like for _ in range(self.terms)]

    def load(self, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        state = self._current[0]
        c, part = key.split(".")
        chain_state = state.chain(int(c[1:]))
        if part == "fn":
            if chain_state.fn_residual is None or chain_state.fn_residual.shape != like[0].shape:
                chain_state.fn_residual = torch.zeros_like(like[0])
            return [chain_state.fn_residual.clone()]
        j = int(part[1:])
        ladder = chain_state.ladders.get(j)
        if ladder is None or ladder[0][0].shape != like[0].shape or (ladder[1][0] is not None) != (len(like) > 1):
            chain_state.allocate_ladder(j, like[0], like[1] if len(like) > 1 else None)
        ladder_h, ladder_e = chain_state.ladders[j]
        return [t.clone() for t in ladder_h] + [t.clone() for t in ladder_e if t is not None]

    def end(self, keys: str, tensors: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        state, step, key = self._current
        at = 0
        for item in keys.split(",") if keys else []:
            name, count = item.split(":")
            values = tensors[at:at + int(count)]
            at += int(count)
            c, part = name.split(".")
            chain_state = state.chain(int(c[1:]))
            if part == "fn":
                chain_state.fn_residual.copy_(values[0])
            elif part == "cnt":
                chain_state.device_counters.copy_(values[0])
            elif part == "rec":
                chain_state.records.append((step, values[0].clone(), values[1].clone()))
            else:
                ladder_h, ladder_e = chain_state.ladders[int(part[1:])]
                for buf, value in zip([*ladder_h, *(t for t in ladder_e if t is not None)], values):
                    buf.copy_(value)
        self.runtime._end(state, key)
        self._current, self._open = None, False
        return out.clone()


def traced_block(runtime: Any, c: int, i: int, module: torch.nn.Module, original: Callable, args: tuple,
                 kwargs: dict) -> Any:
    """``CacheRuntime.block_forward`` while a trace runs it."""
    user = getattr(runtime, "user_hooks", None)
    if user is not None and user.trace is not None:
        return user.block(c, i, module, original, args, kwargs)
    if runtime.calls is None:  # a block called outside a cached forward
        return original(*args, **kwargs)
    refuse("blocks")
