from __future__ import annotations

import pytest

from batchpilot.errors import BadInputError
from batchpilot.measure._throughput import ThroughputCurve, ThroughputPoint
from batchpilot.plan._accumulation import plan_accumulation


def curve(*points: tuple[int, float]) -> ThroughputCurve:
    measured = tuple(ThroughputPoint(b, s, b / s) for b, s in points)
    return ThroughputCurve(measured, 0, 0, 0.9, (), "cpu", 0, 1, None, 0.0)


# Fastest at 32; 64 (what fits) is slower, as past a cache or workspace limit.
PEAKED = curve((8, 1000.0), (16, 1800.0), (32, 2600.0), (64, 2000.0))


def test_fastest_micro_batch_wins_over_the_largest() -> None:
    plan = plan_accumulation(512, max_micro_batch=64, curve=PEAKED)
    assert (plan.micro_batch, plan.accumulation_steps, plan.global_batch) == (32, 16, 512)
    assert plan.exact
    assert plan.samples_per_second == pytest.approx(2600.0)
    assert plan.largest_micro_batch_samples_per_second == pytest.approx(2000.0)
    assert plan.seconds_per_optimizer_step == pytest.approx(512 / 2600)
    assert "+30%" in plan.reason


def test_without_a_curve_the_largest_split_is_taken() -> None:
    plan = plan_accumulation(1024, max_micro_batch=48)
    assert (plan.micro_batch, plan.accumulation_steps) == (32, 32)
    assert plan.samples_per_second is None


def test_a_batch_that_fits_needs_no_accumulation_unless_smaller_is_faster() -> None:
    flat = curve((8, 1000.0), (64, 3000.0))
    assert plan_accumulation(64, max_micro_batch=64, curve=flat).accumulation_steps == 1
    assert plan_accumulation(64, max_micro_batch=64, curve=PEAKED).micro_batch == 32


def test_equal_speeds_prefer_fewer_accumulation_steps() -> None:
    plateau = curve((8, 1000.0), (16, 2000.0), (32, 2010.0), (64, 2020.0))
    plan = plan_accumulation(256, max_micro_batch=64, curve=plateau)
    assert (plan.micro_batch, plan.accumulation_steps) == (64, 4)


def test_world_size_divides_the_global_batch() -> None:
    plan = plan_accumulation(1024, max_micro_batch=64, curve=PEAKED, world_size=4)
    assert (plan.micro_batch, plan.accumulation_steps, plan.world_size) == (32, 8, 4)
    assert plan.samples_per_second == pytest.approx(4 * 2600.0)
    with pytest.raises(BadInputError, match="global_batch: 1000 is not a multiple of world_size 3"):
        plan_accumulation(1000, max_micro_batch=64, world_size=3)


def test_nearest_when_inexact_is_allowed() -> None:
    # 1000 = 2³·5³: exactly, the divisors near the peak are 40 (faster on the curve) and 50;
    # inexact, the shared rule takes the fewest steps and rounds down: 62 × 16 = 992.
    exact = plan_accumulation(1000, max_micro_batch=64, curve=PEAKED)
    assert (exact.micro_batch, exact.accumulation_steps) == (40, 25)
    near = plan_accumulation(1000, max_micro_batch=64, curve=PEAKED, exact=False)
    assert (near.micro_batch, near.accumulation_steps, near.exact) == (62, 16, False)
    assert near.global_batch == 992
    assert near.to_dict()["global_batch"] == near.global_batch


def test_prime_targets_fall_back_to_micro_batch_one_exactly() -> None:
    plan = plan_accumulation(1009, max_micro_batch=64, curve=PEAKED)
    assert (plan.micro_batch, plan.accumulation_steps) == (1, 1009)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_batch": 0, "max_micro_batch": 8}, "global_batch: expected a positive integer"),
        ({"global_batch": 8, "max_micro_batch": -1}, "max_micro_batch: expected a positive"),
        ({"global_batch": 8, "max_micro_batch": 8, "world_size": 0}, "world_size: expected"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        plan_accumulation(**kwargs)  # type: ignore[arg-type]
