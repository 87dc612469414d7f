import math

import torch

from dbcache_compile.state import BranchState, taylor_coefficients, taylor_forecast, taylor_update


def test_taylor_forecast_reproduces_a_polynomial():
    """TaylorSeer's divided differences over compute steps forecast a quadratic residual exactly at the following
    cached steps."""
    # y(s) = 2 + 3 s + 0.5 s^2 sampled at compute steps 3, 5, 7 (window 2): order-2 divided differences
    y = lambda s: torch.full((2, 3), 2 + 3 * s + 0.5 * s * s, dtype=torch.float64)
    state = BranchState(terms=3)
    state.allocate(y(0), torch.zeros(1, dtype=torch.float64))
    state.valid, state.last_compute = 1, 1  # a compute at step 1 left d0 only
    for step in (3, 5, 7):
        n = state.derivatives_for_update(step)
        ladder = taylor_update(state.ladder_h, y(step), step - state.last_compute, n)
        for buf, new in zip(state.ladder_h, ladder):
            buf.copy_(new)
        state.record_compute(step, n)
    assert state.valid == 3
    # d0 = y(7); d1 = (y7 - y5)/2 = 3 + 0.5*12 = 9; d2 = (d1(7) - d1(5))/2 = ((9) - (3 + 0.5*8))/2 = 1
    assert state.ladder_h[1][0, 0].item() == 9.0 and state.ladder_h[2][0, 0].item() == 1.0
    for k in (1, 2, 3):
        forecast = taylor_forecast(state.ladder_h, state.forecast_coefficients(7 + k))
        hand = y(7)[0, 0].item() + 9.0 * k + 1.0 * k * k / 2
        assert math.isclose(forecast[0, 0].item(), hand)


def test_no_derivatives_until_step_three_like_cache_dit():
    """Like cache-dit's lagging counter, TaylorSeer forms no derivative on compute steps up to 2; the first comes
    at step 3."""
    state = BranchState(terms=2)
    assert state.derivatives_for_update(0) == 0
    state.record_compute(0, 0)
    assert state.derivatives_for_update(2) == 0  # cache-dit's lagging TaylorSeer counter
    state.record_compute(2, 0)
    assert state.derivatives_for_update(3) == 1


def test_coefficients_mask_invalid_entries():
    """Forecast weights are k^i / i! for valid ladder entries and 0 for entries not yet valid."""
    assert taylor_coefficients(elapsed=2, valid=2, terms=3) == [1.0, 2.0, 0.0]
    assert taylor_coefficients(elapsed=3, valid=3, terms=3) == [1.0, 3.0, 4.5]


def test_single_term_forecast_is_the_cached_residual_itself():
    """Without TaylorSeer (one term) a cached step reuses the cached residual tensor itself, with no arithmetic."""
    r = torch.randn(4)
    assert taylor_forecast([r], [1.0]) is r


def test_consecutive_counter_resets_after_a_compute_step():
    """The consecutive-cached counter (for MC) continues across cached steps and resets after a computed step."""
    state = BranchState(terms=1)
    state.begin_step(3); state.record_hit(3)
    state.begin_step(4); state.record_hit(4)
    assert state.consecutive == 2
    state.begin_step(5)
    assert state.consecutive == 2  # previous step (4) was cached: streak continues
    state.begin_step(6)  # step 5 computed
    assert state.consecutive == 0
