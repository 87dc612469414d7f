"""The FLOP count (dbcache_compile.flops) behind the demo's "FLOP ratio" column and the bench's TFLOPs and
SpeedUp(FLOPs) columns: checked against hand counts and against PyTorch's own FLOP counter on real generations."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dbcache_compile as dbc
from dbcache_compile.export import capture_transformer_inputs
from dbcache_compile.flops import (ForwardFlops, cached_forward_flops, count_attention, count_forward, flop_ratio,
                                   full_forward_flops, generation_flops)
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline

HIDDEN, HEADS, HEAD_DIM = 32, 2, 16


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


@pytest.fixture(scope="module")
def tiny():
    """The tiny FLUX pipeline (8 blocks) and the transformer inputs of its first call."""
    pipe = tiny_flux_pipeline()
    kwargs = capture_transformer_inputs(pipe, **flux_inputs(), generator=torch.Generator().manual_seed(0))
    return pipe, kwargs


def test_linear_flops_match_hand_count(transformer):
    """A linear layer counts 2·tokens·in·out FLOPs: the unit every TFLOPs number of the bench is made of."""
    x = torch.randn(1, 64, 16)
    assert count_forward(transformer.x_embedder, transformer.x_embedder, {"input": x}) == \
        ForwardFlops(calflops=2 * 64 * 16 * HIDDEN, attention=0)


def test_single_block_flops_match_hand_count(transformer):
    """A FLUX single block counts its linears (within 2 % for norms / activations) plus its attention matmuls
    exactly; calflops alone would miss the attention (the seed's tables count it)."""
    image, text = 64, 8
    tokens = image + text
    block = transformer.single_transformer_blocks[0]
    kwargs = {"hidden_states": torch.randn(1, image, HIDDEN), "encoder_hidden_states": torch.randn(1, text, HIDDEN),
              "temb": torch.randn(1, HIDDEN), "image_rotary_emb": transformer.pos_embed(torch.zeros(tokens, 3))}
    flops = count_forward(block, block, kwargs)
    d = HIDDEN
    # proj_mlp d->4d, to_q/k/v d->d, proj_out 5d->d on every token; the adaLN linear d->3d once per sample
    linears = 2 * tokens * (4 * d * d + 3 * d * d + 5 * d * d) + 2 * d * 3 * d
    assert linears <= flops.calflops <= 1.02 * linears
    assert flops.attention == 2 * HEADS * tokens * tokens * (HEAD_DIM + HEAD_DIM)


def test_attention_counter_counts_qk_and_pv_and_restores_sdpa():
    """The hand count of attention is 2·B·H·Lq·Lk·(D + Dv), and counting leaves torch's SDPA untouched."""
    original = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(2, 3, 5, 4)
    with count_attention() as total:
        torch.nn.functional.scaled_dot_product_attention(q, torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6))
    assert total[0] == 2 * 6 * 5 * 7 * (4 + 6)
    assert torch.nn.functional.scaled_dot_product_attention is original


def test_cached_forward_runs_fn_plus_bn_blocks(tiny):
    """A cached F1B0 step costs one of the eight blocks' attention, more Fn/Bn blocks cost more, and a split larger
    than the model (or more cached calls than calls) is an error."""
    pipe, kwargs = tiny
    full = full_forward_flops(pipe.transformer, kwargs)
    f1 = cached_forward_flops(pipe.transformer, kwargs, 1, 0)
    f2b1 = cached_forward_flops(pipe.transformer, kwargs, 2, 1)
    assert 0 < f1.total < f2b1.total < full.total
    assert f1.attention * 8 == full.attention  # 8 blocks with the same joint attention
    with pytest.raises(ValueError):
        cached_forward_flops(pipe.transformer, kwargs, 8, 1)
    with pytest.raises(ValueError):
        generation_flops(full, f1, calls=3, cached_calls=4)


def _module_flops(pipe, call) -> dict[str, int]:
    """FLOPs per module (FlopCounterMode's hierarchy, e.g. ``FluxTransformer2DModel.transformer_blocks.0``) of one
    real generation, math SDPA so that attention counts as matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def test_generation_flops_equal_what_a_real_cached_generation_executes(tiny):
    """``generation_flops`` (the bench's TFLOPs per image, calibrate's FLOP ratio) equals the transformer FLOPs that
    PyTorch's FlopCounterMode sees a real cached generation execute, when fed forwards counted independently: the
    full forward from an uncached generation, the cached forward as the full one minus the per-block counts of the
    blocks between Fn and Bn, and the cached calls that summary() reports. Swapping computed and cached calls, or
    charging a hit its skipped blocks, fails here."""
    pipe, _ = tiny
    steps, config = 8, "F2B1_W2MC3_R1.0"
    call = dict(flux_inputs(), num_inference_steps=steps)
    root = type(pipe.transformer).__name__
    blocks = [f"{root}.transformer_blocks.{i}" for i in range(len(pipe.transformer.transformer_blocks))] + \
        [f"{root}.single_transformer_blocks.{i}" for i in range(len(pipe.transformer.single_transformer_blocks))]
    uncached = _module_flops(pipe, call)
    assert uncached[root] % steps == 0 and all(uncached[b] % steps == 0 for b in blocks)
    full = uncached[root] // steps
    skipped = sum(uncached[b] // steps for b in blocks[2:-1])  # F2B1: blocks 2 .. n-2 are skipped on a hit
    cached, summary = _count_cached_generation(pipe, config, call, _module_flops)
    hits = len(summary.cached_steps)
    assert 0 < hits < steps and summary.num_steps == steps
    assert cached[blocks[2]] == (steps - hits) * uncached[blocks[2]] // steps  # hits really skipped the block
    predicted = generation_flops(ForwardFlops(full, 0), ForwardFlops(full - skipped, 0), calls=steps,
                                 cached_calls=hits)
    assert predicted == cached[root]
    assert generation_flops(ForwardFlops(full, 0), ForwardFlops(full - skipped, 0), calls=steps,
                            cached_calls=0) == uncached[root]


def _count_cached_generation(pipe, config, call, count):
    """``count(pipe, call)`` on a cached generation (after one that allocates the cache buffers for this shape), and
    that generation's summary."""
    dbc.optimize(pipe, cache=config)
    try:
        pipe(**call, generator=torch.Generator().manual_seed(0))
        return count(pipe, call), dbc.summary(pipe)
    finally:
        dbc.disable(pipe)


def _transformer_flops(pipe, kwargs) -> int:
    """What PyTorch's FlopCounterMode counts in the transformer (matmuls and attention) during one generation, with
    the math SDPA backend so that attention shows up as countable matmuls on a CPU."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    return sum(counter.get_flop_counts()[type(pipe.transformer).__name__].values())


@pytest.mark.parametrize("config", ["F2B1_W2MC3_R1.0", "F1B0_W4MC6_R1.0"])
def test_flop_ratio_is_the_ratio_of_the_flops_the_generations_execute(tiny, config):
    """The FLOP ratio the demo prints (and the bench's SpeedUp(FLOPs)) equals uncached FLOPs / cached FLOPs as
    PyTorch's own FLOP counter measures them on two real generations: an independent count, so a cached step that
    ran more (or fewer) blocks than Fn + Bn, or a ratio that ignored Bn, would fail here."""
    pipe, kwargs = tiny
    call = dict(flux_inputs(), num_inference_steps=8)
    uncached = _transformer_flops(pipe, call)
    cached, summary = _count_cached_generation(pipe, config, call, _transformer_flops)
    assert summary.cached_steps, "the forced config must cache steps"
    assert flop_ratio(pipe.transformer, summary, kwargs) == pytest.approx(uncached / cached, rel=5e-3)
