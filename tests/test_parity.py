"""Parity with cache-dit 1.5.3: same tiny pipeline, same config, same inputs => the same cached steps (both CFG
branches) and the same images within float32 rounding."""

import pytest
import torch

import dbcache_compile as dbc
from cachedit_oracle import run_cache_dit
from conftest import generator
from dbcache_compile.testing import flux_inputs, qwen_inputs, tiny_flux_pipeline, tiny_qwen_pipeline

FLUX_CONFIGS = [
    "F1B0_W2M0MC3_T0O1_R0.35",
    "F2B1_W3I2M0MC2_T1O2_R0.4",
    "F1B0_W2M0MC3_T1O1_R0.35",
    "F3B2_W1M4MC0_T0O1_R0.45",
    "F1B0_W4M0MC6_T0O1_R1.0",  # forced schedule: every allowed step hits
]


def _ours(pipe, cfg, **kwargs):
    dbc.optimize(pipe, cache=cfg)
    try:
        images = pipe(**kwargs).images
        return images, dbc.summary(pipe)
    finally:
        dbc.disable(pipe)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen_pipeline()


def _assert_parity(ours, summary, theirs):
    images, cached, cfg_cached, diffs = theirs
    assert summary.cached_steps == cached
    assert summary.cfg_cached_steps == cfg_cached
    assert summary.residual_diffs.keys() == diffs.keys()
    for k in diffs:
        assert summary.residual_diffs[k] == pytest.approx(diffs[k], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours, images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", FLUX_CONFIGS)
def test_flux_parity(flux, config):
    """FLUX with each config (TaylorSeer, Bn, warm-up interval, R1.0) takes cache-dit 1.5.3's cached steps and
    diffs, with images equal within float32 rounding."""
    kwargs = dict(flux_inputs(), num_inference_steps=12)
    ours, summary = _ours(flux, config, generator=generator(), **kwargs)
    theirs = run_cache_dit(flux, dbc.DBCacheConfig.from_string(config), False, generator=generator(), **kwargs)
    assert 0 < len(summary.cached_steps) < 12, "config must mix hits and computes to mean something"
    _assert_parity(ours, summary, theirs)


def test_flux_parity_batch_two_one_decision_per_step(flux):
    """With two images per prompt, FLUX takes one decision per step for the whole batch, matching cache-dit's
    steps, diffs and images."""
    kwargs = dict(flux_inputs(), num_inference_steps=10, num_images_per_prompt=2)
    ours, summary = _ours(flux, "F1B0_W2M0MC2_T0O1_R0.4", generator=generator(), **kwargs)
    theirs = run_cache_dit(flux, dbc.DBCacheConfig.from_string("F1B0_W2M0MC2_T0O1_R0.4"), False,
                           generator=generator(), **kwargs)
    assert ours.shape[0] == 2 and summary.num_steps == 10 and summary.cached_steps
    _assert_parity(ours, summary, theirs)


def test_flux_parity_with_steps_mask(flux):
    """With a steps_computation_mask FLUX matches cache-dit's decisions and images; masked-1 steps 4, 8 compute."""
    cfg = dbc.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.4,
                            max_warmup_steps=4, steps_computation_mask=(1, 1, 0, 0, 1, 0, 0, 0, 1, 0))
    kwargs = dict(flux_inputs(), num_inference_steps=10)
    ours, summary = _ours(flux, cfg, generator=generator(), **kwargs)
    theirs = run_cache_dit(flux, cfg, False, generator=generator(), **kwargs)
    assert summary.cached_steps and 4 not in summary.cached_steps and 8 not in summary.cached_steps
    _assert_parity(ours, summary, theirs)


@pytest.mark.parametrize("config", ["F1B0_W2M0MC2_T0O1_R0.35", "F2B1_W2M0MC3_T1O1_R0.45"])
def test_qwen_image_parity_true_cfg(qwen, config):
    """Qwen-Image with true CFG keeps separate cond/uncond state and matches cache-dit's cached steps in both
    branches, its diffs and its images."""
    kwargs = dict(qwen_inputs(cfg=True), num_inference_steps=10)
    ours, summary = _ours(qwen, config, generator=generator(), **kwargs)
    assert summary.separate_cfg, "true CFG with a negative prompt must run separate CFG state"
    theirs = run_cache_dit(qwen, dbc.DBCacheConfig.from_string(config), True, generator=generator(), **kwargs)
    assert summary.cached_steps and summary.cfg_cached_steps
    _assert_parity(ours, summary, theirs)


def test_qwen_image_parity_without_cfg(qwen):
    """Qwen-Image without true CFG keeps one cache state and matches cache-dit's cached steps, diffs and images."""
    kwargs = dict(qwen_inputs(cfg=False), num_inference_steps=10)
    ours, summary = _ours(qwen, "F1B0_W2M0MC2_T0O1_R0.35", generator=generator(), **kwargs)
    assert not summary.separate_cfg
    theirs = run_cache_dit(qwen, dbc.DBCacheConfig.from_string("F1B0_W2M0MC2_T0O1_R0.35"), False,
                           generator=generator(), **kwargs)
    assert summary.cached_steps
    _assert_parity(ours, summary, theirs)
