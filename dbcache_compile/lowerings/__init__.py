"""Lowerings: how the cache step runs, one registered class each (one file per lowering in this package). A lowering
declares what it needs and gives as class attributes; :func:`dbcache_compile.optimize` asks this registry
(:func:`resolve`), and nothing outside it branches on a lowering's name.

A lowering runs the step's **segments** (:mod:`dbcache_compile.step`: a family with a prologue runs whole steps —
``head`` / ``miss`` / ``hit`` —, every other family runs groups of blocks from inside its own forward — ``head``,
one ``middle`` per block list, ``tail``) and decides three things:

* how a segment calls a block: plainly, or through a compiled region per block class (``region_blocks``);
* how a segment runs: plainly, or compiled whole with ``fullgraph=True`` (``compile_segments``);
* whether segments are captured by hand as CUDA graphs on CUDA with a CUDA-graph mode
  (:mod:`dbcache_compile.cudagraphs`), so that a step is a few graph replays and at most one host read.

A lowering with ``decides_on_device`` (``cond``) runs the whole step itself, decision included.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Optional

import torch

from ..compiled import CUDAGRAPH_MODES, CompiledSet, regional_options
from ..cudagraphs import SegmentGraphs
from ..step import BlockCall, call_block, plain_call, region_call

__all__ = ["Lowering", "register_lowering", "lowering_named", "registered", "lowerings_for", "resolve",
           "GRAPHS", "CUDAGRAPH_MODES"]

#: what ``optimize(graph=...)`` accepts: ``"auto"`` or a registered lowering's name (the eager one needs no mode)
GRAPHS = ("auto", "segments", "cond", "regional")


class Lowering:
    """One way of running the cache step; subclasses are registered with :func:`register_lowering`.

    Capabilities (class attributes, what :func:`resolve` and ``summary()`` read):
        name: what ``optimize(graph=...)`` says.
        compiled: needs a ``torch.compile`` mode (``optimize(mode=...)``).
        needs_prologue: runs only families that write out the forward around their blocks (``cond``).
        groups: block hooks run whole groups of blocks as one segment (else block by block).
        needs_groups: cannot run a family whose groups cannot run as one segment (``Family.ungroupable``).
        region_blocks / compile_segments / captures: the three choices of the module doc.
        decides_on_device: the decision is a device predicate inside the graph (no host read).
        exportable: what :func:`dbcache_compile.export` packages.
        runs_quantized: runs torchao tensor-subclass weights.
        context_parallel: runs under diffusers' context parallelism.
    """

    name = ""
    compiled = True
    needs_prologue = False
    groups = True
    needs_groups = False
    region_blocks = False
    compile_segments = False
    captures = True
    decides_on_device = False
    exportable = False
    runs_quantized = True
    context_parallel = True
    #: why a combination is refused: ``(condition, message)`` pairs are checked by :meth:`check`
    description = ""

    def __init__(self, mode: Optional[str], options: dict[str, Any], store_key: tuple = (), scope: tuple = ()) -> None:
        self.mode = mode
        self.options = dict(options)
        #: the compiled functions this lowering uses, from the process-wide store under ``store_key`` (what changes
        #: its graphs: :mod:`dbcache_compile.compiled`) and ``scope``
        self.compiled_fns = CompiledSet((self.name, *store_key), scope)
        #: a value that changes what segments compute without being their argument (the LoRA scale); set by the
        #: runtime before each step, part of a hand-captured graph's key
        self.variant: Any = None
        self.graphs: Optional[SegmentGraphs] = None
        self._want_graphs = self.captures and mode in CUDAGRAPH_MODES and "backend" not in self.options
        self._segment_fns: dict[str, Callable] = {}

    # ------------------------------------------------------------------------------------------ declared checks
    @classmethod
    def check(cls, family: Any, mode: Optional[str], quantized: bool) -> Optional[str]:
        """Why this lowering cannot run ``family`` with this mode and quantization (``None``: it can)."""
        if cls.compiled and mode is None:
            return (f"graph={cls.name!r} is a compiled lowering and needs a compile mode (mode='default', "
                    f"'max-autotune', ...); without one the cache runs eagerly (leave graph='auto')")
        if cls.name in family.refused_lowerings:
            return (f"{family.transformer} ({family.name}) cannot run graph={cls.name!r}: "
                    f"{family.refused_lowerings[cls.name]}. Use mode=None (the eager cache)")
        if cls.needs_groups and family.ungroupable and not family.has_prologue:
            return (f"{family.transformer} ({family.name}) cannot run graph={cls.name!r}, which runs groups of blocks "
                    f"as one segment: {family.ungroupable}. Use graph='regional' (block by block) or mode=None")
        if cls.needs_prologue and not family.has_prologue:
            with_prologue = ", ".join(f.name for f in _families() if f.has_prologue)
            return (f"graph={cls.name!r} runs the whole step as one graph, which needs a family that writes out the "
                    f"forward around its blocks (a prologue: {with_prologue}); {family.transformer} runs its own "
                    f"forward. Use graph='segments' or 'regional'")
        if quantized and not cls.runs_quantized:
            return (f"graph={cls.name!r} cannot run quantized (tensor-subclass) weights: torch.cond has no rule for "
                    f"tensor subclasses in torch 2.11-2.14 ('no rule registered for HOP cond and subclass'); use "
                    f"graph='regional' or graph='segments'")
        return None

    # ------------------------------------------------------------------------------------------ blocks
    def block_call(self, skip_hook: Optional[str] = None) -> BlockCall:
        """How a segment calls a block (``skip_hook``: our own block hook on it, which the call must not enter)."""
        if self.region_blocks:
            return region_call(regional_options(self.options), self.compiled_fns, skip_hook)
        return plain_call(skip_hook) if skip_hook is not None else call_block

    # ------------------------------------------------------------------------------------------ segments
    def segment(self, name: str, fn: Callable, args: tuple, kwargs: Optional[dict] = None,
                mutated: tuple = ()) -> Any:
        """Run segment ``name`` (``fn``, a bound method of a step object) with these arguments: plainly, compiled
        whole, and/or as a replay of its hand-captured CUDA graph. ``mutated``: the buffers it updates in place
        (restored after a capture's warm-up)."""
        run = self._segment_fns.get(name)
        if run is None:
            run = fn
            if self.compile_segments:
                options = regional_options(self.options) if self.captures else self.options
                run = self.compiled_fns.compile_method(name, fn, fn.__self__, options)
            self._segment_fns[name] = run
        if self.graphs is None:
            return run(*args, **(kwargs or {}))
        return self.graphs(name, run, args, kwargs, mutated=mutated, variant=self.variant)

    @property
    def graphed(self) -> bool:
        """Whether segment outputs live in a CUDA-graph pool (the runtime hands the pipeline a copy)."""
        return self.graphs is not None

    @property
    def scalars_on_device(self) -> bool:
        """Whether per-step numbers reach the segments as static device scalars (graphs) or Python numbers."""
        return self.graphs is not None or self.compile_segments

    def new_buffers(self, buffers: list[torch.Tensor]) -> None:
        """A branch allocated buffers (new shape, dtype or device): graphs read them in place."""
        if not buffers:
            return
        device = buffers[0].device
        if self.graphs is not None and not self.graphs.emulate and device.type != "cuda":
            self.graphs = None  # the transformer moved off CUDA: no graphs there
        elif self.graphs is None and self._want_graphs and device.type == "cuda":
            self.graphs = SegmentGraphs()
        if self.graphs is not None:
            self.graphs.mark_static(buffers)
        if self.compile_segments:
            for buf in buffers:
                torch._dynamo.mark_static_address(buf)

    def use_segment_graphs(self, emulate: bool = False) -> SegmentGraphs:
        """Run the segments as hand-captured CUDA graphs (automatic on CUDA with a CUDA-graph mode); ``emulate=True``
        runs the same capture/replay bookkeeping without CUDA (tests)."""
        if not self.captures:
            raise ValueError(f"segment graphs belong to the lowerings that capture them by hand "
                             f"({', '.join(c.name for c in registered() if c.captures)}), not {self.name!r}")
        if self.graphs is None or self.graphs.emulate != emulate:
            self.graphs = SegmentGraphs(emulate=emulate)
        return self.graphs

    def cudagraph_status(self, device: torch.device) -> str:
        if self.graphs is not None:
            kind = "emulated" if self.graphs.emulate else "captured"
            return (f"{kind} by hand: one CUDA graph per segment and input shape ({self.graphs.captures} captured, "
                    f"{self.graphs.replays} replays)")
        if not self.captures:
            return "off (eager)" if not self.compiled else "off"
        if device.type != "cuda":
            return f"n/a ({device.type})"
        if not self._want_graphs:
            return f"off (mode={self.mode})"
        return "not captured yet (each segment is captured at its first use)"

    # ------------------------------------------------------------------------------------------ on-device lowerings
    def start_generation(self, state: Any) -> None:
        """A branch starts a new generation (its host counters were just reset)."""

    def run_step(self, runtime: Any, state: Any, step: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The whole step, decision included (``decides_on_device`` lowerings)."""
        raise NotImplementedError

    def fold(self, states: list[Any]) -> None:
        """Bring device-side records into the branches' host lists (``decides_on_device``)."""


_REGISTRY: dict[str, type[Lowering]] = {}


def register_lowering(cls: type[Lowering]) -> type[Lowering]:
    """Class decorator: register a lowering under its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise TypeError(f"lowering {cls.__name__}: a unique name is required (got {cls.name!r})")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    if not _REGISTRY:
        for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
            importlib.import_module(f"{__name__}.{module}")


def _families() -> list[Any]:
    from ..families import families
    return families()


def registered() -> list[type[Lowering]]:
    """Every registered lowering, the eager one first."""
    _load()
    return sorted(_REGISTRY.values(), key=lambda c: (c.compiled, c.name))


def lowering_named(name: str) -> type[Lowering]:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"no lowering named {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def lowerings_for(family: Any) -> tuple[str, ...]:
    """The lowerings that can run ``family`` (some compile mode, unquantized): ``summary()`` and the README table."""
    return tuple(c.name for c in registered() if c.check(family, None if not c.compiled else "default", False) is None)


def resolve(graph: str, mode: Optional[str], device: torch.device, quantized: bool, family: Any,
            cached: bool = True) -> type[Lowering]:
    """The lowering ``optimize(graph=..., mode=...)`` means for this family, device and quantization; a clear
    error for an impossible combination.

    ``auto``: ``regional`` on CUDA (block regions compile in seconds where whole-segment graphs of the FLUX-size
    model take minutes, and the hand-captured segment graphs keep every step a CUDA-graph replay; docs/design.md),
    ``segments`` elsewhere (on CPU as fast as ``cond`` and faster than ``regional``, and its graphs hit Inductor's
    on-disk cache: bench/results/lowerings_cpu.md), the eager one without a mode."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    _load()
    if mode is None:
        if graph != "auto":
            raise ValueError(lowering_named(graph).check(family, None, quantized) or f"graph={graph!r} needs a mode")
        return lowering_named("eager")
    if graph == "auto":
        graph = "regional" if device.type == "cuda" else "segments"
    cls = lowering_named(graph)
    if not cached and cls.decides_on_device:
        raise ValueError(f"graph={graph!r} needs a cache (the decision is its graph's predicate); without one use "
                         f"graph='regional' or 'segments' (a whole-forward compile)")
    reason = cls.check(family, mode, quantized) if cached else None
    if reason is not None:
        raise (NotImplementedError if quantized and not cls.runs_quantized else ValueError)(reason)
    return cls
