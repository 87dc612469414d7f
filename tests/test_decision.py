import itertools

import pytest
import torch

from dbcache_compile import DBCacheConfig
from dbcache_compile.decision import (cache_allowed, gate_tensors, hit_predicate, read_decision_sync, relative_l1,
                                      warmup_steps)


def allowed(cfg, step, cached=0, consecutive=0, has_prev=True):
    return cache_allowed(cfg, step, cached, consecutive, has_prev)


def test_warmup_gate():
    """Warm-up steps range(0, W, I) always compute: W4 blocks steps 0-3, W4I2 only steps 0 and 2, W0 allows caching
    from step 0."""
    cfg = DBCacheConfig.from_string("F1B0_W4_R0.5")
    assert [allowed(cfg, s) for s in range(6)] == [False] * 4 + [True] * 2
    cfg = DBCacheConfig.from_string("F1B0_W4I2_R0.5")  # warmup set {0, 2}: 1 and 3 may cache
    assert list(warmup_steps(cfg)) == [0, 2]
    assert [allowed(cfg, s) for s in range(5)] == [False, True, False, True, True]
    assert all(allowed(DBCacheConfig.from_string("F1B0_W0_R0.5"), s) for s in range(3))


def test_steps_mask_gate_and_warmup_truncation():
    """A steps_computation_mask forces compute on its 1 steps, cuts warm-up to its leading run of 1s, and allows
    caching past its end."""
    cfg = DBCacheConfig(max_warmup_steps=8, residual_diff_threshold=0.5, steps_computation_mask=(1, 1, 0, 1, 0))
    assert list(warmup_steps(cfg)) == [0, 1]  # truncated to the leading run of 1s
    assert [allowed(cfg, s) for s in range(7)] == [False, False, True, False, True, True, True]


def test_max_cached_steps_gate():
    """max_cached_steps (M) stops caching once that many steps of the generation were cached."""
    cfg = DBCacheConfig.from_string("F1B0_W0M3_R0.5")
    assert allowed(cfg, 5, cached=2) and not allowed(cfg, 5, cached=3)


def test_max_continuous_gate():
    """max_continuous_cached_steps (MC) caps the cached steps in a row; MC0 means unlimited."""
    cfg = DBCacheConfig.from_string("F1B0_W0MC2_R0.5")
    assert allowed(cfg, 5, consecutive=1) and not allowed(cfg, 5, consecutive=2)
    unlimited = DBCacheConfig.from_string("F1B0_W0MC0_R0.5")
    assert allowed(unlimited, 5, consecutive=1000)


def test_previous_residual_and_threshold_gates():
    """No step is cached without a previous Fn residual, nor when the threshold is <= 0 (never cache)."""
    cfg = DBCacheConfig.from_string("F1B0_W0_R0.5")
    assert not allowed(cfg, 3, has_prev=False)
    assert not allowed(DBCacheConfig.from_string("F1B0_W0_R0"), 3)
    assert not allowed(DBCacheConfig(max_warmup_steps=0, residual_diff_threshold=-0.5), 3)


GATE_CONFIGS = [DBCacheConfig.from_string(s) for s in (
    "F1B0_W4I2M3MC2_R0.5", "F1B0_W2_R0", "F1B0_W0MC1_R1.0", "F1B0_W0_R-0.5", "F1B0_W3I3M1_R2.5",
    "F1B0_W5_R0.3_SCM110", "F1B0_W1_R0.3_SCM0", "F1B0_W0M2MC1_R0.3_SCM1", "F1B0_W8_R0.3_SCM1111111111")]
GATE_CONFIGS.append(DBCacheConfig(max_warmup_steps=3, steps_computation_mask=(1, 0, 1, 1, 0, 1),
                                  residual_diff_threshold=0.3))


def test_gates_agree_on_ints_and_tensors():
    """The gates decide the same on host ints (eager, segments), on device counters with the config's numbers as
    constants (an exported graph), and on device counters with the numbers as device tensors (the cond graph: made
    fresh, or refilled in place from another config, the mask changing length), returning a bool and bool tensors."""
    previous = gate_tensors(GATE_CONFIGS[-1], torch.device("cpu"))
    for cfg in GATE_CONFIGS:
        fresh = gate_tensors(cfg, torch.device("cpu"))
        refilled = previous = gate_tensors(cfg, torch.device("cpu"), out=previous)
        assert refilled.mask.shape == fresh.mask.shape and len(fresh.mask) >= 2
        for step, cached, cons, prev in itertools.product(range(12), range(4), range(3), (0, 1)):
            host = cache_allowed(cfg, step, cached, cons, bool(prev))
            counters = (torch.tensor(step), torch.tensor(cached), torch.tensor(cons), torch.tensor(prev))
            assert isinstance(host, bool)
            for gates in (cfg, fresh, refilled):
                dev = cache_allowed(gates, *counters)
                assert isinstance(dev, torch.Tensor) and dev.dtype == torch.bool
                assert bool(dev) == host, (str(cfg), step, cached, cons, prev)
        for diff in (0.0, 0.29, 0.3, 0.7, 2.0, float("nan")):
            expected = bool(hit_predicate(cfg, True, torch.tensor(diff)))
            assert bool(hit_predicate(fresh, torch.tensor(True), torch.tensor(diff))) == expected
            assert bool(hit_predicate(refilled, torch.tensor(True), torch.tensor(diff))) == expected


def test_device_gates_trace_without_specializing_and_swap_without_recompiling():
    """The steps mask is indexed on the device (it was read with a tensor index: 'Could not extract specialized
    integer from data-dependent expression' under torch.compile, graph='cond' with SCM), and the gates' numbers are
    graph inputs: one graph serves every config, a mask of another length included (its length is dynamic)."""
    fn = torch.compile(cache_allowed, fullgraph=True, backend="eager")
    cpu = torch.device("cpu")
    gates = gate_tensors(GATE_CONFIGS[5], cpu)
    torch._dynamo.mark_dynamic(gates.mask, 0)
    counters = lambda step, cached, cons: (torch.tensor(step), torch.tensor(cached), torch.tensor(cons),  # noqa: E731
                                           torch.tensor(1))
    fn(gates, *counters(0, 0, 0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for cfg in GATE_CONFIGS:
            gates = gate_tensors(cfg, cpu, out=gates)
            torch._dynamo.mark_dynamic(gates.mask, 0)
            for step, cached, cons in itertools.product(range(12), range(3), range(3)):
                assert bool(fn(gates, *counters(step, cached, cons))) == cache_allowed(cfg, step, cached, cons, True)
    exported = torch.compile(lambda step: cache_allowed(GATE_CONFIGS[5], step, step, step, step), fullgraph=True,
                             backend="eager")  # the config's numbers as constants (an exported graph)
    assert [bool(exported(torch.tensor(s))) for s in range(5)] == [cache_allowed(GATE_CONFIGS[5], s, s, s, s)
                                                                   for s in range(5)]


def test_relative_l1_matches_definition():
    """The decision diff is cache-dit's mean|prev - cur| / mean|prev| over all elements, 0 for equal residuals."""
    prev = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    cur = torch.tensor([[1.5, -2.0], [2.0, 4.0]])
    expected = (0.5 + 0 + 1 + 0) / 4 / ((1 + 2 + 3 + 4) / 4)
    assert relative_l1(prev, cur).item() == pytest.approx(expected)
    assert relative_l1(prev, prev).item() == 0.0


def test_hit_predicate_threshold_and_single_sync_read():
    """A hit needs diff < R strictly, compared in float64 like cache-dit; R >= 1 hits without the diff; predicate
    and diff reach the host in one read."""
    cfg = DBCacheConfig.from_string("F1B0_W0_R0.25")
    diff = torch.tensor(0.2)
    hit, value = read_decision_sync(hit_predicate(cfg, True, diff), diff)
    assert hit is True and value == pytest.approx(0.2)
    hit, _ = read_decision_sync(hit_predicate(cfg, False, diff), diff)
    assert hit is False
    assert not bool(hit_predicate(cfg, True, torch.tensor(0.25)))  # strict: diff < R
    # R >= 1 hits without looking at the diff (even NaN)
    assert bool(hit_predicate(DBCacheConfig.from_string("R1.0"), True, torch.tensor(float("nan"))))
    # compared in float64 like cache-dit's Python float: a bf16 diff just below R in float64 still hits
    d = torch.tensor(0.2490234375, dtype=torch.bfloat16)
    assert bool(hit_predicate(cfg, True, d)) == (d.item() < 0.25)
