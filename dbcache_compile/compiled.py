"""Compiled functions, kept in one process-wide store so that they are compiled once.

Every function the cache compiles (a block region, a segment, a whole step, the uncached forward) is a
``torch.compile`` of its own copy of the function (a fresh code object: Dynamo keeps compiled graphs and its recompile
limit per code object), taken from :data:`STORE` under a key of what really changes its graphs:

* a block region: the block's structure (its class, its submodules' and attention processors' classes:
  :func:`~dbcache_compile.step.block_structure`) and the compile options (it serves every model, config and block
  of that structure);
* a segment or step: the transformer class and config, the family, the lowering, the compile options, the block
  split (Fn, Bn), the TaylorSeer order and the quantization.

Thresholds, warm-up, the cached-step limits and the steps mask are never in a graph (they are host data, or device
scalars of the ``cond`` graph), and the model's weights are graph inputs (Dynamo lifts the parameters of the modules
it traces), so an ``optimize`` → ``disable`` → ``optimize`` cycle with another threshold, and another pipeline built
from the same model class and config, reuse the graphs instead of compiling them again. Input shapes, dtypes and
devices are told apart by Dynamo's guards within one entry (a new shape is a new graph of the same function, within
torch's recompile limit per function, ``torch._dynamo.config.recompile_limit``, 8 by default).

The store is bounded: an LRU of at most :func:`store_limit` compiled functions (``DBCACHE_COMPILE_STORE`` in the
environment, default 32); an evicted function's graphs are dropped (and compiled again if a live runtime still uses
it). :func:`clear` drops everything (``dbcache_compile.clear_compiled()``); with a limit of 0 nothing is kept, and
``disable()`` drops what its runtime compiled, as before the store.
"""

from __future__ import annotations

import collections
import functools
import os
import types
from typing import Any, Callable, Optional

import torch

from .recipe import torch_compile_args
from .step import fresh_function

__all__ = ["CUDAGRAPH_MODES", "regional_options", "CompiledSet", "Compiled", "STORE", "clear", "store_limit"]

#: the ``torch.compile`` modes that capture CUDA graphs (cudagraph trees)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def regional_options(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` options of block regions: CUDA graphs are captured around whole segments instead (by
    hand), so the regions themselves are compiled without cudagraph trees."""
    opts = dict(options)
    if "backend" not in opts and opts.get("mode") in CUDAGRAPH_MODES:
        opts["mode"] = "max-autotune-no-cudagraphs" if opts["mode"] == "max-autotune" else "default"
    return opts


def freeze(value: Any) -> Any:
    """A hashable form of compile options (a callable backend by identity: the store keeps it alive)."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _cache_entries(code: types.CodeType) -> list:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return _debug_get_cache_entry_list(code)


class Compiled:
    """A compiled function that, when Dynamo's recompile limit for it is reached (a new shape after its budget is
    spent), runs its plain function for that call instead of failing the request, counted in ``fallbacks``
    (``summary().compile_fallbacks``) and warned about once. Nothing runs before Dynamo refuses, so the retry is
    safe."""

    def __init__(self, name: str, fn: Callable, options: dict[str, Any]) -> None:
        self.name = name
        self.fn = fn
        self.options = options
        self.code = fn.__code__
        self.compiled = torch.compile(fn, **torch_compile_args(options))
        self.fallbacks = 0

    @property
    def graphs(self) -> int:
        """Graphs Dynamo holds for this function."""
        return len(_cache_entries(self.code))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self.fallbacks:
                import warnings
                warnings.warn(f"dbcache_compile: torch's recompile limit ({torch._dynamo.config.recompile_limit}) is "
                              f"reached for the {self.name!r} graph of this transformer; calls with new input shapes "
                              f"run it uncompiled (see summary().compile_fallbacks). Pass compile_options="
                              f"{{'dynamic': True}} for shape-generic graphs, or raise "
                              f"torch._dynamo.config.recompile_limit", stacklevel=3)
            self.fallbacks += 1
            return self.fn(*args, **kwargs)

    def release(self) -> None:
        """Drop Dynamo's compiled entries of this function, and the finalizers Dynamo's guards put on the objects
        they guard (the model's modules, which live on): each holds its guard manager, and through it the compile's
        state, until the module dies (torch 2.11-2.14 does not detach them when a code's entries are reset)."""
        from torch._C._dynamo.eval_frame import reset_code
        managers = {id(entry.guard_manager) for entry in _cache_entries(self.code)}
        reset_code(self.code)
        _detach_guard_finalizers(managers)


def _detach_guard_finalizers(managers: set[int]) -> None:
    """Detach the ``weakref.finalize`` callbacks of Dynamo's ``CheckFunctionManager.invalidate`` whose guard manager
    is one of ``managers`` (see :meth:`Compiled.release`)."""
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


class CompiledStore:
    """The process-wide LRU of compiled functions (module doc)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: collections.OrderedDict[tuple, Compiled] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, name: str, fn: Callable, options: dict[str, Any]) -> tuple[Compiled, bool]:
        """The compiled function under ``key`` (``fn``'s own copy compiled on a miss) and whether it was stored."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry, True
        entry = Compiled(name, fresh_function(fn), options)
        if self.limit > 0:
            self._entries[key] = entry
            while len(self._entries) > self.limit:
                _, old = self._entries.popitem(last=False)
                old.release()
        return entry, False

    def clear(self) -> None:
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            entry.release()


STORE = CompiledStore(int(os.environ.get("DBCACHE_COMPILE_STORE", "32")))


def clear() -> None:
    """Drop every compiled function of the process-wide store and its graphs (``dbcache_compile.clear_compiled``)."""
    STORE.clear()


def store_limit(limit: Optional[int] = None) -> int:
    """The store's bound in compiled functions (set it with ``limit``; 0 keeps nothing). Returns the bound."""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"the compile store's limit must be an int >= 0, got {limit!r}")
        STORE.limit = limit
        while len(STORE._entries) > limit:
            _, old = STORE._entries.popitem(last=False)
            old.release()
    return STORE.limit


class CompiledSet:
    """The compiled functions one runtime uses, taken from :data:`STORE`: what their graphs cost (``graphs``:
    reused from the store vs compiled while this runtime ran), the calls each ran uncompiled at its recompile limit
    (``fallbacks``, shown by ``summary()``), and their release at ``disable()`` when the store keeps nothing.

    Args:
        base: what changes a segment's graphs besides its function and options (module doc): part of every key of
            :meth:`compile` with ``structural=True``.
        scope: part of every key (a ``compile_cache`` directory: what compiles for it must be written there, not
            taken from graphs that other runtimes compiled).
    """

    def __init__(self, base: tuple = (), scope: tuple = ()) -> None:
        self.base = base
        self.scope = scope
        self.items: list[Compiled] = []
        self._start: dict[int, tuple[int, int]] = {}  # id(compiled) -> (graphs, fallbacks) when this set took it
        self._stored: set[int] = set()

    def compile(self, name: str, fn: Callable, options: dict[str, Any], structural: bool = True,
                extra: tuple = ()) -> Compiled:
        """``torch.compile`` of (a copy of) ``fn`` from the store: ``structural=False`` for a function whose graphs
        depend on nothing but its arguments and ``extra`` (a block region: its block class)."""
        key = (name, fn.__module__, fn.__qualname__, self.base if structural else extra, freeze(options), self.scope)
        compiled, stored = STORE.get(key, name, fn, options)
        if id(compiled) not in self._start:
            self.items.append(compiled)
            self._start[id(compiled)] = (compiled.graphs, compiled.fallbacks)
            if stored:
                self._stored.add(id(compiled))
        return compiled

    def compile_method(self, name: str, method: Callable, owner: Any, options: dict[str, Any]) -> Callable:
        """``owner.method`` compiled from the store: the unbound function, called with ``owner`` as its first
        argument (another owner of the same structure reuses the graphs)."""
        return functools.partial(self.compile(name, getattr(method, "__func__", method), options), owner)

    @property
    def fallbacks(self) -> dict[str, int]:
        counts = {}
        for compiled in self.items:
            n = compiled.fallbacks - self._start[id(compiled)][1]
            if n:
                counts[compiled.name] = counts.get(compiled.name, 0) + n
        return counts

    @property
    def graphs(self) -> dict[str, int]:
        """``{"reused": graphs the store held when this runtime took its functions, "compiled": graphs added
        since}``."""
        reused = sum(self._start[id(c)][0] for c in self.items if id(c) in self._stored)
        total = sum(c.graphs for c in self.items)
        start = sum(self._start[id(c)][0] for c in self.items)
        return {"reused": reused, "compiled": max(total - start, 0)}

    def release(self) -> None:
        """``disable()``: with a store that keeps nothing, drop this runtime's graphs (otherwise the store keeps them
        for the next ``optimize``)."""
        if STORE.limit == 0:
            for compiled in self.items:
                compiled.release()
        self.items.clear()
        self._start.clear()
        self._stored.clear()
