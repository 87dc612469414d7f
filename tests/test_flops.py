import pytest
import torch

from dbcache_compile.export import capture_transformer_inputs
from dbcache_compile.flops import flop_ratio, forward_flops
from dbcache_compile.stats import CacheSummary
from dbcache_compile.testing import flux_inputs, tiny_flux_pipeline


@pytest.fixture(scope="module")
def counted():
    pipe = tiny_flux_pipeline()
    kwargs = capture_transformer_inputs(pipe, **flux_inputs(), generator=torch.Generator().manual_seed(0))
    return pipe.transformer, kwargs, forward_flops(pipe.transformer, kwargs)


def test_single_block_flops_against_a_hand_count(counted):
    _, kwargs, (total, per_block) = counted
    tokens = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]  # 64 + 8
    d, mlp = 32, 128
    # q, k, v (d→d), proj_mlp (d→4d), proj_out (d+4d→d) on every token; adaLN linear (d→3d) on the 1 temb row
    linears = 2 * tokens * (3 * d * d + d * mlp + (d + mlp) * d) + 2 * d * 3 * d
    heads, head_dim = 2, 16
    attention = 2 * heads * tokens * tokens * (head_dim + head_dim)  # Q·Kᵀ and P·V over the joint sequence
    single = per_block[2:]
    assert len(set(single)) == 1, "identical single blocks must count the same"
    # the rest: norms, activations, RoPE
    assert linears + attention <= single[0] <= 1.1 * linears + attention
    assert total > sum(per_block)


def test_flop_ratio_formula(counted):
    transformer, kwargs, (total, per_block) = counted
    summary = CacheSummary(config="F1B0", num_steps=10, cached_steps=[2, 3, 5], cfg_cached_steps=[],
                           residual_diffs={}, cfg_residual_diffs={}, separate_cfg=False, lowering="eager",
                           mode=None, num_blocks=8, Fn=1, Bn=0)
    skipped = sum(per_block[1:])
    expected = 10 * total / (10 * total - 3 * skipped)
    assert flop_ratio(transformer, summary, kwargs) == pytest.approx(expected)
    assert 1.0 < expected < 10 / 7


def test_library_count_agrees_with_the_benchmark_count(counted):
    """The demo's FLOP ratio (dbcache_compile.flops) and the bench's TFLOPs column (bench.flops) count the same."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.flops import cached_forward_flops, full_forward_flops

    transformer, kwargs, (total, per_block) = counted
    assert full_forward_flops(transformer, kwargs).total == total
    cached = cached_forward_flops(transformer, kwargs, fn_blocks=1, bn_blocks=0).total
    assert cached == pytest.approx(total - sum(per_block[1:]), rel=1e-3)
