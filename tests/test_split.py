from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.plan import plan_accumulation, plan_goodput, split_batch
from batchpilot.training import BatchLimits, BatchSetting, resplit, split_for


class Peaked:
    """Fastest at micro-batch 40; 50 within 1 % of it."""

    speeds: ClassVar[dict[int, float]] = {40: 1000.0, 50: 995.0, 25: 700.0}

    def samples_per_second_at(self, batch: int) -> float:
        return self.speeds.get(batch, 100.0 * batch**0.5)


def test_every_splitter_agrees_on_the_same_batch() -> None:
    # the six splitters of old gave 256 over ≤ 100 as 64×4, 86×3 (= 258) and 85×3 (= 255)
    exact = split_batch(256, max_micro_batch=100)
    assert (exact.micro_batch, exact.accumulation_steps) == (64, 4)
    assert plan_accumulation(256, max_micro_batch=100).micro_batch == 64
    assert resplit(BatchSetting(256, 0.1, 256, 1, 1, 1.0), max_micro_batch=100).micro_batch == 64
    # schedules ask for the inexact form: fewest steps, rounded down, never above the batch
    assert split_for(256, BatchLimits(max_micro_batch=100)) == (85, 3)
    assert split_batch(256, max_micro_batch=100, exact=False).global_batch == 255
    point = plan_goodput(
        [(64, 640.0), (100, 1000.0)], noise_scale=1e9, base_batch=64, batches=[256]
    )
    assert point.recommended.micro_batch == 64  # 100 does not divide 256


def test_speed_ties_go_to_fewer_accumulation_steps() -> None:
    split = split_batch(1000, max_micro_batch=64, speed=Peaked())
    assert split.micro_batch == 50  # 995 is within 2 % of 1000 at 40: 20 steps, not 25
    strict = split_batch(1000, max_micro_batch=64, speed=Peaked(), speed_tie=0.0)
    assert strict.micro_batch == 40


@given(st.integers(1, 1 << 14), st.integers(1, 2048), st.sampled_from([1, 2, 4, 8]))
def test_exact_splits_are_exact_and_fit(global_batch: int, max_micro: int, world: int) -> None:
    global_batch *= world
    split = split_batch(global_batch, max_micro_batch=max_micro, world_size=world)
    assert split.global_batch == global_batch and split.micro_batch <= max_micro
    per_device = global_batch // world
    # no larger micro-batch ≤ the limit divides the per-device batch
    assert not any(
        per_device % m == 0 for m in range(split.micro_batch + 1, min(max_micro, per_device) + 1)
    )


def test_errors_name_the_argument() -> None:
    with pytest.raises(BadInputError, match="global_batch: expected a positive integer, got 0"):
        split_batch(0)
    with pytest.raises(BadInputError, match="multiple: expected a positive integer, got 0"):
        split_batch(8, multiple=0, exact=False)
