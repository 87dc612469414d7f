"""Benchmarks of ``dbcache_compile`` against its uncached runs and its peers (cache-dit, diffusers' First Block
Cache), and the studies behind the library's defaults (compile and step times per lowering, cold start, the
threshold shift under quantization), all behind one entry point: ``python -m bench <subcommand>``.

Run ``python -m bench --help`` from the repository root; ``bench/README.md`` has the recipes.
"""

from .cli import main

__all__ = ["main"]
