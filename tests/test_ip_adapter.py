"""IP-Adapter image embeddings on the hook families that have one in diffusers 0.42.1: SD3 and SD3.5
(``SD3IPAdapterMixin``: ``IPAdapterTimeImageProjection`` + ``SD3IPAdapterJointAttnProcessor2_0`` on every attention
layer) and Chroma (FLUX's loader: ``MultiIPAdapterImageProjection`` + ``FluxIPAdapterAttnProcessor`` on the double
blocks), each loaded by ``pipe.load_ip_adapter`` from a state dict drawn in ``tests/families/{sd3,chroma}.py`` (no
download).

These families run the model's own forward: it projects ``joint_attention_kwargs["ip_adapter_image_embeds"]`` (SD3: with
the timestep, into ``ip_hidden_states`` and an ``ip_temb``) into a copy of the attention kwargs that
``apply_lora_scale`` made, and every block gets them through its ``joint_attention_kwargs``; the IP attention output is
part of each block's own output, so a block's residual holds it and a hit reuses it like the rest of the block's work.
The caller's dict is not changed, so the embeddings (the same objects at every step of a pipeline call) are conditioning
like the prompt. FLUX.1's IP-Adapter (our prologue) is in ``tests/test_controlnet.py``."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import dbcache_compile as dbc
from dbcache_compile.metrics import psnr
from tests.cache_checks import CACHING, NEVER, STEPS, never_then_caching, optimize_in as _optimize, run as _run
from tests.cache_checks import LOWERINGS as ALL_LOWERINGS
from tests.families import first_transformer_call
from tests.families.chroma import chroma_ip_adapter_inputs, tiny_chroma_ip_adapter_pipeline
from tests.families.sd3 import sd3_ip_adapter_inputs, tiny_sd3_ip_adapter_pipeline

#: (builder, inputs, whether the pipeline makes separate cond / uncond calls, PSNR floor of CACHING in dB; measured
#: 54.7 (SD3), 38.5 (SD3.5: qk RMSNorm, the IP processor on the dual-attention attn2 too) and 41.3 (Chroma))
CASES = {
    "sd3": (tiny_sd3_ip_adapter_pipeline, sd3_ip_adapter_inputs, False, 50.0),
    "sd35": (partial(tiny_sd3_ip_adapter_pipeline, sd35=True), sd3_ip_adapter_inputs, False, 35.0),
    "chroma": (tiny_chroma_ip_adapter_pipeline, chroma_ip_adapter_inputs, True, 38.0),
}
#: the lowerings these pipelines run (cond needs a family with a prologue; SD3 and Chroma run their own forward)
LOWERINGS = {name: ALL_LOWERINGS[name] for name in ("eager", "regional", "segments", "regional+graphs")}
#: Chroma is ungroupable (its forward slices a modulation per block): no segments, and regional runs it block by
#: block, so there is no whole-group graph to capture
RUNS = [(case, lowering) for case in CASES for lowering in LOWERINGS
        if not (case == "chroma" and lowering in ("segments", "regional+graphs"))]


@pytest.fixture(scope="module")
def pipelines():
    """Each case's pipeline with its uncached images and the eager cache's images and summary (built once)."""
    built = {}
    for name, (builder, inputs, _, _) in CASES.items():
        pipe = builder()
        reference = _run(pipe, inputs())
        dbc.optimize(pipe, cache=CACHING)
        try:
            cached = _run(pipe, inputs())
            summary = dbc.summary(pipe)
        finally:
            dbc.disable(pipe)
        built[name] = (pipe, reference, cached, summary)
    return built


def test_the_ip_adapter_changes_the_images(pipelines):
    """The drawn adapters matter: scale 0 (the adapter off) gives other images, so the checks below see it."""
    for name, (pipe, reference, _, _) in pipelines.items():
        pipe.set_ip_adapter_scale(0.0)
        try:
            off = _run(pipe, CASES[name][1]())
        finally:
            pipe.set_ip_adapter_scale(1.0)
        assert (off - reference).abs().max() > 0.02, name


@pytest.mark.parametrize("case, lowering", RUNS)
def test_never_caching_equals_uncached_and_caching_hits_close(pipelines, case, lowering):
    """A never-caching config gives the uncached images (bit-identical eager, <= 1e-4 compiled); a caching config
    caches steps 2, 3, 5, 6 (in both CFG branches of Chroma), stays close (PSNR printed), and every compiled lowering
    takes the eager cache's decisions and gives its images."""
    pipe, reference, eager_cached, eager_summary = pipelines[case]
    inputs, separate, floor = CASES[case][1], CASES[case][2], CASES[case][3]
    assert eager_summary.cached_steps == [2, 3, 5, 6]
    assert eager_summary.cfg_cached_steps == ([2, 3, 5, 6] if separate else [])
    value = float(psnr(eager_cached, reference).min())
    print(f"\n{case} IP-Adapter {CACHING}: cached {eager_summary.cached_steps}, PSNR vs uncached {value:.1f} dB")
    assert value >= floor
    summary = never_then_caching(pipe, inputs, lowering, reference, eager_cached)
    assert (summary.cached_steps, summary.cfg_cached_steps) == (eager_summary.cached_steps,
                                                                 eager_summary.cfg_cached_steps)




@pytest.mark.parametrize("case", list(CASES))
def test_ip_adapter_embeddings_are_conditioning(pipelines, case):
    """A bare transformer: two calls with the same prompt tensors and embeddings (the second hits: W1, R1.0), then a
    call with the same prompt tensors and *other* embeddings on new latents. That call starts a new generation (it
    computes, and equals the uncached output for those embeddings); were the embeddings not conditioning it would be
    step 2 of the old generation, a hit, and far from it."""
    pipe = pipelines[case][0]
    kwargs = dict(first_transformer_call(pipe, CASES[case][1]()), return_dict=False)
    transformer = pipe.transformer
    embeds = kwargs["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    other_embeds = ([e + torch.randn(e.shape, generator=torch.Generator().manual_seed(3)) for e in embeds]
                    if isinstance(embeds, list) else embeds + torch.randn(embeds.shape,
                                                                          generator=torch.Generator().manual_seed(3)))
    latents = kwargs["hidden_states"]
    other = dict(kwargs, hidden_states=latents + 0.3 * torch.randn(latents.shape,
                                                                   generator=torch.Generator().manual_seed(4)),
                 joint_attention_kwargs={"ip_adapter_image_embeds": other_embeds})
    with torch.no_grad():
        expected = transformer(**other)[0]
        same_step = dict(other, joint_attention_kwargs=kwargs["joint_attention_kwargs"])
        with_old_embeds = transformer(**same_step)[0]
    assert (expected - with_old_embeds).abs().max() > 0.01  # the embeddings matter to this call
    dbc.optimize(transformer, cache="F1B0_W1MC5_R1.0")  # R >= 1: every step after the first hits
    try:
        with torch.no_grad():
            transformer(**kwargs)
            transformer(**dict(kwargs, joint_attention_kwargs=dict(kwargs["joint_attention_kwargs"])))
            assert dbc.summary(transformer).cached_steps == [1]  # a new dict, the same embeddings: same generation
            out = transformer(**other)[0]
        summary = dbc.summary(transformer)
    finally:
        dbc.disable(transformer)
    assert summary.num_steps == 1 and summary.cached_steps == []
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_sd3_ip_adapter_scale_is_part_of_a_captured_graphs_key(pipelines):
    """`pipe.set_ip_adapter_scale` changes Python floats on the attention processors (SD3's: one float per processor;
    FLUX's: a list), which a hand-captured CUDA graph would replay as captured: a new scale is a new graph (emulated
    on CPU), and the images follow the scale. (Chroma runs block by block: no captured graphs.)"""
    pipe, inputs = pipelines["sd3"][0], CASES["sd3"][1]
    pipe.set_ip_adapter_scale(0.5)
    try:
        half = _run(pipe, inputs())
        pipe.set_ip_adapter_scale(1.0)
        _optimize(pipe, NEVER, "regional+graphs")
        try:
            _run(pipe, inputs())
            graphs = dbc.runtime_of(pipe).graphs
            captures = graphs.captures
            pipe.set_ip_adapter_scale(0.5)
            out = _run(pipe, inputs())
            assert graphs.captures > captures
        finally:
            dbc.disable(pipe)
    finally:
        pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(out, half, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ cache-dit 1.5.3
@pytest.mark.parametrize("case", list(CASES))
def test_cached_steps_diffs_and_images_equal_cache_dits(pipelines, case):
    """cache-dit 1.5.3 runs both pipelines with the IP-Adapter (SD3: the model's forward under its block wrapper;
    Chroma: its ChromaPatchFunctor's forward, which projects the embeddings as the model does and adds the IP
    attention output in its patched double block): per block list and CFG branch its cached steps and residual
    diffs are ours, and its images are ours bit for bit."""
    from tests.cachedit_oracle import cache_dit_contexts, run_cache_dit

    pipe, _, ours, summary = pipelines[case]
    inputs, separate = CASES[case][1], CASES[case][2]
    config = dbc.DBCacheConfig.from_string(CACHING)
    call = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    theirs = cache_dit_contexts(pipe, config, **inputs(), **call)
    images, _, _, _ = run_cache_dit(pipe, config, separate, **inputs(), **dict(call, generator=torch.Generator()
                                                                                 .manual_seed(0)))
    chains = summary.chains or {"": {"cached_steps": summary.cached_steps, "cfg_cached_steps": summary.cfg_cached_steps,
                                     "residual_diffs": summary.residual_diffs}}
    assert len(chains) == len(theirs)
    for (name, mine), cd in zip(chains.items(), theirs):
        assert name in ("", cd["list"])
        assert (mine["cached_steps"], mine["cfg_cached_steps"]) == (cd["cached"], cd["cfg_cached"]), (name, mine, cd)
        assert mine["residual_diffs"].keys() == cd["diffs"].keys()
        for step, value in mine["residual_diffs"].items():
            assert cd["diffs"][step] == pytest.approx(value, rel=1e-4)
    torch.testing.assert_close(images, ours, rtol=0, atol=1e-6)
