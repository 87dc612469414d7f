"""dbcache_compile: DBCache (Dual Block Cache) + torch.compile + torchao for diffusers diffusion transformers."""

from .calibrate import CalibrationResult, calibrate
from .compile_cache import compile_cache_of
from .config import DBCacheConfig
from .export import LoadedCachedTransformer, export, load
from .families import supported_models
from .optimize import disable, optimize, reset, runtime_of, summary
from .stats import CacheSummary

__all__ = ["DBCacheConfig", "CacheSummary", "optimize", "disable", "reset", "summary", "runtime_of", "export", "load",
           "LoadedCachedTransformer", "supported_models", "calibrate", "CalibrationResult", "compile_cache_of"]
__version__ = "0.1.0"
