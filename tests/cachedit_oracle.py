"""Run cache-dit 1.5.3 (the oracle) on a pipeline with a DBCacheConfig of ours and return its decisions."""

from __future__ import annotations

import logging

import pytest

from dbcache_compile import DBCacheConfig

cache_dit = pytest.importorskip("cache_dit", reason="cache-dit==1.5.3 is not installed (pip install -e '.[test]')")
logging.getLogger("cache_dit").setLevel(logging.ERROR)


def run_cache_dit(pipe, cfg: DBCacheConfig, separate_cfg: bool, **call_kwargs):
    """(images, cached_steps, cfg_cached_steps, residual_diffs) from cache-dit with the same settings."""
    from cache_dit import DBCacheConfig as CacheDitConfig
    from cache_dit import TaylorSeerCalibratorConfig

    cd_config = CacheDitConfig(
        Fn_compute_blocks=cfg.Fn_compute_blocks, Bn_compute_blocks=cfg.Bn_compute_blocks,
        residual_diff_threshold=cfg.residual_diff_threshold, max_warmup_steps=cfg.max_warmup_steps,
        warmup_interval=cfg.warmup_interval, max_cached_steps=cfg.max_cached_steps,
        max_continuous_cached_steps=cfg.max_continuous_cached_steps, enable_separate_cfg=separate_cfg,
        steps_computation_mask=list(cfg.steps_computation_mask) if cfg.steps_computation_mask else None)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=cfg.taylorseer_order) if cfg.taylorseer else None
    cache_dit.enable_cache(pipe, cache_config=cd_config, calibrator_config=calibrator)
    try:
        images = pipe(**call_kwargs).images
        stats = cache_dit.summary(pipe)
        stats = stats[0] if isinstance(stats, list) else stats
        diffs = {int(k): v for k, v in stats.residual_diffs.items()}
        return images, list(stats.cached_steps), list(stats.cfg_cached_steps or []), diffs
    finally:
        cache_dit.disable_cache(pipe)
