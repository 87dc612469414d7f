"""Compiled functions of a runtime: one ``torch.compile`` per function through a fresh code object (its own
recompile budget), a reported eager fallback at torch's recompile limit, and their release at ``disable()``."""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

from .step import fresh_function

__all__ = ["CUDAGRAPH_MODES", "regional_options", "CompiledSet", "Compiled", "compile_method"]

#: the ``torch.compile`` modes that capture CUDA graphs (cudagraph trees)
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
