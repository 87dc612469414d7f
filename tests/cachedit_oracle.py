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


def cache_dit_contexts(pipe, cfg: DBCacheConfig, **call_kwargs) -> list[dict]:
    """cache-dit with its own defaults (its separate-CFG rule included): per cache context (one per block list per
    transformer, in creation order) the block list's name, cached steps, CFG-branch cached steps and diffs."""
    from cache_dit import DBCacheConfig as CacheDitConfig

    cd_config = CacheDitConfig(
        Fn_compute_blocks=cfg.Fn_compute_blocks, Bn_compute_blocks=cfg.Bn_compute_blocks,
        residual_diff_threshold=cfg.residual_diff_threshold, max_warmup_steps=cfg.max_warmup_steps,
        warmup_interval=cfg.warmup_interval, max_cached_steps=cfg.max_cached_steps,
        max_continuous_cached_steps=cfg.max_continuous_cached_steps)
    cache_dit.enable_cache(pipe, cache_config=cd_config)
    try:
        pipe(**call_kwargs)
        return [{"list": name.rsplit("_", 1)[0], "cached": list(ctx.cached_steps),
                 "cfg_cached": list(ctx.cfg_cached_steps or []),
                 "diffs": {int(k): float(v) for k, v in ctx.residual_diffs.items()}}
                for name, ctx in pipe._context_manager._cached_context_manager.items()]
    finally:
        cache_dit.disable_cache(pipe)
