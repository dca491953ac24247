from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.measure._lr_range import debiased_ema
from batchpilot.measure._lr_suggest import (
    METHODS,
    check_method,
    minimum_over_10,
    noise_level,
    smoothed_noise,
    spread,
    steepest,
    suggest,
    trim_window,
    valley,
)


def _sigmoid_curve(lrs: np.ndarray, center: float, blow_up: float | None = None) -> np.ndarray:
    """A loss falling from 2 to 0.2 around ``center`` (in log10 lr), rising after ``blow_up``."""
    x = np.log10(lrs)
    loss = 0.2 + 1.8 / (1.0 + np.exp(4.0 * (x - center)))
    if blow_up is not None:
        loss = loss + np.where(x > blow_up, 10.0 * (x - blow_up) ** 2, 0.0)
    return loss


def test_steepest_is_read_against_log_lr() -> None:
    lrs = np.geomspace(1e-5, 1.0, 101)
    loss = _sigmoid_curve(lrs, center=-3.0)
    found = suggest(lrs, loss).values["steepest"]
    assert found == pytest.approx(1e-3, rel=0.13)  # within one point of the true inflection
    # Against linear lr the slope d(loss)/d(lr) = d(loss)/d(log lr) / lr is inflated at small lr,
    # so Lightning's rule (gradient against linear lr) reads this curve two points lower.
    slope_linear = np.gradient(loss, lrs)
    assert lrs[int(np.argmin(slope_linear))] < found / 2


def test_steepest_ignores_the_rise_after_the_minimum() -> None:
    lrs = np.geomspace(1e-5, 1.0, 101)
    loss = _sigmoid_curve(lrs, center=-3.0, blow_up=-1.0)
    assert steepest(lrs, loss) == pytest.approx(1e-3, rel=0.13)


def test_an_early_spike_is_trimmed_and_not_read_as_descent() -> None:
    lrs = np.geomspace(1e-6, 1.0, 100)
    loss = _sigmoid_curve(lrs, center=-2.5)
    loss[:5] += np.array([3.0, 2.0, 1.0, 0.5, 0.2])  # a start-up spike falling fast
    found = suggest(lrs, loss).values["steepest"]
    assert found is not None and 1e-3 < found < 1e-2


def test_valley_takes_the_middle_of_the_longest_decrease() -> None:
    lrs = np.geomspace(1e-4, 1.0, 9)
    loss = np.array([5.0, 5.1, 4.0, 3.0, 2.0, 1.0, 0.5, 3.0, 9.0])
    # The longest decreasing subsequence runs from point 0 (5.0) or 1 to point 6 (0.5).
    assert valley(lrs, loss) == pytest.approx(lrs[3])


def test_minimum_over_10() -> None:
    lrs = np.geomspace(1e-4, 1.0, 41)
    loss = _sigmoid_curve(lrs, center=-2.0, blow_up=-1.0)
    assert minimum_over_10(lrs, loss) == pytest.approx(lrs[int(np.argmin(loss))] / 10)
    assert suggest(lrs, loss).values["minimum_over_10"] == pytest.approx(1e-2, rel=0.3)


def test_flat_noisy_loss_has_no_descent() -> None:
    rng = np.random.default_rng(0)
    lrs = np.geomspace(1e-6, 10.0, 100)
    for seed in range(20):
        raw = 0.7 + rng.normal(0.0, 0.05, 100)
        smoothed = debiased_ema(raw, 0.9)
        found = suggest(lrs, smoothed, losses=raw, smoothing=0.9)
        assert found.values == dict.fromkeys(METHODS, None), f"seed {seed}"
        assert found.message is not None and found.message.startswith("no descent found")


def test_a_real_descent_in_noise_is_found() -> None:
    rng = np.random.default_rng(1)
    lrs = np.geomspace(1e-6, 10.0, 100)
    raw = _sigmoid_curve(lrs, center=-2.0) + rng.normal(0.0, 0.05, 100)
    smoothed = debiased_ema(raw, 0.9)
    found = suggest(lrs, smoothed, losses=raw, smoothing=0.9)
    assert found.message is None
    assert all(value is not None for value in found.values.values())


def test_only_rising_loss_says_to_lower_the_minimum_lr() -> None:
    lrs = np.geomspace(1e-2, 10.0, 50)
    found = suggest(lrs, 1.0 + lrs)
    assert found.values["steepest"] is None
    assert found.message is not None and "lower the minimum lr" in found.message


def test_flat_then_rising_loss_asks_for_more_steps() -> None:
    lrs = np.geomspace(1e-3, 100.0, 100)
    loss = np.where(lrs < 5.0, 0.25, 0.25 + 0.1 * np.log(lrs / 5.0))
    found = suggest(lrs, loss)
    assert found.message is not None and "more steps" in found.message


def test_non_finite_tail_is_cut() -> None:
    lrs = np.geomspace(1e-4, 1.0, 60)
    loss = _sigmoid_curve(lrs, center=-2.0)
    loss[50:] = np.inf
    found = suggest(lrs, loss)
    assert found.values["minimum_over_10"] is not None
    assert found.window[1] <= 50


def test_too_few_points() -> None:
    found = suggest([1e-3, 1e-2], [1.0, 0.5])
    assert found.values["valley"] is None and found.message is not None


def test_noise_level_ignores_the_trend() -> None:
    rng = np.random.default_rng(2)
    trend = 5.0 / (1.0 + np.exp(np.linspace(-6.0, 6.0, 5000)))
    assert noise_level(trend + rng.normal(0.0, 0.3, 5000)) == pytest.approx(0.3, rel=0.05)


def test_the_blow_up_does_not_count_as_noise() -> None:
    rng = np.random.default_rng(4)
    lrs = np.geomspace(1e-5, 1.0, 100)
    raw = _sigmoid_curve(lrs, center=-2.5) + rng.normal(0.0, 0.05, 100)
    raw[90:] = [3.0, 9.0, 1.0, 20.0, 2.0, 40.0, 5.0, 60.0, 8.0, 90.0]
    smoothed = debiased_ema(raw, 0.9)
    assert suggest(lrs, smoothed, losses=raw, smoothing=0.9).message is None


def test_smoothed_noise_matches_the_moving_average() -> None:
    rng = np.random.default_rng(3)
    raw = rng.normal(0.0, 1.0, (4000, 60))
    smoothed = np.array([debiased_ema(row, 0.9) for row in raw])
    for k in (1, 5, 11, 60):  # debiased early points average fewer losses: noisier
        assert float(np.std(smoothed[:, k - 1])) == pytest.approx(
            smoothed_noise(1.0, 0.9, k), rel=0.05
        )


def test_spread_is_median_and_quartiles_in_lr() -> None:
    result = spread([1e-3, 4e-3, None, 2e-3, 8e-3])
    assert result.count == 4
    assert result.median == pytest.approx(3e-3)
    assert result.q1 == pytest.approx(np.percentile([1e-3, 2e-3, 4e-3, 8e-3], 25))
    assert result.q3 == pytest.approx(np.percentile([1e-3, 2e-3, 4e-3, 8e-3], 75))
    empty = spread([None, None])
    assert empty.to_dict() == {"median": None, "q1": None, "q3": None, "count": 0}


def test_trim_window() -> None:
    assert trim_window(100) == (10, 95)
    assert trim_window(100, 0.0, 0.0) == (0, 100)
    with pytest.raises(BadInputError, match=r"^skip_begin: "):
        trim_window(100, skip_begin=0.7)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(BadInputError, match=r"^smoothed: "):
        suggest([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(BadInputError, match=r"^lrs: "):
        suggest([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(BadInputError, match=r"^min_drop: "):
        suggest([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], min_drop=2.0)
    with pytest.raises(BadInputError, match=r"^method: unknown method 'best'"):
        check_method("best")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.01, max_value=10.0, allow_nan=False), min_size=3, max_size=80)
)
def test_suggestions_lie_inside_the_tested_range(losses: list[float]) -> None:
    lrs = np.geomspace(1e-5, 1.0, len(losses))
    found = suggest(lrs, losses)
    for name, value in found.values.items():
        if value is None:
            continue
        low = lrs[0] / (10 if name == "minimum_over_10" else 1)
        assert low <= value <= lrs[-1] and math.isfinite(value)
    if found.message is not None:
        assert all(value is None for value in found.values.values())
