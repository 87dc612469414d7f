"""Index-added inputs (``Family.index_added``): the model's own forward adds something to the hidden stream after block
i, by index, between the blocks a hit skips — SD3's, Sana's and Z-Image's ControlNet residuals
(``block_controlnet_hidden_states``, ``controlnet_block_samples``), Wan VACE's hints (``control_hidden_states``), Wan
Animate's face adapter (``face_pixel_values``). A call passing one runs block by block and caches the sum of the
middle blocks' own residuals, so on a hit the model's glue adds each c_i once, with this step's value; Wan Animate's
adapter reads the stream (``glue_reads_stream``), so there the cached residual holds it and a hit undoes the glue
between the middle blocks (dbcache_compile/runtime.py, "Index-added inputs"). Tiny real diffusers pipelines
(tests/families/sd3.py, sana.py, z_image.py, wan_vace.py, wan_animate.py); cache-dit 1.5.3's parity on Wan VACE is in
tests/test_families.py (it crashes on SD3 and Z-Image ControlNet, refuses Wan Animate and runs Sana ControlNet
without its residuals: checked here)."""

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.metrics import psnr
from tests.families import CASES, first_transformer_call

STEPS = 8
PIPELINES = ["sd3_controlnet", "sana_controlnet", "zimage_controlnet", "wan_vace", "wan_animate"]
#: the pipelines whose ControlNet is optional (other calls of the model run whole groups), with the input's name
OPTIONAL = {"sd3_controlnet": "block_controlnet_hidden_states", "sana_controlnet": "controlnet_block_samples",
            "zimage_controlnet": "controlnet_block_samples"}
#: caching config of the PSNR checks: F1B1 on the 4-block tiny models leaves blocks 1 and 2 in the middle, with an
#: addition after block 1 in all five
CACHING = "F1B1_W2M0MC2_T0O1_R0.3"
#: a TaylorSeer config (order 2: the cached residual forecast from the last two computed steps)
TAYLOR = "F1B0_W2M0MC3_T1O2_R0.6"
NEVER = "F1B0_W0_R0"
REGIONAL = dict(mode="default", graph="regional", compile_options={"backend": "eager"})
#: PSNR (dB) against the uncached pipeline, both configs (measured: CACHING 55.1 / 47.8 / 42.8 / 90.3 / 69.0, TAYLOR
#: 60.0 / 53.1 / 35.9 / 87.0 / 68.0; regional takes the same decisions)
MIN_PSNR = {"sd3_controlnet": 50.0, "sana_controlnet": 45.0, "zimage_controlnet": 33.0, "wan_vace": 80.0,
            "wan_animate": 65.0}


def _images(pipe, case) -> torch.Tensor:
    out = pipe(**case.inputs(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    return out.images if hasattr(out, "images") else out.frames


def _cached(pipe, case, config: str, **optimize_kwargs):
    dbc.optimize(pipe, cache=config, **optimize_kwargs)
    try:
        return _images(pipe, case), dbc.summary(pipe)
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("lowering", ["eager", "regional"])
@pytest.mark.parametrize("name", PIPELINES)
def test_never_caching_equals_the_uncached_pipeline(name, lowering):
    """A config that never caches runs the index-added inputs block by block exactly as the model does:
    bit-identical in eager, within 1e-4 through compiled regions (backend eager)."""
    case = CASES[name]
    pipe = case.builder()
    reference = _images(pipe, case)
    images, summary = _cached(pipe, case, NEVER, **(REGIONAL if lowering == "regional" else {}))
    assert summary.num_steps == STEPS and not summary.cached_steps and summary.lowering == lowering
    if lowering == "eager":
        assert torch.equal(images, reference)
    else:
        torch.testing.assert_close(images, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [CACHING, TAYLOR])
@pytest.mark.parametrize("name", PIPELINES)
def test_caching_hits_and_stays_close_eager_and_regional(name, config):
    """A caching config (TaylorSeer too) hits on every pipeline, the image stays close to the uncached one (PSNR
    printed; the README quotes it), and regional takes the eager decisions and gives the eager image."""
    case = CASES[name]
    pipe = case.builder()
    reference = _images(pipe, case)
    images, summary = _cached(pipe, case, config)
    regional, regional_summary = _cached(pipe, case, config, **REGIONAL)
    value = float(psnr(images, reference).min())
    print(f"\n{name} {config}: cached {summary.cached_steps} / cfg {summary.cfg_cached_steps}, "
          f"PSNR vs uncached {value:.1f} dB")
    assert summary.cached_steps
    assert value >= MIN_PSNR[name]
    assert (regional_summary.cached_steps, regional_summary.cfg_cached_steps) == (summary.cached_steps,
                                                                                   summary.cfg_cached_steps)
    torch.testing.assert_close(regional, images, rtol=0, atol=1e-4)




def _tensor(out) -> torch.Tensor:
    """A transformer's output as one tensor (Z-Image returns a list of per-sample tensors)."""
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def _three_identical_calls(transformer, kwargs: dict, old: bool = False, **optimize_kwargs) -> tuple:
    """Three calls with the very same inputs under a config whose third step is a hit (W2, R1.0)."""
    dbc.optimize(transformer, cache="F1B1_W2M0MC2_T0O1_R1.0", **optimize_kwargs)
    try:
        if old:  # the behaviour before index-added inputs: one group, its residual holding the additions
            dbc.runtime_of(transformer).index_added = ()
        with torch.no_grad():
            outs = [_tensor(transformer(**kwargs)[0]) for _ in range(3)]
        return outs, dbc.summary(transformer)
    finally:
        dbc.disable(transformer)


@pytest.mark.parametrize("lowering", ["eager", "regional"])
@pytest.mark.parametrize("name", PIPELINES)
def test_a_hit_on_identical_inputs_adds_each_index_added_residual_once(name, lowering):
    """On a call with the same inputs as the previous computed step, a hit must reproduce the uncached output: the
    cached middle residual excludes the additions after the middle blocks, and the model's glue adds each once (Wan
    Animate: the residual holds them, the hit undoes the glue between the middle blocks). The old behaviour (the
    span's output minus its input, additions included, added at the first middle block, then added again by the
    glue) is far off: the test fails if an addition counts twice."""
    case = CASES[name]
    pipe = case.builder()
    kwargs = dict(first_transformer_call(pipe, case.inputs()), return_dict=False)
    transformer = pipe.transformer
    with torch.no_grad():
        reference = _tensor(transformer(**kwargs)[0])
    outs, summary = _three_identical_calls(transformer, kwargs, **(REGIONAL if lowering == "regional" else {}))
    assert summary.cached_steps == [2]
    for out in outs:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    if lowering == "eager":
        old, old_summary = _three_identical_calls(transformer, kwargs, old=True)
        assert old_summary.cached_steps == [2]
        assert (old[2] - reference).abs().max() > 1e-2  # the same check fails on the double count


@pytest.mark.parametrize("name", PIPELINES)
def test_segments_refuses_index_added_inputs_by_name(name):
    """``segments`` compiles each group as one segment, which cannot add anything between its blocks: SD3 and Sana
    refuse a call with ControlNet residuals by name (their other calls run), Wan VACE and Wan Animate (every call has
    them) are refused at optimize with the reason; regional and eager run them."""
    case = CASES[name]
    pipe = case.builder()
    if name not in OPTIONAL:
        with pytest.raises(ValueError, match=r"cannot run graph='segments'.*inside the groups"):
            dbc.optimize(pipe, cache=CACHING, mode="default", graph="segments", compile_options={"backend": "eager"})
        return
    kwargs = dict(first_transformer_call(pipe, case.inputs()), return_dict=False)
    dbc.optimize(pipe, cache=CACHING, mode="default", graph="segments", compile_options={"backend": "eager"})
    try:
        with pytest.raises(NotImplementedError, match=rf"`{OPTIONAL[name]}`.*graph='regional'"), torch.no_grad():
            pipe.transformer(**kwargs)
        with torch.no_grad():
            pipe.transformer(**dict(kwargs, **{OPTIONAL[name]: None}))
    finally:
        dbc.disable(pipe)


@pytest.mark.parametrize("name", list(OPTIONAL))
def test_controlnet_residuals_are_not_conditioning_of_the_generation(name):
    """The SD3 / Sana ControlNet pipelines pass new residual tensors at every step: they do not start a new
    generation (which would cache nothing), while the prompt's tensors still do."""
    case = CASES[name]
    pipe = case.builder()
    _, summary = _cached(pipe, case, CACHING)
    assert summary.num_steps == STEPS and summary.cached_steps


@pytest.mark.parametrize("name, error", [
    ("sd3_controlnet", "has no attribute 'context_pre_only'"),
    ("wan_animate", "WanAnimateTransformer3DModel not in allowed classes"),
    ("zimage_controlnet", "unexpected keyword argument 'joint_attention_kwargs'"),
])
def test_cache_dit_cannot_run_these_pipelines(name, error):
    """What cache-dit 1.5.3 does with the same pipelines (so only Wan VACE has a parity test): on SD3 ControlNet it
    swaps transformer_blocks for one CachedBlocks module, which the forward's ControlNet branch asks for
    `context_pre_only` (an AttributeError at the first step); its Wan adapter asserts the transformer class and
    refuses WanAnimateTransformer3DModel; its ZImageControlNetPatchFunctor replaces the Z-Image forward with a copy
    of an older one, without the `joint_attention_kwargs` parameter that ZImageControlNetPipeline passes on diffusers
    0.42.1 (a TypeError at the first step; its disable_cache() then leaves that forward on the model, so each case
    here builds a fresh pipeline)."""
    from cachedit_oracle import cache_dit_contexts

    case = CASES[name]
    with pytest.raises((AttributeError, AssertionError, TypeError), match=error):
        cache_dit_contexts(case.builder(), dbc.DBCacheConfig.from_string(CACHING), num_inference_steps=STEPS,
                           generator=torch.Generator().manual_seed(0), **case.inputs())


def test_wan_animate_face_adapter_is_undone_between_the_middle_blocks_of_a_hit():
    """Wan Animate's face adapter reads the stream: evaluating every adapter on the hit's stream (the residual of the
    blocks alone added at the first middle block, as for ControlNet residuals) is worse than keeping the adapters in
    the cached residual and undoing them between the middle blocks: 0.087 max abs off the uncached output on a
    repeated input instead of exact, 58 dB instead of 69 dB on the tiny pipeline."""
    case = CASES["wan_animate"]
    pipe = case.builder()
    reference = _images(pipe, case)
    images, summary = _cached(pipe, case, CACHING)
    dbc.optimize(pipe, cache=CACHING)
    dbc.runtime_of(pipe).glue_reads_stream = False  # the adapters evaluated on the hit's stream
    try:
        other = _images(pipe, case)
        other_summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    assert other_summary.cached_steps == summary.cached_steps
    assert float(psnr(images, reference).min()) > float(psnr(other, reference).min()) + 5


def test_other_glue_inside_a_group_is_still_caught_after_calls_with_index_added_inputs():
    """Calls with ControlNet residuals skip the glue-inside-a-group check (their additions are expected and they run
    block by block); a later call without them at the same input signature must not run whole groups until it has
    passed the check block by block itself, so glue of another kind (here a forward hook changing block 1's output)
    is a named error under a grouping lowering rather than silently dropped."""
    case = CASES["sd3_controlnet"]
    pipe = case.builder()
    kwargs = dict(first_transformer_call(pipe, case.inputs()), return_dict=False)
    transformer = pipe.transformer
    dbc.optimize(pipe, cache=CACHING, **REGIONAL)
    try:
        with torch.no_grad():
            transformer(**kwargs)  # with ControlNet residuals: block by block, no check
            handle = transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: (out[0], out[1] + 0))
            try:
                with pytest.raises(ValueError, match="glue inside a block list"):
                    transformer(**dict(kwargs, block_controlnet_hidden_states=None))
            finally:
                handle.remove()
    finally:
        dbc.disable(pipe)


def test_wan_vace_fn_residual_holds_the_hint_after_block_fn_as_cache_dit_measures_it():
    """The Fn residual of a call with index-added inputs is measured at the first middle block's input, so with
    `vace_layers` starting at block 0 and F1 it holds hint 0, as cache-dit's WanVACEPatchFunctor (hint added inside
    the block) measures it: the first decided step's diff is cache-dit's to float precision (measured at block 0's
    output it would be 0.0603 instead of 0.0568, and cache only step 2 where cache-dit caches 2 and 4). Later diffs
    differ slightly: after a hit cache-dit's stream holds the cached hints, ours this step's."""
    from cachedit_oracle import cache_dit_contexts

    case = CASES["wan_vace"]
    config = f"F1B0_W2M0MC2_T0O1_R{case.threshold}"
    pipe = case.builder()
    _, summary = _cached(pipe, case, config)
    theirs = cache_dit_contexts(pipe, dbc.DBCacheConfig.from_string(config), num_inference_steps=STEPS,
                                generator=torch.Generator().manual_seed(0), **case.inputs())[0]
    assert summary.cached_steps == theirs["cached"] == [2, 4]
    assert summary.residual_diffs[2] == pytest.approx(theirs["diffs"][2], rel=1e-5)
    for step, diff in theirs["diffs"].items():
        assert summary.residual_diffs[step] == pytest.approx(diff, rel=2e-2)


def test_cache_dit_runs_sana_controlnet_without_its_residuals():
    """What cache-dit 1.5.3 does with SanaControlNetPipeline (documented, not copied): its CachedBlocks wrapper
    replaces ``transformer_blocks`` with one module, so the model's loop runs once with ``index_block == 0`` and its
    ControlNet glue (``0 < index_block <= len(samples)``) adds no residual at all: cache-dit's images are exactly the
    pipeline's with ``controlnet_conditioning_scale=0`` (never caching: bit-identical to the uncached pipeline with
    scale 0; caching: our cache's cached steps, diffs and images with scale 0), i.e. the ControlNet has no effect,
    where ours adds every residual once (test_never_caching_equals_the_uncached_pipeline)."""
    from cachedit_oracle import run_cache_dit

    case = CASES["sana_controlnet"]
    pipe = case.builder()
    off = dict(case.inputs(), controlnet_conditioning_scale=0.0)
    plain = _images(pipe, case)
    plain_off = pipe(**off, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
    assert (plain - plain_off).abs().max() > 0.05  # the ControlNet matters
    for config in (NEVER, CACHING):
        images, cached, _, diffs = run_cache_dit(pipe, dbc.DBCacheConfig.from_string(config), False, **case.inputs(),
                                                 num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
        dbc.optimize(pipe, cache=config)
        try:
            ours_off = pipe(**off, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
            summary = dbc.summary(pipe)
        finally:
            dbc.disable(pipe)
        assert cached == summary.cached_steps
        assert diffs.keys() == summary.residual_diffs.keys()
        for step, value in summary.residual_diffs.items():
            assert diffs[step] == pytest.approx(value, rel=1e-4)
        if config == NEVER:
            assert torch.equal(images, plain_off)
        torch.testing.assert_close(images, ours_off, rtol=0, atol=1e-6)
