"""Lowerings: how a :class:`~dbcache_compile.step.CacheStep` runs, one small object each, chosen once by
:func:`dbcache_compile.optimize`.

* :class:`Eager`: the segments as plain PyTorch; one host read of (predicate, diff) per step whose gates allow a hit.
* :class:`Segments`: ``head`` / ``miss`` / ``hit`` are each a ``torch.compile(fullgraph=True)`` graph (CUDA-graphed
  by cudagraph trees under ``reduce-overhead`` / ``max-autotune`` on CUDA); the host picks the path with the same
  single read as eager, and skips it on steps the gates force to compute.
* :class:`Regional`: each block compiled as its own region (one per block class), the glue plain PyTorch; on CUDA with
  a CUDA-graph mode each segment is captured by hand as one CUDA graph (:mod:`dbcache_compile.cudagraphs`). Same host
  logic as ``Segments``; compiles in seconds where whole-segment graphs of a FLUX-size model take minutes.
* :class:`Cond`: the whole forward is ONE graph; the decision is ``torch.cond`` on a device predicate, the counters
  and the config's gate numbers (threshold, warm-up, limits, steps mask: graph inputs, so ``reconfigure`` needs no
  recompile) live on the device and the state is carried functionally. No host sync per step, no graph break,
  exportable;
  Inductor disables CUDA graphs for any graph with a cond (torch 2.11-2.14), which :meth:`Lowering.cudagraph_status`
  reports.

Every lowering runs the first step of a branch at a new input signature as :meth:`Lowering.first_step`: the buffers
are allocated from the shapes the adapter predicts, then the step runs like every later one (:meth:`Lowering.run`),
so the embeddings and Fn blocks run once per forward; only an adapter that predicts no shapes falls back to
:meth:`CacheStep.first_step` (segments uncompiled, buffers from their real outputs).
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch

from .cudagraphs import SegmentGraphs
from .decision import DIFF_ALWAYS_HIT, Gates, cache_allowed, gate_tensors, hit_predicate, read_decision_sync
from .state import BranchState
from .parallel import split_like
from .step import CacheStep, counters_from_host, fresh_function, initial_counters, region_call

__all__ = ["Lowering", "Eager", "Segments", "Regional", "Cond", "CUDAGRAPH_MODES", "LOWERINGS", "regional_options",
           "compile_method", "build_lowering", "Compiled", "CompiledSet"]

LOWERINGS = ("eager", "segments", "cond", "regional")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def regional_options(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` options of block regions: CUDA graphs are captured around whole segments instead (by
    hand), so the regions themselves are compiled without cudagraph trees."""
    opts = dict(options)
    if "backend" not in opts and opts.get("mode") in CUDAGRAPH_MODES:
        opts["mode"] = "max-autotune-no-cudagraphs" if opts["mode"] == "max-autotune" else "default"
    return opts


class CompiledSet:
    """The compiled functions of one runtime: the calls each ran uncompiled at its recompile limit (``fallbacks``,
    shown by ``summary()``), and their release at ``disable()``. Each runtime compiles fresh code objects (its own
    budget, :func:`~dbcache_compile.step.fresh_function`), and Dynamo keeps a code object's compiled entries (graph
    modules, guards, fake tensors) until told to drop them: without :meth:`release` every optimize / disable cycle
    of a notebook sweep or a server would keep its graphs alive (measured: ``bench/results/soak-cpu-2026-11-26``)."""

    def __init__(self) -> None:
        self.fallbacks: dict[str, int] = {}
        self.items: list["Compiled"] = []

    def compile(self, name: str, fn: Callable, options: dict[str, Any]) -> "Compiled":
        compiled = Compiled(name, fn, options, self)
        self.items.append(compiled)
        return compiled

    def release(self) -> None:
        """Drop Dynamo's compiled entries of every function compiled here, and the finalizers Dynamo's guards put on
        the objects they guard (the model's modules, which live on): each holds its guard manager, and through it
        the compile's state, until the module dies (torch 2.11-2.14 does not detach them when a code's entries are
        reset). Only our own entries' finalizers are detached."""
        from torch._C._dynamo.eval_frame import reset_code
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        managers = set()
        for compiled in self.items:
            managers.update(id(entry.guard_manager) for entry in _debug_get_cache_entry_list(compiled.code))
            reset_code(compiled.code)
        self.items.clear()
        _detach_guard_finalizers(managers)


def _detach_guard_finalizers(managers: set[int]) -> None:
    """Detach the ``weakref.finalize`` callbacks of Dynamo's ``CheckFunctionManager.invalidate`` whose guard manager
    is one of ``managers`` (see :meth:`CompiledSet.release`)."""
    import functools
    import weakref

    from torch._dynamo.guards import CheckFunctionManager
    if not managers:
        return
    for finalizer in list(getattr(weakref.finalize, "_registry", {})):
        info = finalizer.peek()
        func = info[1] if info else None
        if not (isinstance(func, functools.partial) and getattr(func.func, "__func__", None)
                is CheckFunctionManager.invalidate):
            continue
        owner = func.func.__self__
        if id(getattr(owner, "guard_manager", None)) in managers:
            finalizer.detach()


class Compiled:
    """A compiled callable that, when Dynamo's recompile limit for it is reached (a new shape after its budget is
    spent), runs its plain function for that call instead of failing the request, counted in its
    :class:`CompiledSet`'s ``fallbacks`` (shown by ``summary()``) and warned about once. Nothing runs before Dynamo
    refuses, so the retry is safe."""

    def __init__(self, name: str, fn: Callable, options: dict[str, Any], owner: CompiledSet) -> None:
        self.name = name
        self.fn = fn
        self.code = getattr(fn, "__code__", None) or fn.__func__.__code__
        self.compiled = torch.compile(fn, **options)
        self.fallbacks = owner.fallbacks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self.fallbacks.get(self.name):
                import warnings
                warnings.warn(f"dbcache_compile: torch's recompile limit ({torch._dynamo.config.recompile_limit}) is "
                              f"reached for the {self.name!r} graph of this transformer; calls with new input shapes "
                              f"run it uncompiled (see summary().compile_fallbacks). Pass compile_options="
                              f"{{'dynamic': True}} for shape-generic graphs, or raise "
                              f"torch._dynamo.config.recompile_limit", stacklevel=3)
            self.fallbacks[self.name] = self.fallbacks.get(self.name, 0) + 1
            return self.fn(*args, **kwargs)


def compile_method(method: Callable, owner: Any, options: dict[str, Any], compiled: CompiledSet) -> Compiled:
    """``torch.compile`` of ``owner.method`` through a fresh code object (its own compiled entries and recompile
    budget per cached transformer, see :func:`~dbcache_compile.step.fresh_function`), with :class:`Compiled`'s
    reported fallback."""
    return compiled.compile(method.__name__, types.MethodType(fresh_function(method), owner), options)


class Lowering:
    """Runs the cache step of one transformer. Subclasses set ``name`` and the three segment callables."""

    name = "base"
    #: whether outputs live in a CUDA-graph pool (the runtime hands the pipeline a copy)
    graphed = False

    def __init__(self, step: CacheStep, mode: Optional[str] = None) -> None:
        self.step = step
        self.config = step.config
        self.mode = mode
        #: a value that changes what the segments compute without being their argument (the LoRA scale); set by
        #: the runtime before each step, part of a hand-captured graph's key
        self.variant: Any = None
        #: the functions this lowering compiled (fallback counts; released by disable())
        self.compiled = CompiledSet()

    def first_step(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The first step of a branch at a new input signature: buffers from the adapter's predicted shapes, then the
        usual :meth:`run` (so the first generation at a shape computes exactly like the later ones); without a
        prediction, :meth:`CacheStep.first_step` (segments uncompiled, buffers from their outputs)."""
        step_fns = self.step
        shapes = step_fns.adapter.stream_shapes(step_fns.transformer, args, kwargs)
        if shapes is not None and step_fns.cp_group is not None:
            # under context parallelism the first block may shard the streams (Qwen-Image): shard the shapes alike
            shapes = tuple((split_like(step_fns.fn_blocks[0], torch.empty(shape, device="meta"), argument).shape,
                            dtype) for (shape, dtype), argument in zip(shapes, ("hidden_states",
                                                                                 "encoder_hidden_states")))
        if shapes is None:
            out = step_fns.first_step(state, step, args, kwargs)
            self.new_buffers(state)
            return out
        (hidden_shape, hidden_dtype), (encoder_shape, encoder_dtype) = shapes
        device = next(iter(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))).device
        state.allocate_shapes(hidden_shape, hidden_dtype, encoder_shape, encoder_dtype, device)
        self.new_buffers(state)
        return self.run(state, step, args, kwargs)

    @staticmethod
    def check_streams(state: BranchState, residual: torch.Tensor, encoder: torch.Tensor) -> None:
        """The buffers must have the Fn outputs' shapes (a mismatch would broadcast silently in ``copy_``)."""
        if residual.shape != state.fn_residual.shape or encoder.shape != state.ladder_e[0].shape:
            raise RuntimeError(f"dbcache_compile: the Fn blocks returned streams of shapes {tuple(residual.shape)} / "
                               f"{tuple(encoder.shape)} but the adapter predicted {tuple(state.fn_residual.shape)} / "
                               f"{tuple(state.ladder_e[0].shape)}; please report this adapter bug")

    def new_buffers(self, state: BranchState) -> None:
        """A branch allocated buffers (new shape, dtype or device)."""

    def start_generation(self, state: BranchState) -> None:
        """A branch starts a new generation (its host counters were just reset)."""

    def run(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def fold(self, states: list[BranchState]) -> None:
        """Bring device-side records into the branches' host lists (``cond``); a no-op for host lowerings."""

    def cudagraph_status(self, device: torch.device) -> str:
        return "off (eager)"


class Eager(Lowering):
    """The segments as plain PyTorch, decided on the host (module doc)."""

    name = "eager"
    #: whether the per-step numbers reach the segments as static device scalars (graphs) or Python numbers
    scalars_on_device = False

    def __init__(self, step: CacheStep, mode: Optional[str] = None) -> None:
        super().__init__(step, mode)
        self._head: Callable = step.head_diff
        self._miss: Callable = step.miss
        self._hit: Callable = step.hit

    def _call(self, name: str, fn: Callable, args: tuple, kwargs: Optional[dict] = None,
              mutated: tuple = ()) -> Any:
        return fn(*args, **(kwargs or {}))

    def run(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """One step with host counters; reads the device at most once (only when the gates allow a hit).

        Graphs (compiled segments, segment CUDA graphs) take the per-step numbers (TaylorSeer window, derivative
        count, forecast coefficients) in the branch's static scalar tensors, filled by kernel launches: no
        host-to-device copy (a stream sync) and no recompile or recapture per value."""
        config = self.config
        hidden, encoder, residual, diff, kw = self._call("head", self._head, (state.fn_residual, *args), kwargs)
        if step == 0:
            self.check_streams(state, residual, encoder)
        use_cache = False
        if cache_allowed(config, step, len(state.cached_steps), state.consecutive, state.has_prev):
            use_cache, diff_value = read_decision_sync(hit_predicate(config, True, diff), diff)
            state.diffs[step] = DIFF_ALWAYS_HIT if config.residual_diff_threshold >= 1.0 else diff_value
        if use_cache:
            state.record_hit(step)
            coeffs: Any = state.forecast_coefficients(step)
            if self.scalars_on_device:
                coeffs = state.fill_coefficients(coeffs)
            return self._call("hit", self._hit, (state.ladder_h, state.ladder_e, hidden, encoder, kw, coeffs))
        n = state.derivatives_for_update(step)
        window: Any = step - state.last_compute
        n_arg: Any = n
        if self.scalars_on_device:
            window, n_arg = state.fill_update_scalars(window, n)
        out = self._call("miss", self._miss,
                         (state.fn_residual, state.ladder_h, state.ladder_e, hidden, encoder, residual, kw, window,
                          n_arg), mutated=(state.fn_residual, *state.ladder_h, *state.ladder_e))
        state.record_compute(step, n)
        return out


class Segments(Eager):
    """``head`` / ``miss`` / ``hit`` compiled whole (cudagraph trees on CUDA with a CUDA-graph mode)."""

    name = "segments"
    scalars_on_device = True

    def __init__(self, step: CacheStep, mode: Optional[str], options: dict[str, Any]) -> None:
        super().__init__(step, mode)
        self._head = compile_method(CacheStep.head_diff, step, options, self.compiled)
        self._miss = compile_method(CacheStep.miss, step, options, self.compiled)
        self._hit = compile_method(CacheStep.hit, step, options, self.compiled)
        self._trees = mode in CUDAGRAPH_MODES and "backend" not in options

    def new_buffers(self, state: BranchState) -> None:
        for buf in state.buffers:
            torch._dynamo.mark_static_address(buf)
        self.graphed = self._trees and state.fn_residual.device.type == "cuda"

    def run(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.graphed:
            torch.compiler.cudagraph_mark_step_begin()
        return super().run(state, step, args, kwargs)

    def cudagraph_status(self, device: torch.device) -> str:
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if not self._trees:
            return f"off (mode={self.mode})"
        from torch._dynamo.utils import counters
        skips = counters["inductor"]["cudagraph_skips"]
        return "captured (cudagraph trees, 0 skips)" if skips == 0 else f"skipped for {skips} graph(s): see logs"


class Regional(Eager):
    """Blocks compiled as regions, segments captured by hand as CUDA graphs on CUDA (module doc)."""

    name = "regional"

    def __init__(self, step: CacheStep, mode: Optional[str], options: dict[str, Any]) -> None:
        super().__init__(step, mode)
        self.graphs: Optional[SegmentGraphs] = None
        self._capture = mode in CUDAGRAPH_MODES and "backend" not in options

    @staticmethod
    def block_call(options: dict[str, Any], compiled: CompiledSet) -> Callable:
        """The compiled-region block call a regional :class:`CacheStep` is built with."""
        return region_call(regional_options(options), compiled)

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """Run the segments as hand-captured CUDA graphs (automatic on CUDA with a CUDA-graph mode); ``emulate=True``
        runs the same capture/replay bookkeeping without CUDA (tests)."""
        if self.graphs is None or self.graphs.emulate != emulate:
            self.graphs = SegmentGraphs(emulate=emulate)
            self._device = None
        return self.graphs

    def new_buffers(self, state: BranchState) -> None:
        device = state.fn_residual.device
        if self.graphs is not None and not self.graphs.emulate and device.type != "cuda":
            self.graphs = None  # the transformer moved off CUDA: no graphs there
        elif self.graphs is None and self._capture and device.type == "cuda":
            self.graphs = SegmentGraphs()
        if self.graphs is not None:
            self.graphs.mark_static(state.buffers)
        self.scalars_on_device = self.graphed = self.graphs is not None

    def _call(self, name: str, fn: Callable, args: tuple, kwargs: Optional[dict] = None,
              mutated: tuple = ()) -> Any:
        if self.graphs is None:
            return fn(*args, **(kwargs or {}))
        return self.graphs(name, fn, args, kwargs, mutated=mutated, variant=self.variant)

    def cudagraph_status(self, device: torch.device) -> str:
        if self.graphs is not None:
            kind = "emulated" if self.graphs.emulate else "captured"
            return (f"{kind} by hand: one CUDA graph per segment and input shape ({self.graphs.captures} captured, "
                    f"{self.graphs.replays} replays)")
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if not self._capture:
            return f"off (mode={self.mode})"
        return "not captured yet (each segment is captured at its first use)"


class Cond(Lowering):
    """One compiled graph per step with ``torch.cond`` and device counters (module doc)."""

    name = "cond"

    def __init__(self, step: CacheStep, mode: Optional[str], options: dict[str, Any]) -> None:
        super().__init__(step, mode)
        self._cond_step = compile_method(CacheStep.cond_step, step, options, self.compiled)
        self._gates: dict[torch.device, tuple[Any, Gates]] = {}

    def gates(self, device: torch.device) -> Gates:
        """The config's gate numbers as device tensors, inputs of the graph (refilled in place when ``reconfigure``
        changed the config; the mask's length is dynamic): a new config needs no recompile."""
        config, gates = self._gates.get(device, (None, None))
        if config is not self.config:
            gates = gate_tensors(self.config, device, out=gates)
            torch._dynamo.mark_dynamic(gates.mask, 0)
            self._gates[device] = (self.config, gates)
        return gates

    def new_buffers(self, state: BranchState) -> None:
        state.device_counters = counters_from_host(state, state.fn_residual.device)
        for buf in (state.device_counters, state.fn_residual, *state.ladder_h, *state.ladder_e):
            torch._dynamo.mark_static_address(buf)

    def start_generation(self, state: BranchState) -> None:
        if state.device_counters is not None:
            state.device_counters.copy_(initial_counters(state.device_counters.device))

    def run(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        step_t = torch.tensor(step, dtype=torch.int64, device=state.fn_residual.device)
        out, pred, diff = self._cond_step(step_t, state.device_counters, state.fn_residual, state.ladder_h,
                                          state.ladder_e, *args, gates=self.gates(step_t.device), **kwargs)
        state.records.append((step, pred, diff))
        return out

    def fold(self, states: list[BranchState]) -> None:
        from .step import fold_records
        fold_records(states)

    def cudagraph_status(self, device: torch.device) -> str:
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if self.mode not in CUDAGRAPH_MODES:
            return f"off (mode={self.mode})"
        return "skipped: Inductor disables CUDA graphs for graphs with torch.cond (torch 2.11-2.14)"


def build_lowering(name: str, transformer: torch.nn.Module, adapter: Any, config: Any, mode: Optional[str],
                   options: Optional[dict[str, Any]]) -> Lowering:
    """The lowering object ``name`` for this transformer (built once by :func:`dbcache_compile.optimize`)."""
    if name == "eager":
        return Eager(CacheStep(transformer, adapter, config))
    opts = dict(options or {})
    if name == "regional":
        compiled = CompiledSet()
        lowering = Regional(CacheStep(transformer, adapter, config, Regional.block_call(opts, compiled)), mode, opts)
        lowering.compiled = compiled
        return lowering
    step = CacheStep(transformer, adapter, config)
    if name == "segments":
        return Segments(step, mode, opts)
    if name == "cond":
        return Cond(step, mode, opts)
    raise ValueError(f"lowering must be one of {LOWERINGS}, got {name!r}")
