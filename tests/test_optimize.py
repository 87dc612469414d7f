"""The public API on real tiny diffusers pipelines: attach/detach, per-call reset, isolation, errors."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import dbcache_compile as dbc
from conftest import generator
from dbcache_compile.optimize import is_optimized
from dbcache_compile.testing import FLUX_BLOCKS, flux_inputs, qwen_inputs, tiny_flux_pipeline, tiny_qwen_pipeline

CONFIG = "F1B0_W2M0MC2_T0O1_R0.4"


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def run(pipe, steps=10, seed=0, **overrides):
    return pipe(**dict(flux_inputs(), **overrides), num_inference_steps=steps, generator=generator(seed)).images


def test_disable_restores_bit_identical_outputs_and_leaves_nothing_behind(flux):
    """disable() after a caching run restores bit-identical images, keeps the pipeline class and leaves no new
    attribute on the transformer."""
    before = run(flux)
    transformer_attrs = set(vars(flux.transformer))
    dbc.optimize(flux, cache=CONFIG)
    cached = run(flux)
    assert dbc.summary(flux).cached_steps, "the config must cache something for this test to mean anything"
    assert not torch.equal(before, cached)
    dbc.disable(flux)
    assert type(flux) is FluxPipeline
    assert set(vars(flux.transformer)) == transformer_attrs
    assert torch.equal(run(flux), before)


def test_uncached_config_matches_the_original_forward_exactly(flux):
    """A never-caching config (R0) reproduces the original forward bit for bit and reports no cached steps."""
    before = run(flux)
    dbc.optimize(flux, cache="F1B0_W0_R0")  # threshold 0: never cache, our forward computes every block
    try:
        assert torch.equal(run(flux), before)
        assert dbc.summary(flux).cached_steps == []
    finally:
        dbc.disable(flux)


def test_each_call_resets_state_and_identical_calls_give_identical_images(flux):
    """Each pipeline call starts a fresh generation: identical calls give the same images, steps and diffs."""
    dbc.optimize(flux, cache=CONFIG)
    try:
        first = run(flux)
        s1 = dbc.summary(flux)
        second = run(flux)
        s2 = dbc.summary(flux)
        assert torch.equal(first, second)
        assert s1.cached_steps == s2.cached_steps and s1.num_steps == 10 and s2.num_steps == 10
        assert s1.residual_diffs == s2.residual_diffs
    finally:
        dbc.disable(flux)


def test_interrupted_generation_leaves_the_next_call_correct(flux):
    """A generation aborted by a failing callback leaves no stale cache state: the next call equals a clean run."""
    dbc.optimize(flux, cache=CONFIG)
    try:
        clean = run(flux)

        def boom(pipe, step, timestep, kwargs):
            if step == 5:
                raise RuntimeError("user callback failed")
            return kwargs

        with pytest.raises(RuntimeError, match="user callback failed"):
            run(flux, callback_on_step_end=boom)
        assert torch.equal(run(flux), clean)
    finally:
        dbc.disable(flux)


def test_two_pipelines_keep_separate_state():
    """Two optimized pipelines keep separate cache state: interleaved runs change neither's images, decisions or
    step counts, and disabling one leaves the other."""
    a, b = tiny_flux_pipeline(seed=0), tiny_flux_pipeline(seed=1)
    dbc.optimize(a, cache=CONFIG)
    dbc.optimize(b, cache="F1B0_W3M0MC1_T0O1_R0.4")
    alone_a = run(a, steps=8)
    summary_a = dbc.summary(a)
    # interleave: b runs between two runs of a, a's decisions and images must not change
    run(b, steps=12, seed=3)
    assert torch.equal(run(a, steps=8), alone_a)
    assert dbc.summary(a).cached_steps == summary_a.cached_steps
    assert dbc.summary(b).num_steps == 12 and dbc.summary(a).num_steps == 8
    assert type(a) is FluxPipeline and type(b) is FluxPipeline  # attached as hooks: no class is edited
    dbc.disable(a)
    assert dbc.summary(b).num_steps == 12
    dbc.disable(b)


def test_bare_transformer_generations_reset_and_new_inputs(flux):
    """Driving the transformer yourself: reset() starts a generation; a call whose inputs change shape starts one
    too (its stored residual cannot be compared), with the same output as after reset()."""
    transformer = flux.transformer
    dbc.optimize(transformer, cache=CONFIG)
    try:
        x = torch.randn(1, 16, 16, generator=generator(1))
        kwargs = dict(encoder_hidden_states=torch.randn(1, 4, 32, generator=generator(2)),
                      pooled_projections=torch.randn(1, 32, generator=generator(3)),
                      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
        for i in range(4):
            transformer(hidden_states=x, timestep=torch.tensor([1.0 - i / 4]), **kwargs)
        assert dbc.summary(transformer).num_steps == 4
        big = dict(kwargs, hidden_states=torch.randn(1, 64, 16, generator=generator(4)), img_ids=torch.zeros(64, 3),
                   timestep=torch.tensor([0.9]))
        switched = transformer(**big)[0]
        assert dbc.summary(transformer).num_steps == 1  # a new generation at the new shape
        dbc.reset(transformer)
        assert torch.equal(transformer(**big)[0], switched)
        assert dbc.summary(transformer).num_steps == 1
    finally:
        dbc.disable(transformer)


def test_resolution_change_between_calls_works(flux):
    """A pipeline optimized at one resolution serves another: the image and decisions at the new size are exactly
    those of a pipeline optimized fresh at that size (the buffers of the first size are not reused)."""
    dbc.optimize(flux, cache=CONFIG)
    try:
        run(flux, steps=6)
        large = run(flux, steps=6, height=48, width=48)
        large_steps = dbc.summary(flux).cached_steps
    finally:
        dbc.disable(flux)
    dbc.optimize(flux, cache=CONFIG)
    try:
        assert torch.equal(run(flux, steps=6, height=48, width=48), large) and large.shape[-1] == 48
        assert dbc.summary(flux).cached_steps == large_steps and large_steps
    finally:
        dbc.disable(flux)


def test_summary_is_readable(flux):
    """print(summary) shows the config, the block split and the cached steps; the block ratio counts the blocks an
    uncached run would execute over those this run executed (here by hand: 8 blocks, F1B0 runs 1 on a hit)."""
    dbc.optimize(flux, cache=CONFIG)
    try:
        run(flux)
        s = dbc.summary(flux)
        text = str(s)
        assert CONFIG in text and "cached:" in text and f"{FLUX_BLOCKS} blocks" in text and s.cached_steps
        executed = (10 - len(s.cached_steps)) * FLUX_BLOCKS + len(s.cached_steps) * 1
        assert s.block_ratio == pytest.approx(10 * FLUX_BLOCKS / executed)
    finally:
        dbc.disable(flux)


def test_qwen_separate_cfg_follows_the_call():
    """Qwen-Image keeps separate CFG state exactly when the call runs true CFG; forcing enable_separate_cfg=False
    on a true-CFG call is a clear error."""
    pipe = tiny_qwen_pipeline()
    dbc.optimize(pipe, cache="F1B0_W2M0MC2_T0O1_R0.35")
    pipe(**qwen_inputs(cfg=True), num_inference_steps=6, generator=generator())
    assert dbc.summary(pipe).separate_cfg and dbc.summary(pipe).num_steps == 6
    pipe(**qwen_inputs(cfg=False), num_inference_steps=6, generator=generator())
    assert not dbc.summary(pipe).separate_cfg and dbc.summary(pipe).num_steps == 6
    dbc.disable(pipe)
    forced = dbc.DBCacheConfig.from_string("F1B0_W2M0MC2_T0O1_R0.35", enable_separate_cfg=False)
    dbc.optimize(pipe, cache=forced)
    # forcing one shared state onto two calls per step with different prompts is an error, not a silent mix-up
    with pytest.raises(ValueError, match="set it to True"):
        pipe(**qwen_inputs(cfg=True), num_inference_steps=6, generator=generator())
    dbc.disable(pipe)


def test_errors_are_clear(flux):
    """optimize() rejects bad configs, modes, graphs, unsupported objects and a second optimize with clear
    ValueErrors, and summary() an unoptimized pipeline."""
    with pytest.raises(ValueError, match="exceeds the 8 transformer blocks"):
        dbc.optimize(flux, cache="F6B3_R0.1")
    with pytest.raises(ValueError, match="unknown token"):
        dbc.optimize(flux, cache="F1B0_Z2")
    with pytest.raises(ValueError, match="mode must be one of"):
        dbc.optimize(flux, cache=CONFIG, mode="fast")
    with pytest.raises(ValueError, match="graph must be one of"):
        dbc.optimize(flux, cache=CONFIG, graph="tree")
    with pytest.raises(ValueError, match="does not support Linear: .*Supported families"):
        dbc.optimize(torch.nn.Linear(2, 2), cache=CONFIG)
    with pytest.raises(ValueError, match="neither a transformer module nor a pipeline"):
        dbc.optimize(object(), cache=CONFIG)
    with pytest.raises(ValueError, match="not optimized"):
        dbc.summary(flux)
    dbc.optimize(flux, cache=CONFIG)
    try:
        with pytest.raises(ValueError, match="already optimized"):
            dbc.optimize(flux, cache=CONFIG)
    finally:
        dbc.disable(flux)
    assert type(flux) is FluxPipeline


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"fuse_qkv": "yes"}, TypeError, "fuse_qkv"), ({"fuse_qkv": 1}, TypeError, "fuse_qkv"),
    ({"fuse_qkv": None}, TypeError, "fuse_qkv"),
    ({"mode": 1}, TypeError, "mode"), ({"mode": np.array(["default", "default"])}, TypeError, "mode"),
    ({"mode": True}, TypeError, "mode"),
    ({"mode": "default", "graph": None}, TypeError, "graph"), ({"mode": "default", "graph": 0}, TypeError, "graph"),
    ({"attention": 1}, TypeError, "attention"), ({"attention": np.array(["a", "b"])}, TypeError, "attention"),
    ({"prologue": "no"}, TypeError, "prologue"), ({"prologue": np.array([False, True])}, TypeError, "prologue"),
    ({"quantize_filter": "attn"}, TypeError, "quantize_filter"),
    ({"mode": "default", "compile_options": {"dinamic": True}}, TypeError, "dinamic"),
    ({"mode": "default", "compile_options": {1: True}}, TypeError, "no torch.compile argument"),
    ({"mode": "default", "compile_options": {"dynamic": "yes"}}, TypeError, "dynamic"),
    ({"mode": "default", "compile_options": {"disable": 1}}, TypeError, "disable"),
    ({"mode": "default", "compile_options": {"options": "max"}}, TypeError, "options"),
    ({"mode": "default", "compile_options": {"backend": 3}}, TypeError, "backend"),
    ({"mode": "default", "compile_options": {"mode": "max-autotune"}}, ValueError, "optimize\\(mode=...\\)"),
    ({"mode": "default", "compile_options": {"fullgraph": False}}, ValueError, "fullgraph=True"),
])
def test_every_optimize_argument_of_a_wrong_type_is_a_named_error(flux, kwargs, error, needle):
    """Each flag and option of optimize() takes its own type only: fuse_qkv="yes" used to count as True, a NumPy
    array as mode failed inside a comparison, a string quantize_filter failed at quantization, an unknown
    compile_options key inside torch.compile at the first call. Nothing is touched."""
    with pytest.raises(error, match=needle):
        dbc.optimize(flux, cache=CONFIG, **kwargs)
    assert not is_optimized(flux)


def test_attention_backend_choice_is_applied_reported_and_reset(flux):
    """optimize(attention=...) applies the diffusers attention backend ('auto': a CPU backend measured at the first
    call, tests/test_attention.py), reports it in summary(), resets it on disable() and rejects unknown names."""
    before = run(flux)
    dbc.optimize(flux, cache=CONFIG, attention="auto")
    try:
        run(flux)
        assert dbc.summary(flux).attention.split()[0] in ("native", "_native_math")  # CPU
    finally:
        dbc.disable(flux)
    dbc.optimize(flux, cache="F1B0_W0_R0", attention="_native_math")
    processor = flux.transformer.transformer_blocks[0].attn.processor
    try:
        assert processor._attention_backend == "_native_math"
        torch.testing.assert_close(run(flux), before, rtol=1e-5, atol=1e-5)
        assert "attention=_native_math" in str(dbc.summary(flux))
    finally:
        dbc.disable(flux)
    assert processor._attention_backend is None
    with pytest.raises(ValueError, match="diffusers attention backend"):
        dbc.optimize(flux, cache=CONFIG, attention="fastest")


def test_fuse_qkv_gives_the_same_images_and_decisions_and_is_undone(flux):
    """fuse_qkv=True keeps images and cached steps, shows in summary(), and disable() unfuses the projections."""
    dbc.optimize(flux, cache=CONFIG)
    reference, ref_steps = run(flux), dbc.summary(flux).cached_steps
    dbc.disable(flux)
    dbc.optimize(flux, cache=CONFIG, fuse_qkv=True)
    try:
        attn = flux.transformer.transformer_blocks[0].attn
        assert attn.fused_projections and hasattr(attn, "to_qkv") and hasattr(attn, "to_added_qkv")
        torch.testing.assert_close(run(flux), reference, rtol=1e-5, atol=1e-5)
        summary = dbc.summary(flux)
        assert summary.cached_steps == ref_steps and summary.fused_qkv and "fused QKV" in str(summary)
    finally:
        dbc.disable(flux)
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")


def test_fuse_qkv_is_refused_where_the_processor_ignores_it():
    """fuse_qkv=True is refused for Qwen-Image, whose attention processor ignores fused projections, leaving no
    to_qkv behind."""
    pipe = tiny_qwen_pipeline()
    with pytest.raises(ValueError, match="do not use fused QKV"):
        dbc.optimize(pipe, cache=CONFIG, fuse_qkv=True)
    assert not hasattr(pipe.transformer.transformer_blocks[0].attn, "to_qkv")
