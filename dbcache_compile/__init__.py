"""dbcache_compile: DBCache (Dual Block Cache) + torch.compile + torchao for diffusers diffusion transformers."""

from .calibrate import CalibrationResult, calibrate
from .compiled import clear as clear_compiled
from .compiled import store_limit as compile_store_limit
from .config import DBCacheConfig
from .export import LoadedCachedTransformer, export, load
from .families import supported_models
from .optimize import disable, is_optimized, optimize, reset, runtime_of, summary
from .stats import CacheSummary

__all__ = ["DBCacheConfig", "CacheSummary", "optimize", "disable", "reset", "summary", "runtime_of", "is_optimized",
           "export", "load",
           "LoadedCachedTransformer", "supported_models", "calibrate", "CalibrationResult", "clear_compiled",
           "compile_store_limit"]
__version__ = "0.1.0"
