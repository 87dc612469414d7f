"""Benchmarks of ``dbcache_compile`` against its uncached runs and its peers (cache-dit, diffusers' First Block
Cache): measured wall-clock, compile time, peak memory, cached steps, executed TFLOPs and image quality, written as
``results.md`` / ``results.json`` / ``speedup_vs_psnr.png``.

Run ``python -m bench --help`` from the repository root; ``bench/README.md`` has the recipes.
"""

from .cli import main

__all__ = ["main"]
