"""ControlNet residuals and IP-Adapter image embeddings on the families that run whole steps in our forward (FLUX.1,
Qwen-Image: :class:`~dbcache_compile.step.CacheStep`), on tiny real diffusers pipelines (FluxControlNetPipeline,
QwenImageControlNetPipeline, FluxPipeline + an IP-Adapter loaded by diffusers' own loader), in every lowering.

The ControlNet residual c_i that the model's forward adds after block i is added after block i in our block loop.
The cached middle residual is the middle blocks' own contribution (their output minus their input minus the c_i added
after them), and a hit adds the cached residual plus this step's c_i of the skipped blocks: each c_i counts once,
with its current value. The Fn residual (what the decision compares) is the hidden stream after the Fn blocks and
their c_i, minus the stream entering them (cache-dit's Qwen-Image ControlNet patch, which adds c_i inside each block,
compares the same)."""

from __future__ import annotations

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.metrics import psnr
from tests.cache_checks import CACHING, LOWERINGS, NEVER, STEPS, never_then_caching
from tests.cache_checks import optimize_in as _optimize
from tests.cache_checks import run as _run
from tests.families import first_transformer_call
from tests.families.flux import (flux_controlnet_inputs, flux_ip_adapter_inputs, tiny_flux_controlnet_pipeline,
                                 tiny_flux_ip_adapter_pipeline)
from tests.families.qwen_image import qwen_image_controlnet_inputs, tiny_qwen_image_controlnet_pipeline

CASES = {
    "flux_controlnet": (tiny_flux_controlnet_pipeline, flux_controlnet_inputs),
    "qwen_image_controlnet": (tiny_qwen_image_controlnet_pipeline, qwen_image_controlnet_inputs),
    "flux_ip_adapter": (tiny_flux_ip_adapter_pipeline, flux_ip_adapter_inputs),
}


@pytest.fixture(scope="module")
def pipelines():
    """Each case's pipeline with its uncached images and the eager cache's images and cached steps (built once)."""
    built = {}
    for name, (builder, inputs) in CASES.items():
        pipe = builder()
        reference = _run(pipe, inputs())
        dbc.optimize(pipe, cache=CACHING)
        try:
            cached = _run(pipe, inputs())
            steps = dbc.summary(pipe).cached_steps
        finally:
            dbc.disable(pipe)
        built[name] = (pipe, reference, cached, steps)
    return built


@pytest.mark.parametrize("lowering", list(LOWERINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_never_caching_equals_uncached_and_caching_hits_close(pipelines, case, lowering):
    """A never-caching config gives the uncached images (bit-identical eager, <= 1e-4 compiled); a caching config
    caches steps and stays close (PSNR >= 40 dB against uncached), and every compiled lowering takes the eager
    cache's decisions and gives its images."""
    pipe, reference, eager_cached, eager_steps = pipelines[case]
    inputs = CASES[case][1]
    assert eager_steps == [2, 3, 5, 6]
    assert psnr(eager_cached, reference).min() >= 40
    summary = never_then_caching(pipe, inputs, lowering, reference, eager_cached)
    assert summary.cached_steps == eager_steps


@pytest.mark.parametrize("lowering", ["segments", "cond"])
@pytest.mark.parametrize("case", ["flux_controlnet", "qwen_image_controlnet"])
def test_controlnet_residuals_are_graph_inputs_no_recompile(pipelines, case, lowering):
    """The ControlNet residuals are new tensors at every step: graph inputs of the whole-step graphs, so a second
    generation (another control image, another prompt) compiles nothing and nothing falls back."""
    from torch._dynamo.utils import counters

    pipe = pipelines[case][0]
    inputs = CASES[case][1]
    dbc.optimize(pipe, cache=CACHING, **LOWERINGS[lowering])
    try:
        _run(pipe, inputs())
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        again = _run(pipe, inputs(seed=1))
        assert counters["stats"]["unique_graphs"] == graphs
        assert sum(counters["graph_break"].values()) == breaks
        summary = dbc.summary(pipe)
        assert summary.cached_steps and summary.compile_fallbacks == {}
    finally:
        dbc.disable(pipe)
    assert torch.isfinite(again).all()


def _flux_call(pipe, inputs: dict) -> dict:
    """The keyword arguments the pipeline passes to its transformer on its first call, without its ControlNet inputs."""
    kwargs = first_transformer_call(pipe, inputs)
    for name in ("controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat"):
        kwargs.pop(name, None)
    return kwargs


def _samples(hidden: torch.Tensor, width: int, count: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden.shape[0], hidden.shape[1], width, generator=g) * 0.5 for _ in range(count)]


def _residual_calls(case: str):
    """``(transformer, kwargs without ControlNet inputs, name -> (count, seed) of the sample lists, the list whose
    entry 4 lands right after the last middle block of F1B1)``. FLUX (2 double + 6 single blocks): 6 single samples,
    one per single block, and 1 double sample; Qwen-Image (6 blocks): 6 samples, one per block."""
    from dbcache_compile.testing import flux_inputs, qwen_inputs, tiny_flux_pipeline, tiny_qwen_pipeline

    if case == "flux":
        pipe = tiny_flux_pipeline()
        return pipe.transformer, _flux_call(pipe, flux_inputs()), "controlnet_single_block_samples", \
            {"controlnet_block_samples": 1, "controlnet_single_block_samples": 6}
    pipe = tiny_qwen_pipeline()
    return pipe.transformer, _flux_call(pipe, qwen_inputs()), "controlnet_block_samples", \
        {"controlnet_block_samples": 6}


@pytest.mark.parametrize("lowering", list(LOWERINGS))
@pytest.mark.parametrize("case", ["flux", "qwen"])
def test_a_hit_adds_each_controlnet_residual_once_with_its_current_value(case, lowering):
    """F1B1, two calls on the same latents: step 0 computes with residuals c, step 1 hits with c' that differs from
    c only in the sample added right after the last middle block (so the skipped blocks' own residual is the same
    for c and c'). The exact uncached output for c' is then what a hit must give: the cached residual without c
    plus c' once. Adding the cached c again (cache-dit's way of caching them), c' twice or not at all gives an
    output as far off as the uncached output for c, which is checked to be far."""
    transformer, kwargs, changed, counts = _residual_calls(case)
    hidden = kwargs["hidden_states"]
    controls = {name: _samples(hidden, transformer.inner_dim, n, seed=7 + k) for k, (name, n) in enumerate(counts.items())}
    later = dict(controls)
    later[changed] = list(controls[changed])
    later[changed][4] = controls[changed][4] + torch.randn(controls[changed][4].shape,
                                                           generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        expected = transformer(**kwargs, **later)[0]
        stale = transformer(**kwargs, **controls)[0]
    assert (expected - stale).abs().max() > 0.05  # the test can tell a right hit from a wrong one
    _optimize(transformer, "F1B1_W1MC1_R1.0", lowering)  # R >= 1: step 1 always hits
    try:
        with torch.no_grad():
            first = transformer(**kwargs, **controls)[0]
            hit = transformer(**kwargs, **later)[0]
        assert dbc.summary(transformer).cached_steps == [1]
    finally:
        dbc.disable(transformer)
    torch.testing.assert_close(first, stale, rtol=0, atol=1e-5)
    torch.testing.assert_close(hit, expected, rtol=0, atol=1e-5)


def test_controlnet_blocks_repeat_indexes_as_the_model():
    """XLabs ControlNets (`controlnet_blocks_repeat=True`) index the double samples by `i % n` instead of by
    interval: on a FLUX transformer of 4 double blocks and 3 double samples the two indexings differ ([0, 0, 1, 1]
    / [0, 1, 2, 0]), and a never-caching call equals the model's own forward with either."""
    from diffusers import FluxTransformer2DModel

    _, kwargs, _, _ = _residual_calls("flux")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=4, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    samples = _samples(kwargs["hidden_states"], transformer.inner_dim, 3, seed=3)
    singles = _samples(kwargs["hidden_states"], transformer.inner_dim, 1, seed=4)
    calls = {repeat: dict(kwargs, controlnet_block_samples=samples, controlnet_single_block_samples=singles,
                          controlnet_blocks_repeat=repeat) for repeat in (False, True)}
    with torch.no_grad():
        outs = {repeat: transformer(**call)[0] for repeat, call in calls.items()}
    assert (outs[True] - outs[False]).abs().max() > 0.05
    dbc.optimize(transformer, cache=NEVER)
    try:
        with torch.no_grad():
            for repeat, expected in outs.items():
                dbc.reset(transformer)
                assert torch.equal(transformer(**calls[repeat])[0], expected)
    finally:
        dbc.disable(transformer)


@pytest.mark.parametrize("argument", ["controlnet_block_samples", "ip_adapter_image_embeds"])
def test_prologue_off_refuses_controlnet_and_ip_adapter_by_name(argument):
    """With `prologue=False` FLUX runs its own forward under block hooks, where a hit would add the ControlNet
    residuals of the skipped blocks twice (and the IP-Adapter path is untested): refused by name."""
    transformer, kwargs, _, _ = _residual_calls("flux")
    if argument == "controlnet_block_samples":
        kwargs[argument] = _samples(kwargs["hidden_states"], transformer.inner_dim, 1, seed=5)
    else:
        kwargs["joint_attention_kwargs"] = {argument: [torch.zeros(1, 1, 16)]}
    dbc.optimize(transformer, cache=CACHING, prologue=False)
    try:
        with pytest.raises(NotImplementedError, match=rf"{argument}` \(with prologue=False .* twice"), \
                torch.no_grad():
            transformer(**kwargs)
    finally:
        dbc.disable(transformer)


# ------------------------------------------------------------------------------------------------ cache-dit 1.5.3
def test_ip_adapter_cached_steps_and_images_equal_cache_dits(pipelines):
    """FLUX.1 + IP-Adapter: cache-dit's Flux patch projects the image embeddings as the model does; our cached
    steps, residual diffs and images equal cache-dit's."""
    from dbcache_compile import DBCacheConfig
    from tests.cachedit_oracle import run_cache_dit

    pipe, _, ours, steps = pipelines["flux_ip_adapter"]
    dbc.optimize(pipe, cache=CACHING)
    try:
        _run(pipe, flux_ip_adapter_inputs())
        diffs = dbc.summary(pipe).residual_diffs
    finally:
        dbc.disable(pipe)
    images, cached, _, cd_diffs = run_cache_dit(pipe, DBCacheConfig.from_string(CACHING), False,
                                                **flux_ip_adapter_inputs(), num_inference_steps=STEPS,
                                                generator=torch.Generator().manual_seed(0))
    assert cached == steps
    assert cd_diffs.keys() == diffs.keys()
    for step, value in diffs.items():
        assert cd_diffs[step] == pytest.approx(value, rel=1e-4)
    torch.testing.assert_close(images, ours, rtol=0, atol=1e-5)


def test_cache_dit_flux_controlnet_drops_all_but_one_residual(pipelines):
    """What cache-dit 1.5.3 does with FLUX ControlNet residuals (documented, not copied): its Flux adapter puts all
    57 blocks into ONE wrapper in place of `transformer_blocks` (and an empty list in place of
    `single_transformer_blocks`), so the model's loop `for index_block, block in enumerate(self.transformer_blocks)`
    runs once: `controlnet_block_samples[0]` is added once, after all the blocks, and no single sample at all. Even a
    never-caching config is then far from the uncached image, where ours is bit-identical."""
    from dbcache_compile import DBCacheConfig
    from tests.cachedit_oracle import run_cache_dit

    pipe, reference, _, _ = pipelines["flux_controlnet"]
    images, cached, _, _ = run_cache_dit(pipe, DBCacheConfig.from_string(NEVER), False, **flux_controlnet_inputs(),
                                         num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert cached == []
    assert (images - reference).abs().max() > 0.1
    # exactly: the blocks without any residual, then controlnet_block_samples[0] once, before norm_out
    transformer = pipe.transformer
    forward = type(transformer).forward

    def as_cache_dit(self, *args, controlnet_block_samples=None, controlnet_single_block_samples=None, **kwargs):
        add = self.norm_out.register_forward_pre_hook(lambda m, a: (a[0] + controlnet_block_samples[0], *a[1:]))
        try:
            return forward(self, *args, **kwargs)
        finally:
            add.remove()

    transformer.forward = as_cache_dit.__get__(transformer)
    try:
        mimic = _run(pipe, flux_controlnet_inputs())
    finally:
        del transformer.forward
    torch.testing.assert_close(images, mimic, rtol=0, atol=1e-6)


def test_cache_dit_qwen_image_controlnet_patch_fails_on_diffusers_0_42():
    """cache-dit 1.5.3 patches QwenImageControlNet pipelines (QwenImageControlNetPatchFunctor adds c_i inside each
    block, so its cached middle residual would carry the c_i of the step it was computed at), but its patched forward
    calls `pos_embed(img_shapes, txt_seq_lens, device=...)`, the pre-0.36 signature: with diffusers 0.42.1 it
    raises before the first block, so there are no cache-dit decisions to compare with."""
    from dbcache_compile import DBCacheConfig
    from tests.cachedit_oracle import run_cache_dit

    pipe = tiny_qwen_image_controlnet_pipeline()
    with pytest.raises(TypeError, match="multiple values for argument 'device'"):
        run_cache_dit(pipe, DBCacheConfig.from_string(CACHING), False, **qwen_image_controlnet_inputs(),
                      num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_export_refuses_controlnet_inputs_by_name(tmp_path):
    """A package's inputs are flat tensors: export() names a ControlNet residual list instead of baking it in."""
    transformer, kwargs, _, _ = _residual_calls("flux")
    kwargs["controlnet_block_samples"] = _samples(kwargs["hidden_states"], transformer.inner_dim, 1, seed=5)
    with pytest.raises(ValueError, match="'controlnet_block_samples' holds a Tensor"):
        dbc.export(transformer, kwargs, tmp_path / "x.pt2", cache=CACHING)


def test_flux_controlnet_true_cfg_branches_by_inputs():
    """FluxControlNetPipeline with true CFG makes its cond and uncond calls without a cache context, with the same
    ControlNet residuals: the branches are told apart by their prompt tensors (the residuals, new at every step, are
    not conditioning), each caches on its own, and a never-caching config gives the uncached images."""
    pipe = tiny_flux_controlnet_pipeline()
    inputs = flux_controlnet_inputs(cfg=True)
    reference = _run(pipe, inputs)
    dbc.optimize(pipe, cache=NEVER)
    try:
        assert torch.equal(_run(pipe, inputs), reference)
        dbc.runtime_of(pipe).reconfigure(CACHING)
        cached = _run(pipe, inputs)
        summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    assert summary.num_steps == STEPS and summary.separate_cfg
    assert summary.cached_steps and summary.cfg_cached_steps
    assert psnr(cached, reference).min() >= 35


def test_ip_adapter_scale_is_part_of_a_captured_graphs_key():
    """`pipe.set_ip_adapter_scale` changes Python floats on the attention processors, which a hand-captured CUDA graph
    would replay as captured: a new scale is a new graph (emulated on CPU), and the images follow the scale."""
    pipe = tiny_flux_ip_adapter_pipeline()
    inputs = flux_ip_adapter_inputs()
    pipe.set_ip_adapter_scale(0.5)
    half = _run(pipe, inputs)
    pipe.set_ip_adapter_scale(1.0)
    _optimize(pipe, NEVER, "regional+graphs")
    try:
        _run(pipe, inputs)
        graphs = dbc.runtime_of(pipe).graphs
        captures = graphs.captures
        pipe.set_ip_adapter_scale(0.5)
        out = _run(pipe, inputs)
        assert graphs.captures > captures
    finally:
        dbc.disable(pipe)
    torch.testing.assert_close(out, half, rtol=0, atol=1e-4)


def test_flux_ip_adapter_true_cfg_keeps_one_generation_per_branch():
    """With true CFG the FLUX pipeline swaps the IP-Adapter embeddings in its one attention-kwargs dict between its
    "cond" and "uncond" calls (the negative image's embeddings for uncond): each cache context keeps its own
    generation (the same embeddings objects at every step of its branch), both branches cache, and a never-caching
    config gives the uncached images."""
    pipe = tiny_flux_ip_adapter_pipeline()
    g = torch.Generator().manual_seed(16000)
    inputs = dict(flux_ip_adapter_inputs(), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), true_cfg_scale=2.0)
    reference = _run(pipe, inputs)
    dbc.optimize(pipe, cache=NEVER)
    try:
        assert torch.equal(_run(pipe, inputs), reference)
        dbc.runtime_of(pipe).reconfigure(CACHING)
        cached = _run(pipe, inputs)
        summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    assert summary.num_steps == STEPS and summary.separate_cfg
    assert summary.cached_steps and summary.cfg_cached_steps
    assert psnr(cached, reference).min() >= 35


def _controlnet_under_ulysses(rank: int, world_size: int) -> str:
    from diffusers import ContextParallelConfig

    pipe = tiny_flux_controlnet_pipeline()
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    dbc.optimize(pipe, cache=CACHING)
    pipe(**flux_controlnet_inputs(), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    return "ran"


def test_controlnet_under_context_parallelism_is_refused_by_name():
    """diffusers' context-parallel plan shards the hidden stream but not the ControlNet residuals added to it (its own
    forward fails on the shapes): with the cache, a named NotImplementedError on every rank."""
    from tests.cp_harness import run_ranks

    with pytest.raises(NotImplementedError, match="ControlNet residuals under context parallelism"):
        run_ranks(_controlnet_under_ulysses, 2, timeout=240, collective_timeout=120)


@pytest.mark.parametrize("variant", ["FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"])
def test_flux_controlnet_img2img_and_inpaint(variant):
    """FLUX ControlNet img2img / inpaint call the transformer as FluxControlNetPipeline does (the same residuals):
    never caching gives the uncached images bit for bit, a caching config caches and stays close."""
    import diffusers

    from tests.families._common import image

    base = tiny_flux_controlnet_pipeline()
    cls = getattr(diffusers, variant)
    pipe = cls(**{k: v for k, v in base.components.items() if k in cls._get_signature_keys(cls)[0]})
    pipe.set_progress_bar_config(disable=True)
    inputs = dict(flux_controlnet_inputs(), image=image(3, 32), strength=0.9)
    if "Inpaint" in variant:
        inputs["mask_image"] = (image(4, 32) > 0.5).float()[:, :1]
    steps = 10  # strength 0.9: 9 steps run
    reference = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
    dbc.optimize(pipe, cache=NEVER)
    try:
        never = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
        dbc.runtime_of(pipe).reconfigure(CACHING)
        cached = pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images
        summary = dbc.summary(pipe)
    finally:
        dbc.disable(pipe)
    assert torch.equal(never, reference)
    assert summary.cached_steps
    assert psnr(cached, reference).min() >= 35
