"""What :func:`dbcache_compile.optimize` attaches to a transformer, the diffusers way: a :class:`ModelHook` in the
transformer's :class:`HookRegistry` (the model's class and the pipeline's class are never edited), with the cache
state kept per cache context.

* **Branches.** diffusers pipelines wrap every transformer call in ``transformer.cache_context("cond")`` /
  ``cache_context("uncond")`` (FLUX with true CFG, Qwen-Image, Wan, ...; ``"cond_uncond"`` for batched CFG). Each
  context name is one branch with its own buffers, counters, decisions and TaylorSeer ladder, and its step index is
  the number of its own calls in the generation: separate CFG is what the pipeline does, never guessed from call
  parity. Calls outside any context (a bare transformer, a custom loop) form one branch, or, with
  ``enable_separate_cfg=True``, alternate between ``cond`` and ``uncond`` (cache-dit's rule). With
  ``enable_separate_cfg=False`` every context shares one branch (each call is a step, as cache-dit counts it).
* **Generations.** A generation ends with the pipeline's ``maybe_free_model_hooks()``, which resets stateful hooks
  (:meth:`CacheHook.reset_state`); the next forward then starts a new one. A generation interrupted by an exception
  never reaches that reset, so a new one is also recognised at its start: the pipeline's scheduler has
  ``step_index is None`` until the first ``scheduler.step()`` of a generation (:class:`GenerationWatch`). A branch
  whose inputs change shape, dtype or device starts over too (its stored residual cannot be compared). A bare
  transformer is reset with :func:`dbcache_compile.reset`. What the last generation decided stays readable in
  :func:`dbcache_compile.summary` until the next one starts.
* **One interface.** :class:`CachedRuntime`, :class:`UncachedRuntime` and the loaded AOTInductor package share the
  :class:`Runtime` attributes that ``summary()``, ``disable()``, the bench and the graph records read, through the
  public accessor :func:`dbcache_compile.runtime_of`.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from typing import Any, Callable, Optional

import torch


def _import_diffusers_hooks() -> Any:
    """``diffusers.hooks.hooks``. Importing any diffusers hook module runs ``diffusers.hooks/__init__``, which imports
    peft when it is installed, which imports torchao, whose import logs warnings that matter to nobody on a CPU
    machine (its CUDA kernel libraries fail to load; a deprecation inside torchao). They are silenced for this one
    import; torchao itself is imported by us only when quantizing."""
    import logging
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from diffusers.hooks import hooks
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return hooks


_hooks = _import_diffusers_hooks()
HookRegistry, ModelHook, StateManager = _hooks.HookRegistry, _hooks.ModelHook, _hooks.StateManager
from .checks import refuse_module_hooks
from .config import DBCacheConfig
from .cudagraphs import SegmentGraphs
from .lowerings import CUDAGRAPH_MODES, Lowering, Regional
from .parallel import check_plan, check_same_config, cp_group, inner_hooks
from .state import BranchState
from .stats import CacheSummary
from .step import fresh_function, no_views, standard_strides, transformer_output

__all__ = ["HOOK_NAME", "REGION_HOOK_NAME", "HookRegistry", "Applied", "Runtime", "BranchedRuntime", "CachedRuntime",
           "UncachedRuntime", "CacheHook", "Branches", "GenerationWatch", "input_key", "check_call", "run_region"]

HOOK_NAME = "dbcache_compile"
REGION_HOOK_NAME = "dbcache_compile_region"
#: diffusers hooks with a ``new_forward`` that compose with the cache (see :func:`forward_replacing_hooks`)
_COMPATIBLE_FORWARD_HOOKS = frozenset({"peft_autocast_disable"})


@dataclasses.dataclass
class Applied:
    """What :func:`dbcache_compile.optimize` changed on the transformer besides the hook (reported by ``summary()``,
    undone by ``disable()`` where it can be)."""

    quantized: Optional[str] = None
    attention: Optional[str] = None
    fused_qkv: bool = False
    #: undoes the attention backend and the fused projections (``disable``)
    undo: Callable[[], None] = lambda: None
    #: whether ``optimize`` created the transformer's ``_diffusers_hook`` registry (``disable`` removes it again)
    created_registry: bool = False


def input_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: a branch's buffers and graphs belong to one such key."""
    key = [(i, v.shape, v.dtype, v.device) for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
    key += [(k, v.shape, v.dtype, v.device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return tuple(key)


def refuse_while_compiling() -> None:
    """``torch.compile`` around an optimized transformer cannot trace the host decision (one device read per step);
    the cache compiles itself with ``optimize(mode=...)``."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "dbcache_compile: this transformer is optimized; torch.compile around it cannot trace the cache's host "
            "decision. Compile with dbcache_compile.optimize(pipe, cache=..., mode='max-autotune') instead of "
            "torch.compile(transformer) / compile_repeated_blocks()")


class Branches(StateManager):
    """One :class:`BranchState` per cache context (module doc), in diffusers' :class:`StateManager` so that
    ``transformer.cache_context(name)`` selects the branch. Unlike diffusers' caches, a reset keeps each branch's
    buffers (graphs are captured over them) and only marks the generation finished."""

    def __init__(self, terms: int, separate: Optional[bool], state_cls: type = BranchState) -> None:
        super().__init__(state_cls, (terms,), {})
        self.separate = separate
        self.finished = True  # the next forward starts a generation
        self.order: list[str] = []  # branch names in first-use order, this generation
        self.contexts: list[str] = []  # context names entered this generation
        self.calls = 0  # forwards this generation, all branches

    @property
    def states(self) -> dict[str, BranchState]:
        return self._state_cache

    def current(self) -> tuple[str, BranchState]:
        """The branch of the call about to run."""
        context = self._context.name if self._context is not None else None
        if context is not None and context not in self.contexts:
            self.contexts.append(context)
        if self.separate is False:
            name = "cond"
        elif context is not None:
            name = context
        elif self.separate:
            name = "cond" if self.calls % 2 == 0 else "uncond"
        else:
            name = "cond"
        state = self._state_cache.get(name)
        if state is None:
            state = self._state_cache[name] = self._state_cls(*self._init_args)
        if name not in self.order:
            self.order.append(name)
        return name, state

    def start_generation(self, on_reset: Callable[[BranchState], None]) -> None:
        for state in self._state_cache.values():
            state.reset()
            on_reset(state)
        self.order, self.contexts, self.calls, self.finished = [], [], 0, False

    def check_new_signature(self, name: str) -> None:
        """A branch's inputs changed mid-generation: fine for a new generation of a bare transformer, an error when
        ``enable_separate_cfg=False`` merged several contexts (the cond and uncond inputs differ)."""
        if self.separate is False and len(self.contexts) > 1:
            raise ValueError(
                f"enable_separate_cfg=False puts the pipeline's {' and '.join(self.contexts)} calls into one cache "
                f"state, but their inputs differ (e.g. the negative prompt's length); leave enable_separate_cfg=None "
                f"(each cache context gets its own state) or set it to True")

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """diffusers' end-of-call reset: the generation is over (its decisions stay readable until the next)."""
        self.finished = True
        self._context = None


class GenerationWatch:
    """Recognises a new generation at its first transformer call through the pipeline's scheduler, even when the
    last one ended with an exception (diffusers' end-of-call reset never ran). Two signals, either suffices:

    * the scheduler's ``timesteps`` tensor is another object than at the last call: every pipeline call runs
      ``scheduler.set_timesteps`` before its first transformer call, which makes a new tensor (this also catches a
      generation that failed inside its very first step, before any ``scheduler.step()``);
    * its ``step_index`` is ``None`` after a number (``None`` until the first ``scheduler.step()``).

    Shared by all the transformers of a pipeline (Wan 2.2's ``transformer`` and ``transformer_2``). Schedulers with
    neither attribute give no signal (the end-of-call reset still works)."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = weakref.ref(pipeline)
        self._last: Optional[int] = None
        self._timesteps: Optional[weakref.ref] = None  # the scheduler's timesteps tensor at the last call
        self.generation = 0

    def poll(self) -> int:
        pipeline = self._pipeline()
        scheduler = getattr(pipeline, "scheduler", None) if pipeline is not None else None
        step_index = getattr(scheduler, "step_index", -1)
        timesteps = getattr(scheduler, "timesteps", None)
        new_timesteps = False
        if isinstance(timesteps, torch.Tensor):
            new_timesteps = self._timesteps is not None and self._timesteps() is not timesteps
            self._timesteps = weakref.ref(timesteps)
        if new_timesteps or (step_index is None and self._last is not None):
            self.generation += 1
        self._last = step_index
        return self.generation

    def finished(self) -> None:
        self._last = None


class Runtime:
    """The interface every attached runtime offers (:func:`dbcache_compile.runtime_of` returns one).

    Attributes:
        lowering: ``"eager"``, ``"segments"``, ``"regional"``, ``"cond"``, ``"generic-eager"``,
            ``"generic-regional"``, ``"uncached"`` or ``"aoti"`` (a loaded package).
        mode: the ``torch.compile`` mode, ``None`` for eager.
        cache_config: the :class:`DBCacheConfig` (``None`` without a cache).
        adapter: the adapter's name.
        applied: quantization / attention backend / fused QKV applied by ``optimize``.
    """

    lowering = "base"
    mode: Optional[str] = None
    cache_config: Optional[DBCacheConfig] = None
    adapter = ""
    applied = Applied()
    #: hooks this runtime puts on the transformer's blocks (registered and removed by optimize / disable)
    block_hooks: dict = {}
    block_hook_name = ""
    #: the lowerings the adapter can run for this model (reported by ``summary()``)
    supported_lowerings: tuple[str, ...] = ()
    #: the blocks compiled as regions (``graph="regional"``), empty otherwise
    regional_blocks: tuple | list = ()

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        """Compiled function -> calls that ran uncompiled because its recompile limit was reached (also for the
        uncached compiled baseline, whose ``summary()`` has no cache decisions to report)."""
        return {}

    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        """The hand-captured segment graphs (``regional``), else ``None``."""
        return None

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        raise ValueError(f"segment graphs belong to the regional lowering, not {self.lowering!r}")

    def reset(self) -> None:
        """Start a new generation at the next forward."""

    def summary(self) -> CacheSummary:
        raise ValueError("this pipeline was optimized with cache=None: there are no cache decisions to summarize")

    def cudagraph_status(self) -> str:
        return "off"

    def release(self) -> None:
        """Drop what this runtime compiled (``disable()``): Dynamo's entries of its code objects."""


class BranchedRuntime(Runtime):
    """What every cached runtime shares: branches per cache context, generations, the per-call bookkeeping, the
    summary. Subclasses run the step."""

    def __init__(self, transformer: torch.nn.Module, config: DBCacheConfig, applied: Applied,
                 watch: Optional[GenerationWatch], num_blocks: int, state_cls: type = BranchState) -> None:
        self.transformer = transformer
        self.cache_config = config
        self.applied = applied
        self.num_blocks = num_blocks
        self.branches = Branches(config.taylorseer_terms, config.enable_separate_cfg, state_cls)
        self.watch = watch
        self._generation = 0

    def reset(self) -> None:
        self.branches.reset()

    def finish(self) -> None:
        """The pipeline call ended (diffusers' end-of-call reset)."""
        self.branches.reset()
        if self.watch is not None:
            self.watch.finished()

    def _on_new_generation(self, state: BranchState) -> None:
        """A branch's host counters were just reset."""

    def _cp_group(self) -> Any:
        """The context-parallel group of the cached transformer (``None`` without context parallelism)."""
        return cp_group(self.transformer)

    def reconfigure(self, config: DBCacheConfig) -> None:
        """Use another cache config from the next generation on, without recompiling or recapturing anything.

        The compiled graphs depend only on the block split (Fn, Bn) and the TaylorSeer terms; thresholds, warm-up,
        the cached-step limits and the steps mask are host data in the eager, ``segments`` and ``regional``
        lowerings and device tensors filled in place in ``cond`` (inputs of its graph). So a config that keeps Fn, Bn
        and the TaylorSeer order swaps in place: what
        :func:`dbcache_compile.calibrate` relies on to measure many candidates on one compiled model."""
        config = DBCacheConfig.coerce(config)
        old = self.cache_config
        same = (config.Fn_compute_blocks, config.Bn_compute_blocks, config.taylorseer_terms) == (
            old.Fn_compute_blocks, old.Bn_compute_blocks, old.taylorseer_terms)
        if not same:
            raise ValueError(f"reconfigure() keeps the block split and the TaylorSeer order (F{old.Fn_compute_blocks}"
                             f"B{old.Bn_compute_blocks}, {old.taylorseer_terms} terms); {config} changes them: "
                             f"disable() and optimize() again")
        self._set_config(config)
        self.branches.separate = config.enable_separate_cfg
        self.reset()

    def _set_config(self, config: DBCacheConfig) -> None:
        self.cache_config = config

    def _begin(self, args: tuple, kwargs: dict) -> tuple[BranchState, int, tuple]:
        """Pick the branch of this call (starting a generation where one starts): ``(state, step, input key)``."""
        generation = self.watch.poll() if self.watch is not None else 0
        if self.branches.finished or generation != self._generation:
            self._generation = generation
            self._check_generation_start()
            self.branches.start_generation(self._on_new_generation)
            group = self._cp_group()
            if group is not None:
                check_plan(self.transformer, self._plan_chains())
                check_same_config(self.cache_config, group, next(self.transformer.parameters()).device)
        name, state = self.branches.current()
        key = input_key(args, kwargs)
        if state.calls and state.key != key:  # new inputs mid-generation: this branch starts over
            self.branches.check_new_signature(name)
            state.reset()
            self._on_new_generation(state)
        step = state.calls
        state.begin_step(step)
        return state, step, key

    def _plan_chains(self) -> list[tuple[list[torch.nn.Module], int, int]]:
        """``(blocks, Fn, Bn)`` per chain, for the context-parallel plan check (:func:`parallel.check_plan`)."""
        return []

    def _check_generation_start(self) -> None:
        """What users may have changed on the transformer since optimize (a loaded package has nothing to check)."""
        refuse_forward_replacing_hooks(self.transformer, "added after optimize()")
        refuse_offload(self.transformer, True, "after optimize()")
        refuse_offload_with_cuda_graphs(self.transformer, None, self.mode, "enabled after optimize()")
        refuse_module_hooks(self.transformer, self.mode, "added after optimize()")
        self._refuse_compiled_blocks()

    def _refuse_compiled_blocks(self) -> None:
        """Blocks that carry our block hooks (generic adapter) and were compiled afterwards by ``module.compile()``
        (``transformer.compile_repeated_blocks``): Dynamo would trace our per-block hook objects, one recompile per
        block, and hit its recompile limit mid-generation; say what works instead."""
        compiled = [block for block in self.block_hooks if getattr(block, "_compiled_call_impl", None) is not None]
        if compiled:
            raise ValueError(
                f"{len(compiled)} blocks of {type(self.transformer).__name__} were compiled (compile_repeated_blocks / "
                f"block.compile()) after an eager dbcache_compile.optimize: the {self.adapter} adapter's per-block "
                f"cache hooks would recompile per block. Compile through the cache instead: "
                f"dbcache_compile.optimize(pipe, cache=..., mode=\"default\", graph=\"regional\") compiles one region "
                f"per block class")

    def _end(self, state: BranchState, key: tuple) -> None:
        state.key = key
        state.calls += 1
        self.branches.calls += 1

    def _fold(self) -> None:
        """Bring device-side records into the host lists before reading them."""

    def summary(self) -> CacheSummary:
        states = self.branches.states
        self._fold()
        order = self.branches.order or ["cond"]
        main = states.get(order[0]) or BranchState(1)
        cfg_name = next((n for n in order[1:] if n == "uncond"), order[1] if len(order) > 1 else None)
        cfg = states[cfg_name] if cfg_name is not None else None
        config = self.cache_config
        return CacheSummary(
            config=str(config), num_steps=main.calls, cached_steps=list(main.cached_steps),
            cfg_cached_steps=list(cfg.cached_steps) if cfg else [], residual_diffs=dict(main.diffs),
            cfg_residual_diffs=dict(cfg.diffs) if cfg else {}, separate_cfg=len(order) > 1,
            lowering=self.lowering, mode=self.mode, num_blocks=self.num_blocks, Fn=config.Fn_compute_blocks,
            Bn=config.Bn_compute_blocks, cudagraphs=self.cudagraph_status(), quantized=self.applied.quantized,
            attention=self.applied.attention, fused_qkv=self.applied.fused_qkv, adapter=self.adapter,
            branches={n: {"calls": states[n].calls, "cached_steps": list(states[n].cached_steps)} for n in order
                      if n in states}, compile_fallbacks=dict(self.compile_fallbacks),
            lowerings=tuple(self.supported_lowerings))


def forward_replacing_hooks(transformer: torch.nn.Module) -> list[str]:
    """Names of the diffusers hooks anywhere in ``transformer`` (its blocks and their attention/MLP modules included)
    that replace a forward (``new_forward``: FirstBlockCache, MagCache, TaylorSeerCache, PAB, FasterCache, ...),
    ours excluded. The cache would bypass or double them, so they are refused at ``optimize`` and at the start of
    every generation (``apply_first_block_cache`` after ``optimize`` sets no ``_cache_config``). diffusers'
    ``peft_autocast_disable`` hook (layerwise casting + PEFT) only wraps a LoRA layer's forward and is allowed."""
    return sorted({name for module in transformer.modules()
                   for name, hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).items()
                   if hasattr(hook, "new_forward") and not name.startswith(HOOK_NAME)
                   and name not in _COMPATIBLE_FORWARD_HOOKS})


def refuse_forward_replacing_hooks(transformer: torch.nn.Module, when: str) -> None:
    replacing = forward_replacing_hooks(transformer)
    if replacing:
        raise ValueError(f"{type(transformer).__name__} carries diffusers hooks that replace a forward "
                         f"({', '.join(replacing)}) {when}: the DBCache would bypass or double them (two caches "
                         f"cannot share one forward); remove them (e.g. transformer.disable_cache()) or call "
                         f"dbcache_compile.disable()")


def refuse_offload(transformer: torch.nn.Module, pipeline: Any, when: str) -> None:
    """Sequential CPU offload streams every layer's weights in during its own forward (parameters on ``meta``);
    model CPU offload on a bare transformer cannot be paused without its pipeline (:func:`_model_offload_paused`)."""
    if next(transformer.parameters()).device.type == "meta":
        raise ValueError(f"{type(transformer).__name__}'s weights are on the meta device {when} "
                         f"(enable_sequential_cpu_offload() streams each layer's weights during its forward), which the "
                         f"cache's own block loop does not drive: use pipe.enable_model_cpu_offload() or group "
                         f"offloading (eager cache) instead")
    if pipeline is None and getattr(transformer, "_hf_hook", None) is not None:
        raise ValueError(f"{type(transformer).__name__} carries accelerate offload hooks (enable_model_cpu_offload): "
                         f"pass the pipeline to dbcache_compile.optimize / disable, not the bare transformer, so the "
                         f"offload hooks can be re-installed around the cache")


def refuse_offload_with_cuda_graphs(transformer: torch.nn.Module, pipeline: Any, mode: Optional[str],
                                    when: str) -> None:
    """Model CPU offload moves the weights to the GPU again at every call, to new addresses; a CUDA graph replays
    the addresses it captured (stale weights: a wrong image). Refused with a CUDA-graph mode when the offload
    executes on CUDA."""
    if mode not in CUDAGRAPH_MODES:
        return
    device = getattr(pipeline, "_offload_device", None) if getattr(pipeline, "_all_hooks", None) else None
    hook = getattr(transformer, "_hf_hook", None)
    if device is None and type(hook).__name__ == "CpuOffload":
        device = getattr(hook, "execution_device", None)
    if device is not None and torch.device(device).type == "cuda":
        raise ValueError(f"enable_model_cpu_offload() with mode={mode!r} {when}: the offload moves the weights to new "
                         f"GPU memory at every call and CUDA graphs replay the addresses they captured; use "
                         f"mode='max-autotune-no-cudagraphs' or 'default' with offload, or keep the model on the GPU")


def check_call(module: torch.nn.Module) -> bool:
    """Checks before a cached forward; ``False``: run the model's own forward instead (training with gradient
    checkpointing: the cache is for inference)."""
    refuse_while_compiling()
    if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
        return False
    if getattr(module, "_cache_config", None) is not None:
        raise ValueError(f"{type(module).__name__} also has a diffusers cache enabled "
                         f"({type(module._cache_config).__name__}); two caches cannot share one forward: call "
                         f"transformer.disable_cache() or dbcache_compile.disable()")
    return True


class CachedRuntime(BranchedRuntime):
    """DBCache on a transformer with an explicit adapter: the adapter's embed / blocks / project run by one
    lowering (:mod:`dbcache_compile.lowerings`), the LoRA scale applied as the model's own forward does."""

    def __init__(self, transformer: torch.nn.Module, adapter: Any, config: DBCacheConfig, lowering: Lowering,
                 applied: Applied, watch: Optional[GenerationWatch] = None) -> None:
        super().__init__(transformer, config, applied, watch, lowering.step.num_blocks)
        self.adapter = adapter.name
        self.supported_lowerings = ("eager", "segments", "regional", "cond")
        self._attention_kwargs = adapter.attention_kwargs
        self._eager_inputs = adapter.eager_inputs
        self.impl = lowering
        self.lowering = lowering.name
        self.mode = lowering.mode
        self._whole_graphs = lowering.name in ("segments", "cond")
        from diffusers.utils import apply_lora_scale
        # the model's own forward scales PEFT LoRA layers by `<attention kwargs>["scale"]` around the blocks: so do we
        self._forward = apply_lora_scale(adapter.attention_kwargs)(self._cached_forward)

    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        return getattr(self.impl, "graphs", None)

    def _plan_chains(self) -> list[tuple[list[torch.nn.Module], int, int]]:
        step = self.impl.step
        return [([*step.fn_blocks, *step.mid_blocks, *step.bn_blocks], len(step.fn_blocks), len(step.bn_blocks))]

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """``regional``: run the segments as hand-captured CUDA graphs (automatic on CUDA with a CUDA-graph mode);
        ``emulate=True`` runs the same capture/replay bookkeeping without CUDA (tests)."""
        if not isinstance(self.impl, Regional):
            return super().use_segment_graphs(emulate)
        graphs = self.impl.use_segment_graphs(emulate)
        for state in self.branches.states.values():
            state.key = None  # the next step of each branch re-registers its buffers with the new graphs
        return graphs

    def _on_new_generation(self, state: BranchState) -> None:
        self.impl.start_generation(state)

    def _set_config(self, config: DBCacheConfig) -> None:
        self.cache_config = self.impl.config = self.impl.step.config = config

    def _fold(self) -> None:
        self.impl.fold(list(self.branches.states.values()))

    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        if not check_call(module):
            return original(*args, **kwargs)
        # hooks registered before ours (context-parallel input splits on the root module) sit inside our forward:
        # apply them as calling through would
        inner = inner_hooks(module, HOOK_NAME)
        for hook in inner:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
        self.impl.step.cp_group = cp_group(module)
        attention_kwargs = kwargs.get(self._attention_kwargs)
        # the LoRA scale changes what the segments compute without being their argument: part of a graph's key
        self.impl.variant = attention_kwargs.get("scale", 1.0) if attention_kwargs else 1.0
        out = self._forward(module, *args, **kwargs)
        for hook in reversed(inner):
            out = hook.post_forward(module, out)
        return out

    def _cached_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        kwargs = self._eager_inputs(module, args, kwargs)
        if self._whole_graphs:
            # a view passed into a compile keeps its fake-tensor state alive after the compile (torch 2.13): plain
            # tensors into the whole-segment graphs (FluxPipeline's img_ids is a view; one small copy)
            args = tuple(no_views(a) for a in args)
            kwargs = {k: no_views(v) for k, v in kwargs.items()}
        state, step, key = self._begin(args, kwargs)
        if state.key != key:
            out = self.impl.first_step(state, step, args, kwargs)
        else:
            out = self.impl.run(state, step, args, kwargs)
        if self.impl.graphed:
            # a graph output lives in the graph's pool and is overwritten by the next replay (e.g. the
            # unconditional call of the same step): hand the pipeline its own copy
            out = out.clone()
        self._end(state, key)
        return transformer_output(out, return_dict)

    def cudagraph_status(self) -> str:
        return self.impl.cudagraph_status(next(self.transformer.parameters()).device)

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.impl.compiled.fallbacks

    def release(self) -> None:
        self.impl.compiled.release()


class CacheHook(ModelHook):
    """The hook in the transformer's :class:`HookRegistry`: its forward is the runtime's; it is stateful, so the
    pipeline's ``cache_context`` reaches :class:`Branches` and its end-of-call reset ends the generation."""

    _is_stateful = True

    def __init__(self, runtime: CachedRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.branches = runtime.branches  # a StateManager attribute: diffusers sets the cache context on it

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.forward(module, self.fn_ref.original_forward, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.finish()
        return module


def _block_region(forward: Callable, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The compiled region of an uncached ``regional`` forward: the block class's ``forward``, standard-strided
    outputs."""
    return standard_strides(forward(block, *args, **kwargs))


def run_region(region: Callable, module: torch.nn.Module, hook_name: str, args: tuple, kwargs: dict) -> Any:
    """A block's class ``forward`` through its compiled region, from inside hook ``hook_name``: the block's hooks
    registered before ours (context-parallel splits) run around the region eagerly, as calling through would (the
    region is per block class; compiling through a block's own hook objects would recompile per block)."""
    inner = inner_hooks(module, hook_name)
    for hook in inner:
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
    out = region(type(module).forward, module, *[no_views(a) for a in args],
                 **{k: no_views(v) for k, v in kwargs.items()})
    for hook in reversed(inner):
        out = hook.post_forward(module, out)
    return out


class RegionHook(ModelHook):
    """Runs a block's class ``forward`` through a compiled region (the uncached ``regional`` baseline), one
    ``torch.compile`` per block class."""

    def __init__(self, region: Callable) -> None:
        super().__init__()
        self.region = region

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return run_region(self.region, module, REGION_HOOK_NAME, args, kwargs)


class UncachedRuntime(Runtime):
    """``optimize(cache=None, ...)``: the original forward, compiled and/or quantized; the baseline that cached runs
    are measured against, built like them: ``regional`` (``auto`` on CUDA) compiles each block class as a region
    and, on CUDA with a CUDA-graph mode, captures the whole forward as one CUDA graph by hand; otherwise the whole
    forward is one fullgraph compile."""

    lowering = "uncached"
    block_hook_name = REGION_HOOK_NAME

    def __init__(self, transformer: torch.nn.Module, blocks: list[torch.nn.Module], mode: Optional[str],
                 options: Optional[dict], graph: str, applied: Applied,
                 watch: Optional[GenerationWatch] = None) -> None:
        from .lowerings import CompiledSet, regional_options
        self.watch = watch
        self._checked_generation: Optional[int] = None
        self.mode = mode
        self.transformer = transformer
        self.applied = applied
        self._graphs: Optional[SegmentGraphs] = None
        self.regional_blocks: list[torch.nn.Module] = []
        self._compiled: Optional[Callable] = None
        self._graph = graph if mode is not None else "eager"
        self.compiled = CompiledSet()
        if self._graph == "regional":
            regions: dict[type, Callable] = {}
            opts = regional_options(options or {})
            for block in blocks:
                if type(block) not in regions:
                    regions[type(block)] = self.compiled.compile(type(block).__name__, fresh_function(_block_region),
                                                                 opts)
                self.regional_blocks.append(block)
            self.block_hooks = {block: RegionHook(regions[type(block)]) for block in blocks}
        elif mode is not None:
            forward = fresh_function(type(transformer).forward)  # its own compiled entries (step.fresh_function)
            self._compiled = self.compiled.compile("forward", types.MethodType(forward, transformer), options)

    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        return self._graphs

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.compiled.fallbacks

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """``regional``: run the forward as a hand-captured CUDA graph (automatic on CUDA with a CUDA-graph mode);
        ``emulate=True`` runs the same bookkeeping without CUDA (tests)."""
        if not self.regional_blocks:
            raise ValueError("segment graphs belong to the regional lowering (optimize(..., graph='regional'))")
        if self._graphs is None or self._graphs.emulate != emulate:
            self._graphs = SegmentGraphs(emulate=emulate)
        return self._graphs

    def reset(self) -> None:
        self._checked_generation = None

    def _check_generation_start(self) -> None:
        """Once per generation (told by the pipeline's scheduler; a bare transformer: its first call and after
        ``reset()``): diffusers hooks added after optimize that a compiled forward cannot run through."""
        generation = self.watch.poll() if self.watch is not None else 0
        if generation != self._checked_generation:
            refuse_module_hooks(self.transformer, self.mode, "added after optimize()")
            self._checked_generation = generation

    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        refuse_while_compiling()
        if self.mode is not None:
            self._check_generation_start()
        device = next(module.parameters()).device
        if self._graphs is not None and not self._graphs.emulate and device.type != "cuda":
            self._graphs = None
        if self._graphs is None and self.regional_blocks and self.mode in CUDAGRAPH_MODES and device.type == "cuda":
            self._graphs = SegmentGraphs()
        if self._graphs is None:
            if self._compiled is None:
                return original(*args, **kwargs)
            # the compiled class forward replaces `original`: hooks inside ours (context-parallel input splits on
            # the root module) run around it, as calling through would
            inner = inner_hooks(module, HOOK_NAME)
            for hook in inner:
                args, kwargs = hook.pre_forward(module, *args, **kwargs)
            out = self._compiled(*args, **kwargs)
            for hook in reversed(inner):
                out = hook.post_forward(module, out)
            return out
        return_dict = kwargs.pop("return_dict", True)
        out = self._graphs("forward", original, args, dict(kwargs, return_dict=False))[0].clone()
        return transformer_output(out, return_dict)

    def cudagraph_status(self) -> str:
        if self._graphs is not None:
            return f"captured by hand: the whole forward ({self._graphs.captures} captured)"
        return "off"

    def release(self) -> None:
        self.compiled.release()


class UncachedHook(ModelHook):
    """The hook of :class:`UncachedRuntime`."""

    def __init__(self, runtime: UncachedRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.forward(module, self.fn_ref.original_forward, args, kwargs)
