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
    single = per_block[2:]
    assert len(set(single)) == 1, "identical single blocks must count the same"
    assert linears <= single[0] <= 1.1 * linears  # the rest: norms, activations, RoPE (attention not counted)
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
