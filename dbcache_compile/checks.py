"""Checks that turn wrong input into a named error before anything runs: the types of :func:`dbcache_compile.optimize`'s
arguments, and the diffusers hooks on the transformer's modules that a compiled lowering cannot run through (checked at
``optimize`` and again at the start of every generation, since they can be added afterwards)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from .config import _is_bool, _show

__all__ = ["MODULE_HOOKS", "check_optimize_arguments", "module_hooks", "refuse_module_hooks"]

#: diffusers hooks that change what a block computes or where its weights live during the forward (layerwise
#: casting re-casts parameters, group offloading moves them in and out): fine with the eager lowering, refused with
#: compiled ones (Dynamo cannot trace the parameter swaps: "Attempted to use torch.nn.Parameter() constructor")
MODULE_HOOKS = ("layerwise_casting", "group_offloading", "lazy_prefetch_group_offloading")


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"optimize({name}=...) must be {expected}, got {_show(value)} of type {type(value).__name__}")


def _check_compile_options(options: Any) -> None:
    """``compile_options``: a dict of ``torch.compile`` keyword arguments (this torch's signature), without the two
    that ``optimize`` sets itself (``mode``: its own argument; ``fullgraph``: always ``True``)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise TypeError(f"compile_options must be a dict of torch.compile arguments (e.g. {{'dynamic': True}}), got "
                        f"{type(options).__name__} {_show(options)}")
    allowed = [p for p in inspect.signature(torch.compile).parameters if p != "model"]
    for key, value in options.items():
        if not isinstance(key, str) or key not in allowed:
            raise TypeError(f"compile_options has {_show(key)}, which is no torch.compile argument (torch "
                            f"{torch.__version__} takes {', '.join(allowed)})")
        if key == "mode":
            raise ValueError("compile_options['mode'] is optimize()'s own argument: pass optimize(mode=...)")
        if key == "fullgraph" and value is not True:
            raise ValueError(f"compile_options['fullgraph']={_show(value)}: the cache's graphs are always compiled "
                             f"with fullgraph=True (a graph break would hide a host sync); leave it out")
    flags = {"dynamic": (True, "None, True or False"), "disable": (False, "True or False")}
    for key, (none_ok, expected) in flags.items():
        value = options.get(key)
        if key in options and not (_is_bool(value) or (none_ok and value is None)):
            raise TypeError(f"compile_options[{key!r}] must be {expected}, got {_show(value)} of type "
                            f"{type(value).__name__}")
    if options.get("options") is not None and not isinstance(options["options"], dict):
        raise TypeError(f"compile_options['options'] must be a dict of Inductor settings, got "
                        f"{type(options['options']).__name__}")
    backend = options.get("backend")
    if backend is not None and not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"compile_options['backend'] must be a backend name or a callable, got "
                        f"{type(backend).__name__}")


def check_optimize_arguments(mode: Any, graph: Any, compile_options: Any, quantize_filter: Any, attention: Any,
                             fuse_qkv: Any, prologue: Any, modes: tuple, graphs: tuple) -> None:
    """The types of ``optimize``'s flags and options (values are checked where they are used): a ``TypeError``
    (wrong type) or ``ValueError`` (wrong value) naming the argument. ``fuse_qkv="yes"`` used to count as True."""
    if mode is not None and not isinstance(mode, str):
        raise _type_error("mode", f"None or one of {modes[1:]}", mode)
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    if not isinstance(graph, str):
        raise _type_error("graph", f"one of {graphs}", graph)
    if graph not in graphs:
        raise ValueError(f"graph must be one of {graphs}, got {graph!r}")
    _check_compile_options(compile_options)
    if quantize_filter is not None and not callable(quantize_filter):
        raise _type_error("quantize_filter", "None or a callable (module, name) -> bool", quantize_filter)
    from .attention import Auto
    if attention is not None and not isinstance(attention, (str, Auto)):
        raise _type_error("attention", "None, 'auto', dbcache_compile.attention.Auto(...) or a diffusers attention "
                          "backend name", attention)
    if not _is_bool(fuse_qkv):
        raise _type_error("fuse_qkv", "True or False", fuse_qkv)
    if prologue is not None and not _is_bool(prologue):
        raise _type_error("prologue", "None, True or False", prologue)


def module_hooks(transformer: torch.nn.Module) -> list[str]:
    """Names of the :data:`MODULE_HOOKS` on the transformer or any of its modules."""
    found = set()
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            found.update(name for name in getattr(registry, "hooks", {}) if name in MODULE_HOOKS)
    return sorted(found)


def refuse_module_hooks(transformer: torch.nn.Module, mode: Optional[str], when: str) -> None:
    """A ``ValueError`` naming the :data:`MODULE_HOOKS` found, with a compiled lowering (``mode`` set); the eager
    cache (``mode=None``) runs them."""
    if mode is None:
        return
    hooks = module_hooks(transformer)
    if hooks:
        raise ValueError(f"the transformer has diffusers {', '.join(hooks)} hooks {when}, which change modules during "
                         f"the forward: a fullgraph compile (mode={mode!r}) cannot run through them. Use mode=None "
                         f"(eager cache) or remove those hooks")
