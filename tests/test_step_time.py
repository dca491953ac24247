from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.measure._step_time import (
    StepTimings,
    fit_step_time,
    machine_load,
    rounds_disagree,
    time_interleaved,
)

LADDER = (1, 2, 4, 8, 16, 32, 64, 128)


def linear(alpha: float, beta: float, batches: tuple[int, ...] = LADDER) -> dict[int, list[float]]:
    return {b: [alpha + beta * b] for b in batches}


# --- the fit -------------------------------------------------------------------------------------


def test_noiseless_line_is_recovered_exactly() -> None:
    model = fit_step_time(linear(0.02, 0.003))
    assert model.alpha_seconds == pytest.approx(0.02, rel=1e-12)
    assert model.beta_seconds_per_sample == pytest.approx(0.003, rel=1e-12)
    assert model.curvature_seconds_per_sample2 == 0.0
    assert model.rejected_batches == ()
    assert model.residual_scale == pytest.approx(0.0, abs=1e-12)
    assert not model.poor_fit and model.warning == ""
    # T(100) = 0.02 + 0.3 = 0.32 s: 312.5 samples/s
    assert model.samples_per_second_at(100) == pytest.approx(312.5, rel=1e-12)
    assert model.relative_uncertainty_at(100) == pytest.approx(0.0, abs=1e-9)


def test_theil_sen_and_outlier_floor_on_hand_computed_points() -> None:
    # pairwise slopes 0.1, 0.12, 0.1, 0.14, 0.1, 0.06: median 0.1; intercepts 0.2, 0.2, 0.24, 0.2
    model = fit_step_time({1: [0.3], 2: [0.4], 3: [0.54], 4: [0.6]})
    assert (model.alpha_seconds, model.beta_seconds_per_sample) == pytest.approx((0.2, 0.1))
    # 8 % off the line is under the 10 % floor: kept, and the RMS over 4 - 2 dof is 0.08 / sqrt 2
    assert model.rejected_batches == ()
    assert model.relative_residuals[3] == pytest.approx(0.08)
    assert model.residual_scale == pytest.approx(0.08 / math.sqrt(2))
    # 12 % off is rejected, and the other three lie on the line
    model = fit_step_time({1: [0.3], 2: [0.4], 3: [0.56], 4: [0.6]})
    assert model.rejected_batches == (3,)
    assert model.relative_residuals[3] == pytest.approx(0.12)
    assert model.residual_scale == pytest.approx(0.0, abs=1e-12)
    assert not model.poor_fit
    assert "micro-batches [3]" in model.warning


def test_medians_of_raw_samples_are_fitted() -> None:
    samples = {1: [0.3, 0.31, 9.0], 2: [0.4, 0.39, 0.4], 4: [0.6, 5.0, 0.6]}
    model = fit_step_time(samples)
    assert model.median_seconds == {1: 0.31, 2: 0.4, 4: 0.6}
    assert len(model.points) == 9 and (1, 9.0) in model.points


def test_an_outlier_twenty_times_too_fast_is_rejected() -> None:
    # The incident: micro-batch 4 timed at 1,987 samples/s between 11 at batch 2 and 102 at 8.
    alpha, beta = 0.1, 0.005
    noise = (1.02, 0.99, 1.0, 1.01, 0.98, 1.015, 0.99, 1.0)
    samples = {b: [(alpha + beta * b) * n] for b, n in zip(LADDER, noise, strict=True)}
    samples[4] = [(alpha + beta * 4) / 20]
    model = fit_step_time(samples)
    assert model.rejected_batches == (4,)
    assert model.relative_residuals[4] == pytest.approx(-0.95, abs=0.01)
    assert not model.poor_fit
    for b in LADDER:
        assert model.samples_per_second_at(b) == pytest.approx(b / (alpha + beta * b), rel=0.03)
    assert model.samples_per_second_at(4) == pytest.approx(33.3, rel=0.03)  # not 666
    speeds = [model.samples_per_second_at(b) for b in range(1, 257)]
    assert all(a < b for a, b in pairwise(speeds))


def test_curvature_only_when_the_data_need_it() -> None:
    curved = {b: [0.01 + 0.001 * b + 2e-5 * b * b] for b in LADDER}
    model = fit_step_time(curved)
    assert model.curvature_seconds_per_sample2 == pytest.approx(2e-5, rel=1e-9)
    assert model.alpha_seconds == pytest.approx(0.01, rel=1e-9)
    assert model.to_dict()["model"] == "quadratic"
    # the speed peaks at sqrt(alpha / curvature) = sqrt(500) ≈ 22.4
    assert model.samples_per_second_at(22) > model.samples_per_second_at(8)
    assert model.samples_per_second_at(22) > model.samples_per_second_at(64)

    rng = np.random.default_rng(0)
    noisy = {b: [(0.05 + 0.002 * b) * math.exp(rng.normal(0, 0.05))] for b in LADDER}
    model = fit_step_time(noisy)
    assert model.curvature_seconds_per_sample2 == 0.0
    assert model.to_dict()["model"] == "linear"


def test_falling_step_time_is_clamped_and_flagged() -> None:
    model = fit_step_time({1: [1.0], 2: [0.8], 4: [0.5], 8: [0.3]})
    assert model.beta_seconds_per_sample == 0.0
    assert model.alpha_seconds == pytest.approx(0.65)  # median step time
    assert model.poor_fit
    assert "slope clamped to 0" in model.warning


def test_noisy_timings_are_a_poor_fit() -> None:
    wobble = (1.3, 0.7, 1.3, 0.7, 1.3, 0.7, 1.3, 0.7)
    samples = {b: [(0.05 + 0.002 * b) * w] for b, w in zip(LADDER, wobble, strict=True)}
    model = fit_step_time(samples)
    assert model.poor_fit
    assert model.residual_scale > 0.15
    assert model.warning.startswith(f"residual scale {model.residual_scale:.0%} above 15%")


def test_two_batches_fit_any_line_and_are_flagged() -> None:
    model = fit_step_time({1: [0.3], 4: [0.6]})
    assert (model.alpha_seconds, model.beta_seconds_per_sample) == pytest.approx((0.2, 0.1))
    assert model.poor_fit
    assert "2 micro-batches for 2 parameters" in model.warning
    assert math.isnan(model.residual_scale)
    assert math.isnan(model.relative_uncertainty_at(2))


def test_uncertainty_follows_leverage() -> None:
    wobble = (1.02, 0.98, 1.02, 0.98, 1.02, 0.98, 1.02, 0.98)
    samples = {b: [(0.05 + 0.002 * b) * w] for b, w in zip(LADDER, wobble, strict=True)}
    model = fit_step_time(samples)
    scale, n = model.residual_scale, len(LADDER)
    assert 0.01 < scale < 0.05
    for b in LADDER:  # a measured point's leverage lies between 1/n and 1
        assert scale / math.sqrt(n) <= model.relative_uncertainty_at(b) <= scale
    # extrapolating far past the data is less certain than inside it
    assert model.relative_uncertainty_at(4096) > 2 * model.relative_uncertainty_at(16)


def test_to_dict_is_json_ready() -> None:
    model = fit_step_time(linear(0.02, 0.003))
    data = json.loads(json.dumps(model.to_dict()))
    assert data["model"] == "linear"
    assert data["alpha_seconds"] == pytest.approx(0.02)
    assert data["samples_per_second"]["128"] == pytest.approx(128 / (0.02 + 0.003 * 128))
    assert set(data["relative_uncertainty"]) == {str(b) for b in LADDER}


@settings(max_examples=60, deadline=None)
@given(
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(1e-6, 0.1),
    batches=st.lists(st.integers(1, 4096), min_size=2, max_size=10, unique=True),
)
def test_noiseless_lines_are_recovered_and_speed_rises(
    alpha: float, beta: float, batches: list[int]
) -> None:
    model = fit_step_time(linear(alpha, beta, tuple(batches)))
    for b in batches:
        assert model.seconds_per_step_at(b) == pytest.approx(alpha + beta * b, rel=1e-6)
    speeds = [model.samples_per_second_at(b) for b in (1, 2, 3, 10, 100, 1000, 10_000)]
    assert all(a <= b * (1 + 1e-12) for a, b in pairwise(speeds))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(1, 1000), st.floats(1e-4, 10.0), min_size=2, max_size=12))
def test_any_positive_timings_give_a_sensible_model(medians: dict[int, float]) -> None:
    model = fit_step_time({b: [t] for b, t in medians.items()})
    assert model.alpha_seconds >= 0 and model.beta_seconds_per_sample >= 0
    assert all(model.seconds_per_step_at(b) > 0 for b in medians)
    if model.curvature_seconds_per_sample2 == 0:
        speeds = [model.samples_per_second_at(b) for b in sorted(medians)]
        assert all(a <= b * (1 + 1e-12) for a, b in pairwise(speeds))


@pytest.mark.parametrize(
    ("samples", "kwargs", "message"),
    [
        ({1: [0.1]}, {}, "samples: expected seconds per step for 2+ micro-batches"),
        ({0: [0.1], 2: [0.2]}, {}, "samples: expected an integer ≥ 1, got 0"),
        ({1: [0.1], 2: []}, {}, "samples: expected positive seconds for micro-batch 2, got []"),
        ({1: [0.1], 2: [-0.2]}, {}, "micro-batch 2, got [-0.2]"),
        ({1: [0.1], 2: [math.nan]}, {}, "micro-batch 2, got [nan]"),
        ({1: [0.1], 2: 0.2}, {}, "micro-batch 2, got 0.2"),
        ({1: [0.1], 2: [0.2]}, {"outlier_z": 0}, "outlier_z: expected a positive finite number"),
        ({1: [0.1], 2: [0.2]}, {"poor_scale": -1}, "poor_scale: expected a positive"),
    ],
)
def test_bad_fit_inputs_name_the_argument(
    samples: object, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(BadInputError, match=re.escape(message)):
        fit_step_time(samples, **kwargs)  # type: ignore[arg-type]


def test_bad_batch_for_a_model() -> None:
    model = fit_step_time(linear(0.02, 0.003))
    with pytest.raises(BadInputError, match="batch: expected a positive finite number, got 0"):
        model.samples_per_second_at(0)
    with pytest.raises(BadInputError, match="batch: expected a positive finite number, got 'x'"):
        model.relative_uncertainty_at("x")  # type: ignore[arg-type]


# --- the interleaved timer -----------------------------------------------------------------------

# Step times on a fake clock, exact in binary: T(b) = 0.125 + 0.125 b.
STEP_SECONDS = {1: 0.25, 2: 0.375, 4: 0.625}


class FakeMachine:
    """A clock that only the fake steps advance; call number k runs ``load(k)`` times slower."""

    def __init__(self, load: Callable[[int], float] = lambda call: 1.0) -> None:
        self.now = 0.0
        self.events: list[object] = []
        self.load = load

    def clock(self) -> float:
        return self.now

    def sync(self) -> None:
        self.events.append("sync")

    def steps(self, seconds: dict[int, float]) -> dict[int, Callable[[], None]]:
        def step_at(batch: int) -> Callable[[], None]:
            def step() -> None:
                self.now += seconds[batch] * self.load(len(self.calls))
                self.events.append(batch)

            return step

        return {batch: step_at(batch) for batch in seconds}

    @property
    def calls(self) -> list[object]:
        return [event for event in self.events if event != "sync"]


def test_rounds_interleave_and_stop_when_stable() -> None:
    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps(STEP_SECONDS), clock=machine.clock, sync=machine.sync, seconds_per_round=0
    )
    assert timings.stopped == "stable" and timings.rounds == 3
    assert timings.samples() == {b: [s, s, s] for b, s in STEP_SECONDS.items()}
    assert timings.calls_per_block == {1: 1, 2: 1, 4: 1}
    assert timings.round_spread == 0.0
    # warm-up call and block-size probe per batch, then round r rotated by r places
    assert machine.calls == [*(1, 1, 2, 2, 4, 4), *(1, 2, 4), *(2, 4, 1), *(4, 1, 2)]
    # every block (3 probes, 9 timed) sits between two syncs; warm-up calls are not synced
    assert machine.events[:3] == [1, "sync", 1]
    assert machine.events.count("sync") == 2 * 12
    assert not rounds_disagree(timings)
    model = fit_step_time(timings)
    assert (model.alpha_seconds, model.beta_seconds_per_sample) == pytest.approx((0.125, 0.125))


def test_a_burst_of_load_hits_one_round_of_every_batch() -> None:
    # calls 0-5 are warm-up and probes; calls 9-11 (the second round) run 3x slower
    machine = FakeMachine(load=lambda call: 3.0 if 9 <= call <= 11 else 1.0)
    timings = time_interleaved(
        machine.steps(STEP_SECONDS), clock=machine.clock, seconds_per_round=0
    )
    assert timings.round_medians() == {b: [s, 3 * s, s, s, s] for b, s in STEP_SECONDS.items()}
    # relative IQR of [1, 3, 1] is 1 and of [1, 3, 1, 1] 0.5; [1, 3, 1, 1, 1] has none
    assert timings.stopped == "stable" and timings.rounds == 5
    assert rounds_disagree(timings)
    assert not rounds_disagree(timings, tolerance=2.5)
    model = fit_step_time(timings)  # medians over rounds ignore the burst
    assert (model.alpha_seconds, model.beta_seconds_per_sample) == pytest.approx((0.125, 0.125))

    machine = FakeMachine(load=lambda call: 3.0 if 9 <= call <= 11 else 1.0)
    timings = time_interleaved(
        machine.steps(STEP_SECONDS), clock=machine.clock, seconds_per_round=0, max_rounds=4
    )
    assert timings.stopped == "max_rounds" and timings.rounds == 4
    assert timings.round_spread == pytest.approx(0.5)


def test_deadline_stops_before_a_round_that_would_overrun() -> None:
    # warm-up and probes take 2.5 s, a round 1.25 s: round 2 ends at 5.0, round 3 would at 6.25
    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps(STEP_SECONDS), clock=machine.clock, seconds_per_round=0, deadline=5.5
    )
    assert timings.stopped == "deadline" and timings.rounds == 2
    assert machine.now == 5.0

    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps(STEP_SECONDS), clock=machine.clock, seconds_per_round=0, deadline=0.0
    )
    assert timings.stopped == "deadline" and timings.rounds == 1  # one round always


def test_short_steps_are_timed_in_blocks() -> None:
    # a 2**-10 s step: the block grows 1 -> 10 -> 100 calls until it lasts 0.05 s (a tenth of the
    # round); a round times blocks of 100 calls until 0.5 s are spent: 6 blocks (0.586 s)
    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps({8: 2**-10}), clock=machine.clock, seconds_per_round=0.5
    )
    assert timings.calls_per_block == {8: 100}
    assert [len(r) for r in timings.seconds[8]] == [6, 6, 6]
    assert set(timings.samples()[8]) == {2**-10}
    assert len(machine.calls) == 1 + 111 + 3 * 600

    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps({8: 2**-10}),
        clock=machine.clock,
        seconds_per_round=0.5,
        max_calls_per_round=300,
    )
    assert [len(r) for r in timings.seconds[8]] == [3, 3, 3]


def test_steps_that_take_no_time_still_end() -> None:
    machine = FakeMachine()
    timings = time_interleaved(
        machine.steps({1: 0.0, 2: 0.0}), clock=machine.clock, max_calls_per_round=50
    )
    assert timings.calls_per_block == {1: 50, 2: 50}
    assert timings.stopped == "stable" and timings.samples()[1] == [0.0, 0.0, 0.0]
    assert not rounds_disagree(timings)
    with pytest.raises(BadInputError, match="micro-batch 1, got"):
        fit_step_time(timings)


def test_timings_to_dict() -> None:
    timings = StepTimings({1: ((0.5,), (0.5, 0.25))}, {1: 1}, "max_rounds", 0.1)
    data = json.loads(json.dumps(timings.to_dict()))
    assert data == {
        "seconds": {"1": [[0.5], [0.5, 0.25]]},
        "calls_per_block": {"1": 1},
        "stopped": "max_rounds",
        "round_spread": 0.1,
        "rounds": 2,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": {}}, "steps: expected a mapping micro-batch → step function, got {}"),
        ({"steps": {0: lambda: None}}, "steps: expected an integer ≥ 1, got 0"),
        ({"steps": {2: "step"}}, "steps: expected a callable for micro-batch 2, got 'step'"),
        ({"warmup": -1}, "warmup: expected an integer ≥ 0, got -1"),
        ({"min_rounds": 0}, "min_rounds: expected an integer ≥ 1, got 0"),
        ({"max_rounds": 2}, "max_rounds: expected an integer ≥ 3, got 2"),
        ({"max_calls_per_round": True}, "max_calls_per_round: expected an integer ≥ 1, got True"),
        ({"seconds_per_round": -1.0}, "seconds_per_round: expected a non-negative"),
        ({"stability": math.nan}, "stability: expected a non-negative finite number, got nan"),
        ({"deadline": "soon"}, "deadline: expected a finite clock() value, got 'soon'"),
    ],
)
def test_bad_timer_inputs_name_the_argument(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"steps": {1: lambda: None}, **kwargs}
    with pytest.raises(BadInputError, match=re.escape(message)):
        time_interleaved(**arguments)  # type: ignore[arg-type]


# --- the machine ---------------------------------------------------------------------------------


def test_machine_load(monkeypatch: pytest.MonkeyPatch) -> None:
    load = machine_load()
    assert load.cores == (os.cpu_count() or 1)
    assert load.overloaded == (load.load_1min > load.cores)

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert machine_load() == (9.0, 2) and machine_load().overloaded

    def no_load_average() -> tuple[float, float, float]:
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert math.isnan(machine_load().load_1min) and not machine_load().overloaded


def test_jitter_that_differs_between_batches_is_not_load() -> None:
    # each batch has one slow round, but a different one: no round is slow for every batch
    rounds = {
        1: ((1.0,), (1.3,), (1.0,), (1.0,)),
        2: ((1.0,), (1.0,), (1.3,), (1.0,)),
        4: ((1.0,), (1.0,), (1.0,), (1.3,)),
        8: ((1.3,), (1.0,), (1.0,), (1.0,)),
    }
    jitter = StepTimings(rounds, {b: 1 for b in rounds}, "max_rounds", 0.3)
    assert not rounds_disagree(jitter)
    # the same 30 % slowdown hitting every batch in round 2: load
    loaded = StepTimings(
        {b: ((1.0,), (1.3,), (1.0,), (1.0,)) for b in rounds},
        {b: 1 for b in rounds},
        "max_rounds",
        0.3,
    )
    assert rounds_disagree(loaded)
