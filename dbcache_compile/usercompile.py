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
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["UserCompileError", "REASONS", "refuse", "refuse_while_compiling"]

_COMPILE_THROUGH = ("compile through the cache instead: dbcache_compile.optimize(pipe, cache=..., mode='default' or "
                    "'max-autotune', graph='cond' | 'segments' | 'regional'), and package it with "
                    "dbcache_compile.export(...)")

#: kind of refusal -> its message (Dynamo's ``reason``; the start of the eager error)
REASONS: dict[str, str] = {
    "cache": ("dbcache_compile: torch.compile / transformer.compile() / torch.export around a transformer optimized "
              "by dbcache_compile cannot trace its cache: the cache decides on the host once per step and keeps its "
              "generations in Python state (a traced decision would be frozen into the graph: a wrong image). "
              + _COMPILE_THROUGH),
    "blocks": ("dbcache_compile: blocks of a transformer optimized by dbcache_compile (the cache's block hooks: a "
               "family that runs its own forward) cannot be compiled by torch.compile / compile_repeated_blocks(): "
               "the per-block hooks are Python state that Dynamo would specialise per block and per step. Compile "
               "through the cache instead: dbcache_compile.optimize(pipe, cache=..., mode='default', "
               "graph='regional') compiles one region per block class"),
    "uncached": ("dbcache_compile: torch.compile / transformer.compile() / torch.export around a transformer "
                 "optimized by dbcache_compile.optimize(cache=None, ...) (the uncached baseline: compiled and/or "
                 "quantized by optimize) is not supported: call dbcache_compile.disable() first and compile the "
                 "model yourself, or keep optimize's compile"),
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
