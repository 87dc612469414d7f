"""The one runtime :func:`dbcache_compile.optimize` attaches to a transformer, the diffusers way: a :class:`ModelHook`
in the transformer's :class:`HookRegistry` (the model's class and the pipeline's class are never edited), plus, for a
family without a prologue, a hook on every cached block; the cache state is kept per cache context.

* **Drivers.** A family with a prologue (FLUX.1, Qwen-Image: :class:`~dbcache_compile.families.Family` ``embed`` /
  ``project``) runs whole steps in our forward (:class:`~dbcache_compile.step.CacheStep`). Every other family runs
  its own forward, and block hooks run the cache's groups from inside it
  (:class:`~dbcache_compile.step.GroupStep`). Both decide with :func:`~dbcache_compile.step.decide_on_host` (or a
  device predicate, ``cond``) and record alike; a :class:`~dbcache_compile.lowerings.Lowering` says how segments
  run.
* **Groups.** With a grouping lowering (``segments``, ``regional``) the hook of a group's first block runs the whole
  group (Fn blocks, one list's middle blocks, the Bn blocks) as one segment, compiled whole or made of compiled
  regions and, on CUDA, replayed as a hand-captured CUDA graph; the other blocks of the group hand their inputs
  through. The first step at a new input signature runs block by block, records each block's output structure and
  checks that the model passes each block the previous one's outputs and the same other arguments (no glue inside
  a group).
* **Index-added inputs** (``Family.index_added``: SD3's ``block_controlnet_hidden_states``, Wan VACE's
  ``control_hidden_states``, Wan Animate's ``face_pixel_values``). The model's forward adds something, c_i, to the
  hidden stream after block i, by index, outside the block (glue the block hooks do not see). A call passing such an
  input runs its blocks one by one (compiled regions under ``regional``; ``segments``, which compiles whole groups,
  refuses it by name) and stores as a list's middle residual the sum of its middle blocks' own residuals (each
  block's output minus its input), without the c_i. On a hit the first middle block adds that residual and the
  others hand their input through, so the model's own glue still adds every c_i after its block: once, with its
  value of this step (a ControlNet residual or VACE hint of this step's latents). Storing the span's output minus
  its input and adding it at the first middle block would hold c_i as well and count it twice. Glue that reads the
  stream (``Family.glue_reads_stream``: Wan Animate's face adapter, c_i = f(h_i)) has no value of this step on a hit
  (h_i is what the skipped blocks would have made): there the cached residual is the span's output minus its input
  (the glue between the middle blocks included), every middle block of a hit returns the streams the first one got,
  which undoes the glue the model added after the previous block, and the last adds the residual; only the glue
  after the last middle block runs, on the hit's stream (exact on a repeated input, and 69 dB against 58 dB for
  evaluating every adapter on the hit's stream on the tiny pipeline). The decision's Fn residual is measured at the
  first middle block's input, i.e. it holds the glue after the Fn blocks too, as cache-dit's
  ``WanVACEPatchFunctor`` (which fuses the hint into its block) measures it.
* **Branches.** diffusers pipelines wrap every transformer call in ``transformer.cache_context("cond")`` /
  ``cache_context("uncond")`` (FLUX with true CFG, Qwen-Image, Wan, ...; ``"cond_uncond"`` for batched CFG). Each
  context name is one branch with its own buffers, counters, decisions and TaylorSeer ladder, and its step index is
  the number of its own calls in the generation: separate CFG is what the pipeline does, never guessed from call
  parity. A call outside any context (pipelines that do not name their CFG calls, a bare transformer) belongs to
  the branch whose conditioning tensors it passes, and a call of the same step (the same latents) with other
  conditioning opens the next branch (:meth:`InputWatch.slot_of`); with ``enable_separate_cfg=True`` such calls
  alternate between ``cond`` and ``uncond`` (cache-dit's rule). With ``enable_separate_cfg=False`` every context
  shares one branch.
* **Generations.** A call continues its branch's generation only when it passes the very conditioning tensors the
  previous call of the same kind passed (:class:`InputWatch`: no device read); a call that raised ends the
  generation (its state may be half updated); so do the pipeline's end-of-call reset ``maybe_free_model_hooks()``
  (:meth:`CacheHook.reset_state`), the optimized pipeline's scheduler starting over (:class:`GenerationWatch`) and
  :func:`dbcache_compile.reset`. A branch whose inputs change shape, dtype or device starts over too (its stored
  residual cannot be compared). What the last generation decided stays readable in :func:`dbcache_compile.summary`
  until the next one starts.
"""

from __future__ import annotations

import dataclasses
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
from .checks import refuse_module_hooks  # noqa: E402
from .compiled import CUDAGRAPH_MODES, CompiledSet, regional_options  # noqa: E402
from .config import DBCacheConfig  # noqa: E402
from .cudagraphs import SegmentGraphs  # noqa: E402
from .lowerings import Lowering, lowerings_for  # noqa: E402
from .parallel import check_plan, check_same_config, cp_group, inner_hooks, split_like  # noqa: E402
from .state import BranchState  # noqa: E402
from .stats import CacheSummary  # noqa: E402
from .usercompile import (UserCompiled, UserCompiledHooks, refuse_while_compiling,  # noqa: E402
                          route_compiled_blocks, traced_block, traced_forward, unroute_compiled_block)
from .step import (BlockIO, CacheStep, GroupStep, compile_region, decide_on_host, fold_records,  # noqa: E402
                   no_views, passes, run_block_hooks, transformer_output)

__all__ = ["HOOK_NAME", "BLOCK_HOOK_NAME", "REGION_HOOK_NAME", "HookRegistry", "Applied", "InputWatch", "Runtime",
           "BranchedRuntime", "CacheRuntime", "UncachedRuntime", "CacheHook", "Branches", "GenerationWatch",
           "input_key", "check_call"]

HOOK_NAME = "dbcache_compile"
BLOCK_HOOK_NAME = "dbcache_compile_block"
REGION_HOOK_NAME = "dbcache_compile_region"
#: diffusers hooks with a ``new_forward`` that compose with the cache (see :func:`forward_replacing_hooks`)
_COMPATIBLE_FORWARD_HOOKS = frozenset({"peft_autocast_disable"})


@dataclasses.dataclass
class Applied:
    """What :func:`dbcache_compile.optimize` changed on the transformer besides the hooks (reported by ``summary()``,
    undone by ``disable()`` where it can be)."""

    quantized: Optional[str] = None
    attention: Optional[str] = None
    fused_qkv: bool = False
    #: the kernel recipe of the compiles (:mod:`dbcache_compile.recipe`) and the compiled VAE decode
    #: (:mod:`dbcache_compile.vae`), as ``summary()`` prints them
    recipe: Optional[str] = None
    vae: Optional[str] = None
    #: undoes the attention backend and the fused projections (``disable``)
    undo: Callable[[], None] = lambda: None
    #: whether ``optimize`` created the transformer's ``_diffusers_hook`` registry (``disable`` removes it again)
    created_registry: bool = False


def input_key(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: a branch's buffers and graphs belong to one such key."""
    key = [(i, v.shape, v.dtype, v.device) for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
    key += [(k, v.shape, v.dtype, v.device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return tuple(key)


class Branches(StateManager):
    """One :class:`BranchState` per cache context (module doc), in diffusers' :class:`StateManager` so that
    ``transformer.cache_context(name)`` selects the branch. Unlike diffusers' caches, a reset keeps each branch's
    buffers (graphs are captured over them) and only marks the generation finished."""

    def __init__(self, terms: int, separate: Optional[bool]) -> None:
        super().__init__(BranchState, (terms,), {})
        self.separate = separate
        self.finished = True  # the next forward starts a generation
        self.order: list[str] = []  # branch names in first-use order, this generation
        self.contexts: list[str] = []  # context names entered this generation
        self.calls = 0  # forwards this generation, all branches

    @property
    def states(self) -> dict[str, BranchState]:
        return self._state_cache

    @property
    def context(self) -> Optional[str]:
        return self._context.name if self._context is not None else None

    @property
    def by_inputs(self) -> bool:
        """Whether this call's branch comes from its inputs (:meth:`InputWatch.slot_of`): a call outside any cache
        context with ``enable_separate_cfg=None``."""
        return self._context is None and self.separate is None

    def peek(self) -> str:
        """The branch name the call about to run gets when its branch does not come from its inputs."""
        if self.separate is False:
            return "cond"
        if self._context is not None:
            return self._context.name
        if self.separate:
            return "cond" if self.calls % 2 == 0 else "uncond"
        return "cond"

    def current(self, name: Optional[str] = None) -> tuple[str, BranchState]:
        """The branch of the call about to run (``name``: told by the inputs)."""
        context = self.context
        if context is not None and context not in self.contexts:
            self.contexts.append(context)
        name = name or self.peek()
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


#: names of per-step forward inputs (the latents and the timestep; the forward's first parameter counts too): they
#: change at every step
STEP_INPUT_NAMES = frozenset({"hidden_states", "timestep", "timesteps", "t",
                              # ControlNet residuals: the ControlNet runs on each step's latents (FLUX.1, Qwen-Image)
                              "controlnet_block_samples", "controlnet_single_block_samples"})


def _tensor_leaves(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensor_leaves(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensor_leaves(item, out)


class InputWatch:
    """The generation rule that holds whatever object was optimized (a pipeline, its bare transformer, a transformer
    shared by ``from_pipe`` pipelines with other schedulers, a loaded package): **a call continues the generation of
    its branch only when every conditioning tensor it passes is the very object the previous call of the same kind
    passed.** Conditioning = every tensor input (nested in lists, tuples and dicts too) except the per-step ones: the
    forward's first parameter (the latents), the timestep and ControlNet residuals. diffusers pipelines encode the
    prompt (and build ids, masks, guidance, rotary tables) once per call and pass those same tensors at every step, so a new pipeline call
    always brings new objects (checked for every supported family's pipeline: only the latents and the timestep change
    between steps). Identity is held through weak references, so a freed tensor whose address Python reuses never
    looks like the old one. No device value is read: no host sync.

    "Of the same kind" is the call's cache context; a call outside any context belongs to the branch whose
    conditioning it passes (:meth:`slot_of`: so cond / uncond calls that a pipeline does not name are told apart by
    their inputs), or with ``enable_separate_cfg=True`` alternates cond / uncond. A call with no conditioning tensor at
    all proves nothing and continues; a bare caller then ends generations with :func:`dbcache_compile.reset`."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        import inspect
        try:
            params = list(inspect.signature(type(transformer).forward).parameters)[1:]
        except (TypeError, ValueError):
            params = []
        self.params = params
        self.step_inputs = STEP_INPUT_NAMES | set(params[:1])
        self._last: dict[str, list[weakref.ref]] = {}
        #: the latents of the last call (a weak reference): the next call runs the same step if it passes them too
        self._latents: Optional[weakref.ref] = None
        #: the inputs of the call in progress as its caller passed them (:meth:`capture`)
        self._pending: Optional[tuple[list[torch.Tensor], Optional[torch.Tensor]]] = None
        #: generations in a row that the rule started after a single call (a caller passing new tensors every step)
        self._short_runs = 0
        self.warned = False

    def conditioning(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for name, value in zip(self.params, args):
            if name not in self.step_inputs:
                _tensor_leaves(value, out)
        for name, value in kwargs.items():
            if name not in self.step_inputs:
                _tensor_leaves(value, out)
        return out

    def latents(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The call's latents: its first forward parameter (``hidden_states``, Z-Image's ``x``: its first tensor)."""
        value = args[0] if args else kwargs.get(self.params[0] if self.params else "hidden_states",
                                                kwargs.get("hidden_states"))
        leaves: list[torch.Tensor] = []
        _tensor_leaves(value, leaves)
        return leaves[0] if leaves else None

    def capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """A ``torch`` forward pre-hook (registered with ``with_kwargs=True``): it runs in ``Module.__call__``,
        before any wrapper of ``forward`` — accelerate's offload hooks copy every input to the execution device at
        each call, so identity is only meaningful as the caller passed the tensors. Under the user's torch.compile it
        does nothing (a traced forward reads its inputs at run time: usercompile; touching them here would only add
        shape guards to this hook's own frame)."""
        if torch.compiler.is_compiling():
            return
        self._pending = self.conditioning(args, kwargs), self.latents(args, kwargs)

    def take(self, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        """The conditioning tensors and the latents of this call: as captured by :meth:`capture`, else from these
        arguments."""
        pending, self._pending = self._pending, None
        return pending if pending is not None else (self.conditioning(args, kwargs), self.latents(args, kwargs))

    def slot_of(self, tensors: list[torch.Tensor], latents: Optional[torch.Tensor]) -> Optional[str]:
        """The branch of a call outside any cache context, from the call pattern: the branch whose last call passed
        these very conditioning tensors; a new branch (``"uncond"``, then ``"branch2"``, ...) when the call runs the
        same step as the previous call (the very same latents) with other conditioning (pipelines that make their
        cond / uncond calls without naming them: FLUX.1 Kontext / img2img / ControlNet with true CFG, Chroma,
        Lumina 2, ...); ``None`` when the call starts a new generation."""
        for name, refs in self._last.items():
            if len(refs) == len(tensors) and all(ref() is t for ref, t in zip(refs, tensors)):
                return name
        if not self._last:
            return "cond"
        if latents is not None and self._latents is not None and self._latents() is latents:
            return "uncond" if len(self._last) == 1 else f"branch{len(self._last)}"
        return None

    def moved_on(self, slot: str, tensors: list[torch.Tensor]) -> bool:
        """Whether these conditioning tensors differ from those of the previous call in ``slot``."""
        last = self._last.get(slot)
        if last is None:
            return False
        return len(last) != len(tensors) or any(ref() is not t for ref, t in zip(last, tensors))

    def record(self, slot: str, tensors: list[torch.Tensor], latents: Optional[torch.Tensor]) -> None:
        self._last[slot] = [weakref.ref(t) for t in tensors]
        self._latents = weakref.ref(latents) if latents is not None else None

    def clear(self) -> None:
        self._last = {}
        self._latents = None

    def note_restart(self, calls_in_last_generation: int) -> None:
        """Warn once when every generation the rule starts had one call: the caller passes new conditioning tensors at
        every step, so nothing can ever be cached (a silent slow path otherwise)."""
        self._short_runs = self._short_runs + 1 if calls_in_last_generation <= 1 else 0
        if self._short_runs >= 3 and not self.warned:
            self.warned = True
            import warnings
            warnings.warn("dbcache_compile: each of the last calls passed new conditioning tensors (e.g. "
                          "encoder_hidden_states), which starts a new generation every time, so no step can be "
                          "cached. Pass the same tensor objects at every step of a generation (as diffusers "
                          "pipelines do) and call dbcache_compile.reset() between generations", stacklevel=5)


class Runtime:
    """The interface every attached runtime offers (:func:`dbcache_compile.runtime_of` returns one).

    Attributes:
        lowering: the lowering's name (``"eager"``, ``"segments"``, ``"regional"``, ``"cond"``), ``"uncached"`` or
            ``"aoti"`` (a loaded package).
        mode: the ``torch.compile`` mode, ``None`` for eager.
        cache_config: the :class:`DBCacheConfig` (``None`` without a cache).
        family: the model family's name; ``prologue``: whether whole steps run in our forward.
        applied: quantization / attention backend / fused QKV applied by ``optimize``.
    """

    lowering = "base"
    mode: Optional[str] = None
    cache_config: Optional[DBCacheConfig] = None
    family = ""
    prologue = False
    applied = Applied()
    #: hooks this runtime puts on the transformer's blocks (registered and removed by optimize / disable)
    block_hooks: dict = {}
    block_hook_name = ""
    #: the lowerings the family can run (reported by ``summary()``)
    supported_lowerings: tuple[str, ...] = ()
    #: the blocks compiled as regions (``graph="regional"``), empty otherwise
    regional_blocks: tuple | list = ()

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        """Compiled function -> calls that ran uncompiled because its recompile limit was reached (also for the
        uncached compiled baseline, whose ``summary()`` has no cache decisions to report)."""
        return {}

    @property
    def compiled_graphs(self) -> dict[str, int]:
        """``{"reused": n, "compiled": m}``: Dynamo graphs this runtime took from the process-wide store of compiled
        functions, and those compiled while it ran (:mod:`dbcache_compile.compiled`)."""
        return {"reused": 0, "compiled": 0}

    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        """The hand-captured segment graphs, else ``None``."""
        return None

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        raise ValueError(f"segment graphs belong to the lowerings that capture them, not {self.lowering!r}")

    def reset(self) -> None:
        """Start a new generation at the next forward."""

    def summary(self) -> CacheSummary:
        raise ValueError("this pipeline was optimized with cache=None: there are no cache decisions to summarize")

    def cudagraph_status(self) -> str:
        return "off"

    def release(self) -> None:
        """Drop what this runtime compiled (``disable()``): Dynamo's entries of its code objects."""


class BranchedRuntime(Runtime):
    """What every cached runtime shares (the live one and a loaded package): branches per cache context,
    generations, the per-call bookkeeping, the summary."""

    def __init__(self, transformer: torch.nn.Module, config: DBCacheConfig, applied: Applied,
                 watch: Optional[GenerationWatch], num_blocks: int) -> None:
        self.transformer = transformer
        self.cache_config = config
        self.applied = applied
        self.num_blocks = num_blocks
        self.branches = Branches(config.taylorseer_terms, config.enable_separate_cfg)
        self.watch = watch
        self.inputs = InputWatch(transformer)
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
        conditioning, latents = self.inputs.take(args, kwargs)
        by_inputs = self.branches.by_inputs
        if by_inputs:
            slot = self.inputs.slot_of(conditioning, latents) if not self.branches.finished else "cond"
            moved_on = slot is None
        else:
            slot = self.branches.context or self.branches.peek()
            moved_on = not self.branches.finished and self.inputs.moved_on(slot, conditioning)
        if self.branches.finished or generation != self._generation or moved_on:
            if moved_on:
                self.inputs.note_restart(self.branches.calls)
            self.inputs.clear()
            if by_inputs:
                slot = "cond"
            self._generation = generation
            self._check_generation_start()
            self.branches.start_generation(self._on_new_generation)
            group = self._cp_group()
            if group is not None:
                check_plan(self.transformer, self._plan_chains())
                check_same_config(self.cache_config, group, next(self.transformer.parameters()).device)
        self.inputs.record(slot, conditioning, latents)
        name, state = self.branches.current(slot if by_inputs else None)
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

    def _end(self, state: BranchState, key: tuple) -> None:
        state.key = key
        state.calls += 1
        self.branches.calls += 1

    def _fold(self) -> None:
        """Bring device-side records into the host lists before reading them."""

    def _chain_summaries(self, order: list[str]) -> dict[str, dict]:
        """Per chain, for families whose block lists decide on their own (empty with one chain)."""
        return {}

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
            attention=self.applied.attention, fused_qkv=self.applied.fused_qkv, family=self.family,
            prologue=self.prologue, recipe=self.applied.recipe, vae=self.applied.vae,
            branches={n: {"calls": states[n].calls, "cached_steps": list(states[n].cached_steps)} for n in order
                      if n in states}, compile_fallbacks=dict(self.compile_fallbacks),
            lowerings=tuple(self.supported_lowerings), chains=self._chain_summaries(order),
            compiled_graphs=dict(self.compiled_graphs))


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


def _ip_adapter_scales(module: torch.nn.Module) -> tuple:
    """The IP-Adapter scales of every attention processor that has them (a hand-captured graph bakes them in): a list
    per processor (FLUX's, one per adapter) or one float (SD3's)."""
    return tuple(tuple(scale) if isinstance(scale := processor.scale, (list, tuple)) else (scale,)
                 for processor in module.attn_processors.values()
                 if "IPAdapter" in type(processor).__name__ and hasattr(processor, "scale"))


class _ChainCall:
    """What the block hooks of one chain share during one forward (hook driver)."""

    __slots__ = ("state", "step", "hit", "grouped", "glued", "base", "residual", "window", "n", "next", "inputs",
                 "args", "kwargs", "seen", "deltas")

    def __init__(self, state: BranchState, step: int, grouped: bool, glued: bool = False) -> None:
        self.state, self.step, self.grouped, self.glued = state, step, grouped, glued
        #: list -> sum of the middle blocks' own residuals so far (an index-added input: module doc)
        self.deltas: dict[int, tuple] = {}
        self.hit = False
        self.base: Optional[torch.Tensor] = None
        self.residual: Optional[torch.Tensor] = None
        self.window: Any = 0
        self.n: Any = 0
        self.next = 0  # the chain index the next block call must have
        self.inputs: dict[int, tuple] = {}  # list -> streams entering its middle blocks (block by block)
        self.args: tuple = ()  # the group's other arguments (grouped: what its later blocks must receive too)
        self.kwargs: dict = {}
        self.seen: Optional[tuple] = None  # block by block: (index, hidden out, encoder out) of the last block


class CacheRuntime(BranchedRuntime):
    """DBCache on a transformer: the one runtime (module doc). Built by :func:`dbcache_compile.optimize` before
    anything changes (building validates the block layout and touches nothing).

    Args:
        transformer: the diffusers transformer.
        family: its :class:`~dbcache_compile.families.Family` record.
        config: the cache config.
        lowering: the :class:`~dbcache_compile.lowerings.Lowering` class to run.
        mode / options: the ``torch.compile`` mode and arguments (``None`` / ``{}`` eager).
        applied: what ``optimize`` changed besides the hooks.
        watch: the optimized pipeline's :class:`GenerationWatch` (``None`` for a bare transformer).
        pipeline: the pipeline (``None`` for a bare transformer): its CFG switch for unnamed CFG calls.
    """

    def __init__(self, transformer: torch.nn.Module, family: Any, config: DBCacheConfig, lowering: type[Lowering],
                 mode: Optional[str], options: dict[str, Any], applied: Applied,
                 watch: Optional[GenerationWatch] = None, store_key: tuple = (), scope: tuple = ()) -> None:
        fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
        self.impl = lowering(mode, options, (*store_key, fn, bn, config.taylorseer_terms), scope)
        self.lowering = lowering.name
        self.mode = mode
        self.family = family.name
        self.family_record = family
        self.prologue = family.has_prologue
        self.supported_lowerings = lowerings_for(family)
        name = type(transformer).__name__
        ios: dict[type, BlockIO] = {}
        for block in family.blocks(transformer):
            if type(block) not in ios:
                contract = family.contract(type(block))
                if contract is None:
                    raise ValueError(f"{name}: no stream contract for the block class {type(block).__name__} (not in "
                                     f"diffusers' TransformerBlockRegistry nor in the {family.name} family's "
                                     f"contracts)")
                ios[type(block)] = BlockIO(type(block), contract)
        self.chains: list[GroupStep] = []
        self.block_hooks: dict = {}
        if self.prologue:
            if len(family.chains) != 1:
                raise ValueError(f"{name}: a family with a prologue runs one chain, {family.name} declares "
                                 f"{len(family.chains)}")
            self.whole_step = CacheStep(transformer, family, config, self.impl.block_call())
            num_blocks = self.whole_step.num_blocks
            from diffusers.utils import apply_lora_scale
            # the model's own forward scales PEFT LoRA layers by `<attention kwargs>["scale"]` around the blocks
            self._whole_forward = apply_lora_scale(family.attention_kwargs)(self._whole)
        else:
            # one block call shared by the groups and the block-by-block steps (one compiled region per block class)
            call = self._block_call = self.impl.block_call(BLOCK_HOOK_NAME)
            for names in family.chains:
                lists = [list(getattr(transformer, n)) for n in names]
                if fn > len(lists[0]) or bn > len(lists[-1]):
                    raise ValueError(
                        f"{name}: Fn={fn} must lie inside the first block list of each chain and Bn={bn} inside the "
                        f"last ({'+'.join(names)}: {len(lists[0])} / {len(lists[-1])} blocks)")
                blocks = [b for blocks in lists for b in blocks]
                self.chains.append(GroupStep(lists, [ios[type(b)] for b in blocks], fn, bn, call))
            self.chain_names = ["+".join(names) for names in family.chains]
            num_blocks = sum(len(c.blocks) for c in self.chains)
            self.block_hooks = {block: BlockHook(self, c, i) for c, chain in enumerate(self.chains)
                                for i, block in enumerate(chain.blocks)}
        super().__init__(transformer, config, applied, watch, num_blocks)
        self.block_hook_name = BLOCK_HOOK_NAME
        self.unsupported = family.unsupported
        self.regional_blocks = family.blocks(transformer) if self.impl.region_blocks else []
        #: whether block hooks run whole groups (a grouping lowering, and a family whose groups can run whole)
        self.grouped = self.impl.groups and not family.ungroupable
        #: (chain, index) -> output structure of the block (hook driver, recorded block by block)
        self.structure: dict[tuple[int, int], Any] = {}
        self.calls: Optional[list[_ChainCall]] = None
        #: forward inputs the model adds to the hidden stream after blocks, by index (module doc); they may change
        #: at every step, so they are not conditioning for the generation rule
        self.index_added = tuple(getattr(family, "index_added", ()))
        self.glue_reads_stream = bool(getattr(family, "glue_reads_stream", False))
        self.inputs.step_inputs = self.inputs.step_inputs | set(self.index_added)
        #: input keys at which a call without index-added inputs passed the glue-inside-a-group check block by block
        #: (only then do later calls of that key run whole groups)
        self._groups_checked: set[tuple] = set()
        #: how a block the model called runs block by block (a compiled region, or its own forward)
        self._region = self._block_call if self.impl.region_blocks and not self.prologue else None
        #: the fullgraph form under the user's own torch.compile (usercompile module doc)
        self.user_compiled = UserCompiled(self) if self.prologue else None
        self.user_hooks = UserCompiledHooks(self) if not self.prologue and not family.ungroupable else None

    # -------------------------------------------------------------------------------------------- interface
    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        return self.impl.graphs

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """Run the segments as hand-captured CUDA graphs (automatic on CUDA with a CUDA-graph mode); ``emulate=True``
        runs the same capture/replay bookkeeping without CUDA (tests)."""
        graphs = self.impl.use_segment_graphs(emulate)
        for state in self.branches.states.values():
            state.key = None  # the next step of each branch registers its buffers with the new graphs
        return graphs

    def cudagraph_status(self) -> str:
        if not self.prologue and self.impl.captures and not self.grouped:
            return f"off ({self.family} runs block by block: {self.family_record.ungroupable})"
        return self.impl.cudagraph_status(next(self.transformer.parameters()).device)

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.impl.compiled_fns.fallbacks

    @property
    def compiled_graphs(self) -> dict[str, int]:
        return self.impl.compiled_fns.graphs

    def release(self) -> None:
        self.impl.compiled_fns.release()

    def _set_config(self, config: DBCacheConfig) -> None:
        self.cache_config = config
        if self.prologue:
            self.whole_step.config = config

    def _on_new_generation(self, state: BranchState) -> None:
        self.impl.start_generation(state)

    def _fold(self) -> None:
        self.impl.fold(list(self.branches.states.values()))
        # steps run under the user's compile (usercompile), every chain's
        fold_records([s for state in self.branches.states.values() for s in (state, *state.chains)])

    def _plan_chains(self) -> list[tuple[list[torch.nn.Module], int, int]]:
        fn, bn = self.cache_config.Fn_compute_blocks, self.cache_config.Bn_compute_blocks
        if self.prologue:
            return [(self.family_record.blocks(self.transformer), fn, bn)]
        return [(list(c.blocks), fn, bn) for c in self.chains]

    def _check_generation_start(self) -> None:
        refuse_forward_replacing_hooks(self.transformer, "added after optimize()")
        refuse_offload(self.transformer, True, "after optimize()")
        refuse_offload_with_cuda_graphs(self.transformer, None, self.mode, "enabled after optimize()")
        refuse_module_hooks(self.transformer, self.mode, "added after optimize()")
        self._refuse_compiled_blocks()

    def _refuse_compiled_blocks(self) -> None:
        """Blocks that carry our block hooks and were compiled afterwards by ``module.compile()``
        (``transformer.compile_repeated_blocks``): the cache runs around their compiled call, which computes the block
        alone (:func:`~dbcache_compile.usercompile.route_compiled_blocks`)."""
        route_compiled_blocks(self.block_hooks)

    def _chain_summaries(self, order: list[str]) -> dict[str, dict]:
        if self.prologue:
            return {}
        states = self.branches.states
        main = states.get(order[0])
        cfg = states.get("uncond") if "uncond" in order[1:] else (states.get(order[1]) if len(order) > 1 else None)
        return {name: {"cached_steps": list(main.chain(c).cached_steps) if main else [],
                       "cfg_cached_steps": list(cfg.chain(c).cached_steps) if cfg else [],
                       "residual_diffs": dict(main.chain(c).diffs) if main else {},
                       "num_blocks": len(chain.blocks),
                       "branches": {n: list(states[n].chain(c).cached_steps) for n in order if n in states}}
                for c, (name, chain) in enumerate(zip(self.chain_names, self.chains))}

    # -------------------------------------------------------------------------------------------- per call
    def forward(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        if torch.compiler.is_compiling():  # the user's torch.compile / export around us (usercompile module doc)
            return traced_forward(self, module, original, args, kwargs)
        if not check_call(module):
            return original(*args, **kwargs)
        named = self.family_record.named_inputs(args, kwargs) if self.prologue else kwargs
        refused = [name for name in self.unsupported if passes(named, name)]
        if refused:
            from .families import REFUSAL_REASONS
            why = {**REFUSAL_REASONS, **self.family_record.refusal_reasons}.get(
                refused[0], "it feeds blocks by index from outside the cached chain")
            raise NotImplementedError(f"{type(module).__name__}: the cache does not implement `{refused[0]}` ({why}); "
                                      f"call dbcache_compile.disable() for this pipeline")
        attention_kwargs = named.get(self.family_record.attention_kwargs)
        # the LoRA scale changes what the segments compute without being their argument: part of a graph's key
        self.impl.variant = attention_kwargs.get("scale", 1.0) if isinstance(attention_kwargs, dict) else 1.0
        if isinstance(attention_kwargs, dict) and attention_kwargs.get("ip_adapter_image_embeds") is not None:
            # so do the IP-Adapter scales (`pipe.set_ip_adapter_scale`), Python floats on the attention processors
            self.impl.variant = (self.impl.variant, _ip_adapter_scales(module))
        if self.prologue:
            # hooks registered before ours (context-parallel input splits on the root module) sit inside our
            # forward: apply them as calling through would
            inner = inner_hooks(module, HOOK_NAME)
            for hook in inner:
                args, kwargs = hook.pre_forward(module, *args, **kwargs)
            self.whole_step.cp_group = cp_group(module)
            if self.whole_step.cp_group is not None and self.family_record.control_inputs(named):
                raise NotImplementedError(
                    f"{type(module).__name__}: ControlNet residuals under context parallelism are not implemented "
                    f"(diffusers' context-parallel plan shards the hidden stream but not the residuals added to it)")
            out = self._whole_forward(module, *args, **kwargs)
            for hook in reversed(inner):
                out = hook.post_forward(module, out)
            return out
        return self._through_model(module, original, args, kwargs)

    def _new_buffers(self, state: BranchState) -> None:
        """A branch's chain allocated buffers (new shape, dtype or device)."""
        self.impl.new_buffers(state.buffers)
        prepare = getattr(self.impl, "prepare", None)
        if prepare is not None:
            prepare(state)

    # ------------------------------------------------------------------ whole steps (families with a prologue)
    def _whole(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        kwargs = self.family_record.eager_inputs(module, args, kwargs)
        if self.impl.compile_segments or self.impl.decides_on_device:
            # a view passed into a compile keeps its fake-tensor state alive after the compile (torch 2.13): plain
            # tensors into the whole-segment graphs (FluxPipeline's img_ids is a view; one small copy)
            args = tuple(no_views(a) for a in args)
            kwargs = {k: [no_views(t) for t in v] if k in self.family_record.block_residual_inputs
                      and isinstance(v, (list, tuple)) else no_views(v) for k, v in kwargs.items()}
        state, step, key = self._begin(args, kwargs)
        if state.key != key:
            out = self._first_whole_step(state, step, args, kwargs)
        else:
            out = self._whole_step(state, step, args, kwargs)
        if self.impl.graphed:
            # a graph output lives in the graph's pool and is overwritten by the next replay (e.g. the
            # unconditional call of the same step): hand the pipeline its own copy
            out = out.clone()
        self._end(state, key)
        return transformer_output(out, return_dict)

    def _first_whole_step(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The first step of a branch at a new input signature: buffers from the family's predicted shapes, then the
        usual step (so the first generation at a shape computes exactly like the later ones); without a prediction,
        :meth:`CacheStep.first_step` (segments uncompiled, buffers from their outputs)."""
        step_fns = self.whole_step
        shapes = self.family_record.stream_shapes(step_fns.transformer, args, kwargs)
        if shapes is not None and step_fns.cp_group is not None:
            # under context parallelism the first block may shard the streams (Qwen-Image): shard the shapes alike
            shapes = tuple((split_like(step_fns.fn_blocks[0], torch.empty(shape, device="meta"), argument).shape,
                            dtype) for (shape, dtype), argument in zip(shapes, ("hidden_states",
                                                                                 "encoder_hidden_states")))
        if shapes is None:
            out = step_fns.first_step(state, step, args, kwargs)
            self._new_buffers(state)
            return out
        (hidden_shape, hidden_dtype), (encoder_shape, encoder_dtype) = shapes
        device = next(iter(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))).device
        state.allocate_shapes(hidden_shape, hidden_dtype, encoder_shape, encoder_dtype, device)
        self._new_buffers(state)
        return self._whole_step(state, step, args, kwargs)

    def _whole_step(self, state: BranchState, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """One whole step; the host reads the device at most once (only when the gates allow a hit). Graphs take the
        per-step numbers (TaylorSeer window, derivative count, forecast coefficients) in the branch's static scalar
        tensors, filled by kernel launches: no host-to-device copy (a stream sync), no recompile per value."""
        impl, step_fns = self.impl, self.whole_step
        if impl.decides_on_device:
            return impl.run_step(self, state, step, args, kwargs)
        # ControlNet residuals: new tensors at every step, inputs of the hit / miss segments too (None without)
        controls = self.family_record.control_inputs(self.family_record.named_inputs(args, kwargs))
        hidden, encoder, residual, diff, kw = impl.segment("head", step_fns.head_diff, (state.fn_residual, *args),
                                                           kwargs)
        if step == 0:
            _check_streams(state, residual, encoder)
        if decide_on_host(self.cache_config, state, step, diff):
            state.record_hit(step)
            coeffs: Any = state.forecast_coefficients(step)
            if impl.scalars_on_device:
                coeffs = state.fill_coefficients(coeffs)
            return impl.segment("hit", step_fns.hit, (state.ladder_h, state.ladder_e, hidden, encoder, kw, coeffs,
                                                      controls))
        n = state.derivatives_for_update(step)
        window: Any = step - state.last_compute
        n_arg: Any = n
        if impl.scalars_on_device:
            window, n_arg = state.fill_update_scalars(window, n)
        out = impl.segment("miss", step_fns.miss,
                           (state.fn_residual, state.ladder_h, state.ladder_e, hidden, encoder, residual, kw, window,
                            n_arg, controls), mutated=(state.fn_residual, *state.ladder_h, *state.ladder_e))
        state.record_compute(step, n)
        return out

    # ------------------------------------------------------------------ the model's own forward + block hooks
    def _index_added(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[str]:
        """The first index-added input this call passes (module doc), or ``None``; refused by name where the lowering
        runs whole groups only (``segments``)."""
        if not self.index_added:
            return None
        named = dict(zip(self.inputs.params, args), **kwargs)
        passed = next((name for name in self.index_added if passes(named, name)), None)
        if passed is not None and self.impl.compile_segments:
            raise NotImplementedError(
                f"{type(module).__name__}: graph={self.lowering!r} compiles each group of blocks as one segment, but "
                f"`{passed}` makes the forward add to the hidden stream after blocks inside the groups (by index), so "
                f"the call must run block by block; use graph='regional' (compiled blocks) or mode=None for calls "
                f"with `{passed}`")
        return passed

    def _through_model(self, module: torch.nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        glued = self._index_added(module, args, kwargs) is not None
        state, step, key = self._begin(args, kwargs)
        new_signature = state.key != key
        if new_signature:
            state.drop_buffers()
        group = cp_group(module)
        # whole groups only once a call of this key without index-added inputs passed the check block by block
        grouped = self.grouped and not new_signature and not glued and key in self._groups_checked
        calls = []
        for c, chain in enumerate(self.chains):
            chain.cp_group = group
            chain_state = state.chain(c)
            chain_state.begin_step(step)
            calls.append(_ChainCall(chain_state, step, grouped, glued))
        self.calls = calls
        try:
            out = original(*args, **kwargs)
        finally:
            self.calls = None
        for name, chain, call in zip(self.chain_names, self.chains, calls):
            if call.next != len(chain.blocks):
                raise RuntimeError(f"{type(module).__name__}'s forward called {call.next} of the {len(chain.blocks)} "
                                   f"blocks of {name}: the cache needs every block called once per forward, in order")
            if not call.hit:
                call.state.record_compute(step, call.n)
        if new_signature:
            for c in range(len(self.chains)):
                self._new_buffers(state.chain(c))
        if self.grouped and not glued:
            self._groups_checked.add(key)
        self._end(state, key)
        return out

    def block_forward(self, c: int, i: int, module: torch.nn.Module, original: Callable, args: tuple,
                      kwargs: dict) -> Any:
        if torch.compiler.is_compiling():  # the user's compile (usercompile module doc)
            return traced_block(self, c, i, module, original, args, kwargs)
        calls = self.calls
        if calls is None:  # a block called outside a cached forward
            return original(*args, **kwargs)
        chain, call = self.chains[c], calls[c]
        if i != call.next:
            raise RuntimeError(f"the cache expected block {call.next} of the chain {self.chain_names[c]} and got "
                               f"block {i}: this model calls its blocks in another order")
        call.next += 1
        if call.grouped:
            return self._grouped(c, i, chain, call, module, args, kwargs)
        return self._block_by_block(c, i, chain, call, module, original, args, kwargs)

    def _run(self, module: torch.nn.Module, io: BlockIO, original: Callable, args: tuple, kwargs: dict) -> Any:
        if self._region is not None:
            return self._region(module, io, args, kwargs)
        return original(*args, **kwargs)

    def _block_by_block(self, c: int, i: int, chain: GroupStep, call: _ChainCall, module: torch.nn.Module,
                        original: Callable, args: tuple, kwargs: dict) -> Any:
        """One block as the model called it (the eager lowering, and the first step at a new input signature of the
        grouping ones, which records each block's output structure and checks that groups can run whole)."""
        io = chain.ios[i]
        state = call.state
        first, end = chain.group_of(i)
        if call.seen is not None and first < i and not call.glued:
            self._check_group_input(c, i, chain, call, io, args, kwargs)
        if i == first:
            call.args, call.kwargs = _without_streams(io, args, kwargs)
        if i == 0:
            # under context parallelism a split hook inside ours may shard the stream: the same shard
            call.base = split_like(module, io.streams(args, kwargs)[0], io.hidden_arg, before=BLOCK_HOOK_NAME)
        decide_at_entry = call.glued and chain.fn_entry
        if decide_at_entry and i == chain.fn:
            # index-added inputs: the Fn residual holds the glue after the Fn blocks (module doc)
            self._decide(chain, call, io.streams(args, kwargs)[0] - call.base)
        if chain.fn <= i < chain.mid_end and call.hit:
            hidden, encoder = io.streams(args, kwargs)
            if call.glued and self.glue_reads_stream:
                hidden, encoder = self._hit_cancelling_glue(chain, call, i, hidden, encoder)
            else:
                j = chain.first_mid.get(i)
                if j is not None:
                    ladder_h, ladder_e = state.ladders[j]
                    hidden, encoder = chain.hit(ladder_h, ladder_e, hidden, encoder,
                                                state.forecast_coefficients(call.step))
            return self._remember(c, i, call, io, io.output(self.structure[c, i], hidden, encoder))
        if i in chain.first_mid:
            call.inputs[chain.first_mid[i]] = io.streams(args, kwargs)
        out = self._run(module, io, original, args, kwargs)
        self.structure.setdefault((c, i), BlockIO.structure(out))
        hidden, encoder = io.out_streams(out)
        if i == chain.fn - 1 and not decide_at_entry:
            self._decide(chain, call, hidden - call.base)
        if call.glued and not self.glue_reads_stream and chain.fn <= i < chain.mid_end:
            # index-added inputs: the middle residual is the sum of the blocks' own residuals, without the glue
            chain.add_delta(call.deltas, i, io.streams(args, kwargs), hidden, encoder)
        j = chain.last_mid.get(i)
        if j is not None:
            h_in, e_in = call.inputs.pop(j)
            if call.glued and not self.glue_reads_stream:
                mid_h, mid_e = call.deltas.pop(j)
            else:
                mid_h = hidden - h_in
                mid_e = encoder - e_in if encoder is not None and e_in is not None else None
            if j not in state.ladders:
                state.allocate_ladder(j, mid_h, mid_e)
            chain.store(*state.ladders[j], mid_h, mid_e, call.window, call.n)
        return self._remember(c, i, call, io, out)

    def _hit_cancelling_glue(self, chain: GroupStep, call: _ChainCall, i: int, hidden: torch.Tensor,
                             encoder: Optional[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """A middle block on a hit when the index-added glue reads the stream (``Family.glue_reads_stream``, module
        doc): every middle block returns the streams the list's first middle block got, which undoes the glue the model
        added after the previous one; the last adds the cached residual (the span's output minus its input, that
        glue included), so only the glue after the last middle block runs on the hit's stream."""
        j = next(j for j, (first, end) in chain.mid_spans.items() if first <= i < end)
        if i in chain.first_mid:
            call.inputs[j] = hidden, encoder
        hidden, encoder = call.inputs[j]
        if i in chain.last_mid:
            call.inputs.pop(j)
            ladder_h, ladder_e = call.state.ladders[j]
            hidden, encoder = chain.hit(ladder_h, ladder_e, hidden, encoder,
                                        call.state.forecast_coefficients(call.step))
        return hidden, encoder

    def _remember(self, c: int, i: int, call: _ChainCall, io: BlockIO, out: Any) -> Any:
        call.seen = (i, *io.out_streams(out))
        return out

    def _check_group_input(self, c: int, i: int, chain: GroupStep, call: _ChainCall, io: BlockIO, args: tuple,
                           kwargs: dict) -> None:
        """Block by block, inside a group: the model must pass block ``i`` the previous block's outputs and the
        group's other arguments, or a grouping lowering could not run the group as one segment."""
        if not self.grouped:
            return
        hidden, encoder = io.streams(args, kwargs)
        prev, prev_h, prev_e = call.seen
        others = _without_streams(io, args, kwargs)
        same_streams = prev == i - 1 and hidden is prev_h and (encoder is prev_e or io.encoder_out is None
                                                               or prev_e is None)
        if not same_streams or not _same_objects(others, (call.args, call.kwargs)):
            what = "streams" if not same_streams else "other arguments"
            raise ValueError(
                f"{type(self.transformer).__name__}: its forward changes the {what} passed between blocks {i - 1} and "
                f"{i} of {self.chain_names[c]} (glue inside a block list), so graph={self.lowering!r} cannot run the "
                f"group of blocks {chain.group_of(i)} as one segment; use mode=None (the eager cache). Please report "
                f"it: the family needs `ungroupable` set")

    def _decide(self, chain: GroupStep, call: _ChainCall, residual: torch.Tensor) -> None:
        """After the chain's Fn blocks: the gates, the diff (one host read when the gates allow), the Fn residual."""
        state, step = call.state, call.step
        if state.fn_residual is None:
            state.fn_residual = torch.zeros_like(residual)
            state.allocate_scalars(residual.device)
        group = chain.cp_group
        from .decision import relative_l1
        from .parallel import relative_l1_over
        diff = (relative_l1(state.fn_residual, residual) if group is None
                else relative_l1_over(state.fn_residual, residual, group))
        self._record_decision(call, decide_on_host(self.cache_config, state, step, diff), residual)

    def _record_decision(self, call: _ChainCall, hit: bool, residual: torch.Tensor) -> None:
        state, step = call.state, call.step
        call.hit = hit
        if hit:
            state.record_hit(step)
            return
        state.fn_residual.copy_(residual)
        call.n = state.derivatives_for_update(step)
        call.window = step - state.last_compute

    def _grouped(self, c: int, i: int, chain: GroupStep, call: _ChainCall, module: torch.nn.Module, args: tuple,
                 kwargs: dict) -> Any:
        """A block under a grouping lowering: the first block of a group runs the whole group as one segment, the
        others hand their inputs through (module doc)."""
        io = chain.ios[i]
        first, end = chain.group_of(i)
        hidden, encoder = io.streams(args, kwargs)
        structure = self.structure[c, i]
        if i != first:
            if not _same_objects(_without_streams(io, args, kwargs), (call.args, call.kwargs)):
                raise ValueError(f"{type(self.transformer).__name__}: block {i} of {self.chain_names[c]} got other "
                                 f"arguments than block {first} (glue inside a block list); graph={self.lowering!r} "
                                 f"runs the group as one segment: use mode=None (the eager cache)")
            return io.output(structure, hidden, encoder)
        impl, state, step = self.impl, call.state, call.step
        call.args, call.kwargs = _without_streams(io, args, kwargs)
        if i == 0:
            base = split_like(module, hidden, io.hidden_arg, before=BLOCK_HOOK_NAME)
            hidden, encoder, residual, diff = impl.segment(
                f"c{c}.head", chain.head, (state.fn_residual, base, hidden, encoder, call.args, call.kwargs))
            self._record_decision(call, decide_on_host(self.cache_config, state, step, diff), residual)
        elif i in chain.first_mid:
            j = chain.first_mid[i]
            ladder_h, ladder_e = state.ladders[j]
            if call.hit:
                coeffs: Any = state.forecast_coefficients(step)
                if impl.scalars_on_device:
                    coeffs = state.fill_coefficients(coeffs)
                hidden, encoder = impl.segment(f"c{c}.hit{j}", chain.hit,
                                               (ladder_h, ladder_e, hidden, encoder, coeffs))
            else:
                window, n = call.window, call.n
                if impl.scalars_on_device:
                    window, n = state.fill_update_scalars(window, n)
                hidden, encoder = impl.segment(
                    f"c{c}.mid{j}", chain.middle, (j, ladder_h, ladder_e, hidden, encoder, call.args, call.kwargs,
                                                   window, n),
                    mutated=tuple(t for t in (*ladder_h, *ladder_e) if t is not None))
        else:
            hidden, encoder = impl.segment(f"c{c}.tail", chain.tail, (hidden, encoder, call.args, call.kwargs))
        return io.output(structure, hidden, encoder)


def _without_streams(io: BlockIO, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call's arguments with its streams left out (``None``): what every block of a group shares."""
    return io.with_streams(args, kwargs, None, None)


def _same_objects(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two ``(args, kwargs)`` hold the very same objects (tensors by identity, other values by equality)."""
    (args_a, kwargs_a), (args_b, kwargs_b) = a, b
    if len(args_a) != len(args_b) or kwargs_a.keys() != kwargs_b.keys():
        return False
    pairs = list(zip(args_a, args_b)) + [(kwargs_a[k], kwargs_b[k]) for k in kwargs_a]
    for x, y in pairs:
        if x is y:
            continue
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)) and len(x) == len(y):
            if all(u is v for u, v in zip(x, y)):
                continue
            return False
        try:
            if x == y:
                continue
        except Exception:  # noqa: BLE001 - an uncomparable value is another value
            pass
        return False
    return True


def _check_streams(state: BranchState, residual: torch.Tensor, encoder: torch.Tensor) -> None:
    """The buffers must have the Fn outputs' shapes (a mismatch would broadcast silently in ``copy_``)."""
    if residual.shape != state.fn_residual.shape or encoder.shape != state.ladder_e[0].shape:
        raise RuntimeError(f"dbcache_compile: the Fn blocks returned streams of shapes {tuple(residual.shape)} / "
                           f"{tuple(encoder.shape)} but the family predicted {tuple(state.fn_residual.shape)} / "
                           f"{tuple(state.ladder_e[0].shape)}; please report this family bug")


class CacheHook(ModelHook):
    """The hook in the transformer's :class:`HookRegistry`: its forward is the runtime's; it is stateful, so the
    pipeline's ``cache_context`` reaches :class:`Branches` and its end-of-call reset ends the generation."""

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.branches = runtime.branches  # a StateManager attribute: diffusers sets the cache context on it

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.runtime.forward(module, self.fn_ref.original_forward, args, kwargs)
        except BaseException:
            # a call that raised (Ctrl-C, out of memory, a refused input) may have left its branch's state half
            # updated: the next call starts a new generation, whatever it passes
            self.runtime.reset()
            raise

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.finish()
        return module


class BlockHook(ModelHook):
    """The hook on one cached block (families run through their own forward)."""

    def __init__(self, runtime: CacheRuntime, chain: int, index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.chain = chain
        self.index = index
        #: the block was compiled in place (compile_repeated_blocks): the cache runs around its compiled call and
        #: this hook, inside it, only calls the block's forward (usercompile.CompiledBlockCall)
        self.through = False

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.through:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.runtime.block_forward(self.chain, self.index, module, self.fn_ref.original_forward, args, kwargs)

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # (sic: diffusers' spelling)
        unroute_compiled_block(module)
        return module


class RegionHook(ModelHook):
    """Runs a block's class ``forward`` through a compiled region (the uncached ``regional`` baseline), one
    ``torch.compile`` per block class."""

    def __init__(self, region: Callable) -> None:
        super().__init__()
        self.region = region

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return run_block_hooks(self.region, module, args, kwargs, REGION_HOOK_NAME)


class UncachedRuntime(Runtime):
    """``optimize(cache=None, ...)``: the original forward, compiled and/or quantized; the baseline that cached runs
    are measured against, built like them: ``regional`` (``auto`` on CUDA) compiles each block class as a region
    and, on CUDA with a CUDA-graph mode, captures the whole forward as one CUDA graph by hand; otherwise the whole
    forward is one fullgraph compile."""

    lowering = "uncached"
    block_hook_name = REGION_HOOK_NAME

    def __init__(self, transformer: torch.nn.Module, blocks: list[torch.nn.Module], mode: Optional[str],
                 options: Optional[dict], lowering: type[Lowering], applied: Applied, store_key: tuple = (),
                 scope: tuple = (), watch: Optional[GenerationWatch] = None) -> None:
        self.watch = watch
        self._checked_generation: Optional[int] = None
        self.mode = mode
        self.transformer = transformer
        self.applied = applied
        self._graphs: Optional[SegmentGraphs] = None
        self.regional_blocks: list[torch.nn.Module] = []
        self._compiled: Optional[Callable] = None
        self.compiled = CompiledSet(("uncached", *store_key), scope)
        if mode is not None and lowering.region_blocks:
            opts = regional_options(options or {})
            self.regional_blocks.extend(blocks)
            self.block_hooks = {block: RegionHook(compile_region(self.compiled, block, opts)) for block in blocks}
        elif mode is not None:
            self._compiled = self.compiled.compile_method("forward", type(transformer).forward, transformer, options)

    @property
    def graphs(self) -> Optional[SegmentGraphs]:
        return self._graphs

    @property
    def compile_fallbacks(self) -> dict[str, int]:
        return self.compiled.fallbacks

    @property
    def compiled_graphs(self) -> dict[str, int]:
        return self.compiled.graphs

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
        refuse_while_compiling("uncached")
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
