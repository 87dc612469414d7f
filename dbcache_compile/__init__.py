"""dbcache_compile: DBCache (Dual Block Cache) + torch.compile + torchao for diffusers diffusion transformers.

``import dbcache_compile`` imports nothing but this file: the public names below are loaded at their first use
(PEP 562), so the import is quiet and fast. diffusers' hook modules (which import peft, transformers and, through
them, torchao when those are installed) load with ``optimize`` and friends; torchao itself only when quantizing.
"""

import importlib
import types

#: public name -> the submodule that defines it (and the name there, where it differs)
_PUBLIC = {
    "DBCacheConfig": "config", "CacheSummary": "stats", "optimize": "optimize", "disable": "optimize",
    "reset": "optimize", "summary": "optimize", "runtime_of": "optimize", "is_optimized": "optimize",
    "export": "export", "load": "export", "LoadedCachedTransformer": "export", "supported_models": "families",
    "calibrate": "calibrate", "CalibrationResult": "calibrate", "clear_compiled": ("compiled", "clear"),
    "compile_store_limit": ("compiled", "store_limit"), "compile_cache_of": "compile_cache",
}

__all__ = ["DBCacheConfig", "CacheSummary", "optimize", "disable", "reset", "summary", "runtime_of", "is_optimized",
           "export", "load", "LoadedCachedTransformer", "supported_models", "calibrate", "CalibrationResult",
           "clear_compiled", "compile_store_limit", "compile_cache_of"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _PUBLIC[name] if isinstance(_PUBLIC[name], tuple) else (_PUBLIC[name], name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Three functions share their submodule's name (``optimize``, ``export``, ``calibrate``). Importing such a
    submodule (``from dbcache_compile.optimize import COMPILE_MODES``) makes Python bind the package attribute to the
    submodule; here it binds the function instead, as the eager ``from .optimize import optimize`` used to."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
del _sys
