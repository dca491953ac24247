"""Goodput: the efficiency formulas, the recommended batch and the split that realises it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from batchpilot.errors import BadInputError
from batchpilot.plan._goodput import (
    plan_goodput,
    samples_to_target_ratio,
    statistical_efficiency,
    steps_to_target_ratio,
)


def test_efficiency_formulas() -> None:
    assert statistical_efficiency(32, noise_scale=100.0, base_batch=32) == 1.0
    assert statistical_efficiency(132, noise_scale=100.0, base_batch=32) == pytest.approx(132 / 232)
    # Below B0 a sample is worth more than at B0.
    assert statistical_efficiency(8, noise_scale=100.0, base_batch=32) > 1.0
    assert statistical_efficiency(10**6, noise_scale=math.inf, base_batch=32) == 1.0
    assert steps_to_target_ratio(50, noise_scale=50.0) == 2.0
    assert samples_to_target_ratio(50, noise_scale=50.0) == 2.0
    # S·B = E: the two ratios describe the same curve S = S_min(1 + B_noise/B).
    for batch in (1, 10, 100, 1000):
        steps = steps_to_target_ratio(batch, noise_scale=40.0)
        samples = samples_to_target_ratio(batch, noise_scale=40.0)
        assert steps * batch == pytest.approx(samples * 40.0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(BadInputError, match="noise_scale"):
            statistical_efficiency(8, noise_scale=bad, base_batch=8)
    with pytest.raises(BadInputError, match="batch"):
        steps_to_target_ratio(0, noise_scale=1.0)


def test_goodput_is_throughput_times_efficiency() -> None:
    pairs = [(8, 100.0), (16, 180.0), (32, 300.0), (64, 400.0)]
    plan = plan_goodput(pairs, noise_scale=32.0, base_batch=8, max_batch=256)
    by_batch = {p.global_batch: p for p in plan.points}
    assert sorted(by_batch) == [8, 16, 32, 64, 128, 256]
    assert by_batch[32].samples_per_second == 300.0
    assert by_batch[32].efficiency == pytest.approx(40 / 64)
    assert by_batch[32].goodput == pytest.approx(300.0 * 40 / 64)
    # Beyond the largest micro-batch that was measured, accumulation realises the batch.
    assert (by_batch[256].micro_batch, by_batch[256].accumulation_steps) == (64, 4)
    assert by_batch[256].samples_per_second == 400.0
    # goodput: 8 → 100, 16 → 180·40/48 = 150, 32 → 187.5, 64 → 400·40/96 = 166.7
    assert plan.recommended_batch == 32
    assert plan.to_dict()["recommended"]["global_batch"] == 32


def test_recommendation_follows_the_noise_scale() -> None:
    # Throughput that saturates, 1000·b/(b + 16): goodput ∝ B / ((B + 16)(B_noise + B)) peaks at
    # B = √(16·B_noise), so the best batch grows with the noise scale.
    pairs = [(2**k, 1000.0 * 2**k / (2**k + 16)) for k in range(11)]
    expected = {4.0: 8, 64.0: 32, 1024.0: 128}
    for noise_scale, batch in expected.items():
        plan = plan_goodput(pairs, noise_scale=noise_scale, base_batch=1)
        assert plan.recommended_batch == batch, noise_scale
    # Without a measurable signal every sample counts alike: the fastest batch wins.
    assert plan_goodput(pairs, noise_scale=math.inf, base_batch=1).recommended_batch == 1024


def test_the_split_prefers_the_fastest_micro_batch_and_respects_limits() -> None:
    # A micro-batch of 24 is slower per sample than 16 (not a power of two, say).
    pairs = [(16, 1000.0), (24, 900.0), (48, 1100.0)]
    plan = plan_goodput(
        pairs, noise_scale=1e6, base_batch=16, batches=[48, 96], max_micro_batch=24, world_size=2
    )
    by_batch = {p.global_batch: p for p in plan.points}
    # 48 over 2 devices = 24 per device: 24 × 1 (900/s) beats 12 × 2 (extrapolated, slower).
    assert (by_batch[48].micro_batch, by_batch[48].accumulation_steps) == (24, 1)
    # 96 over 2 devices = 48 per device; 48 is above max_micro_batch: 16 × 3 at 1000/s.
    assert (by_batch[96].micro_batch, by_batch[96].accumulation_steps) == (16, 3)
    assert by_batch[96].samples_per_second == 2000.0  # two devices
    with pytest.raises(BadInputError, match="batches"):
        plan_goodput(pairs, noise_scale=10.0, base_batch=16, batches=[7], world_size=2)


@dataclass(frozen=True)
class _Point:
    batch: int
    samples_per_second: float
    seconds_per_step: float


class _Curve:
    """A throughput result of another module: points and samples_per_second_at."""

    def __init__(self) -> None:
        self.points = [_Point(b, 50.0 * b**0.5, b / (50.0 * b**0.5)) for b in (4, 16, 64)]

    def samples_per_second_at(self, batch: int) -> float:
        if batch > 64:
            raise BadInputError(f"batch: {batch} was not measured")
        return 50.0 * batch**0.5


def test_accepts_a_curve_object_and_rejects_bad_pairs() -> None:
    plan = plan_goodput(_Curve(), noise_scale=16.0, base_batch=4, max_batch=128)
    assert [p.global_batch for p in plan.points] == [4, 8, 16, 32, 64, 128]
    assert plan.points[-1].micro_batch == 64  # 128 = 64 × 2
    best = max(plan.points, key=lambda p: p.goodput)
    assert plan.recommended == best
    with pytest.raises(BadInputError, match="throughput"):
        plan_goodput([(8, -1.0)], noise_scale=1.0, base_batch=8)
    with pytest.raises(BadInputError, match="throughput"):
        plan_goodput("fast", noise_scale=1.0, base_batch=8)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="base_batch"):
        plan_goodput([(8, 1.0)], noise_scale=1.0, base_batch=0)


def test_interpolation_between_measured_batches_is_log_linear() -> None:
    plan = plan_goodput(
        [(16, 100.0), (64, 400.0)], noise_scale=1e9, base_batch=16, batches=[32], max_micro_batch=64
    )
    assert plan.points[0].samples_per_second == pytest.approx(200.0)


def test_plot_goodput_marks_the_recommendation() -> None:
    from batchpilot.plots.noise import plot_goodput

    plan = plan_goodput([(8, 100.0), (32, 300.0)], noise_scale=32.0, base_batch=8, max_batch=64)
    ax = plot_goodput(plan)
    assert ax.get_xlabel() == "global batch"
    assert any(str(plan.recommended_batch) in text.get_text() for text in ax.get_legend().texts)
