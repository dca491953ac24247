"""Issue-13 guarantees of ``tune``: decisions by a stated rule under uncertainty, a time budget
that binds every phase, partial results when a phase fails, and a fixed thread count."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchpilot.tune as tune_module
from batchpilot.cli import main
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.measure import choose_threads, fixed_threads, measure_throughput
from batchpilot.plan import plan_goodput
from batchpilot.task import Task
from batchpilot.training._loop import evaluation_seconds, progress_evaluations, train
from batchpilot.tune import TuneIncomplete, TuneOptions, tune


class _Noisy:
    """A throughput curve that states its uncertainty, as the fitted one does."""

    def __init__(self, speeds: dict[int, float], uncertainty: float) -> None:
        self.speeds, self.uncertainty = speeds, uncertainty
        self.points = [(b, s) for b, s in speeds.items()]

    def samples_per_second_at(self, batch: int) -> float:
        return self.speeds.get(batch, 1.0)  # other divisors: far too slow to matter

    def relative_uncertainty_at(self, batch: int) -> float:
        return self.uncertainty


def test_goodput_ties_go_to_fewer_steps_and_outside_the_noise_the_best_wins() -> None:
    # at B_noise = 64, B0 = 2: goodput 2 ≈ 1.00 × speed, 256 ≈ 0.26 × speed; speeds make them tie
    efficiency = (64 + 2) / (64 + 256)  # E(256) relative to B0 = 2
    speeds = {2: 100.0, 256: 100.0 / efficiency * 0.97}  # 3 % less goodput, 5 % uncertainty
    noisy = plan_goodput(
        _Noisy(speeds, 0.05), noise_scale=64.0, base_batch=2, batches=[2, 256], max_steps_ratio=None
    )
    assert noisy.best_goodput_batch == 2 and noisy.recommended_batch == 256
    assert set(noisy.tied) == {2, 256} and "fewer steps" in noisy.rule
    exact = plan_goodput(
        _Noisy(speeds, 0.0), noise_scale=64.0, base_batch=2, batches=[2, 256], max_steps_ratio=None
    )
    assert exact.recommended_batch == 2 and exact.tied == (2,)


def test_the_steps_cap_excludes_batches_that_need_ten_times_the_steps() -> None:
    speeds = {4: 2000.0, 64: 2100.0, 256: 2200.0}  # batch 4 faster per sample than it deserves
    plan = plan_goodput(_Noisy(speeds, 0.0), noise_scale=400.0, base_batch=4, batches=[4, 64, 256])
    # S(4)/S_min = 1 + 400/4 = 101: never chosen although its goodput is the highest
    assert 4 in plan.excluded and plan.recommended_batch == 64 and not plan.capped_by_memory
    forced = plan_goodput(_Noisy(speeds, 0.0), noise_scale=1e5, base_batch=4, batches=[4, 64, 256])
    assert forced.capped_by_memory and forced.recommended_batch == 256


def _slow_task(sleep_seconds: float) -> Task:
    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(sleep_seconds)
            return self.linear(x)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    return Task(
        model=Slow,
        train_data=TensorDataset(x, y),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        reference_lr=0.1,
        name="slow",
    )


def test_throughput_respects_its_budget_and_the_step_cap() -> None:
    task = _slow_task(0.02)
    started = time.perf_counter()
    curve = measure_throughput(task, max_batch=512, time_budget_seconds=1.5, max_step_seconds=0.25)
    # the round under way when the deadline comes is finished (≈ 10 batches × 3 steps of 20 ms)
    assert time.perf_counter() - started < 1.5 + 1.5
    assert curve.timings is not None and curve.timings.stopped in (
        "deadline",
        "stable",
        "max_rounds",
    )
    assert len(curve.points) >= 2


@pytest.mark.slow
def test_tune_total_stays_within_ten_percent_of_the_budget() -> None:
    task = _slow_task(0.01)  # every forward ≥ 10 ms whatever the batch
    budget = 12.0
    result = tune(task, TuneOptions(time_budget_seconds=budget, lr_steps=100, noise_steps=200))
    assert result.phase_seconds["total"] <= 1.1 * budget
    assert result.noise is not None and result.lr_find is not None
    shrunk = result.noise.steps < 200 or len(result.lr_find.runs) * result.lr_find.steps < 300
    assert shrunk  # the defaults do not fit 12 s at ≥ 10 ms per forward pass
    assert result.conditions is not None and result.conditions.threads >= 1


def _slow_evaluation_task(sleep_seconds: float) -> Task:
    """Training steps are fast; every forward in eval mode (the progress signal) is slow."""

    class SlowToEvaluate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                time.sleep(sleep_seconds)
            return self.linear(x)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, generator=generator)
    y = (x[:, 0] + 0.5 * torch.randn(1024, generator=generator) > 0).long()
    return Task(
        model=SlowToEvaluate,
        train_data=TensorDataset(x[:768], y[:768]),
        val_data=TensorDataset(x[768:], y[768:]),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        reference_lr=0.1,
        name="slow-to-evaluate",
    )


def test_the_lr_check_counts_its_evaluations_against_the_budget() -> None:
    # 50 ms per evaluation: ~30 progress points in 50 steps cost ~1.5 s a run, ten times its
    # steps; sized by the steps alone, the check's first three lrs overran its share
    task = _slow_evaluation_task(0.05)
    budget = 20.0
    result = tune(task, TuneOptions(time_budget_seconds=budget))
    assert result.phase_seconds["total"] <= 1.1 * budget
    assert result.lr_check is not None
    assert any(note.startswith("lr check:") and "time budget" in note for note in result.notes)


def test_a_run_evaluates_its_progress_as_often_as_planned() -> None:
    task = _slow_evaluation_task(0.0)
    for steps in (7, 10, 11, 64, 150):
        run = train(task, micro_batch=32, lr=0.1, steps=steps, progress=True)
        assert len(run.progress) == progress_evaluations(steps)
    before = torch.get_rng_state()
    progress_eval = evaluation_seconds(task)
    assert torch.equal(before, torch.get_rng_state())
    assert progress_eval > 0


@pytest.mark.slow
def test_a_failing_phase_still_writes_what_was_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise BadInputError("lr: the range test found no descent")

    monkeypatch.setattr(tune_module, "find_lr", broken)
    with pytest.raises(SystemExit) as info:
        main(["tune", "--example", "xor4", "--out", str(tmp_path), "--time-budget", "20"])
    assert info.value.code == 2
    _, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].endswith("the range test found no descent")
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["incomplete"] and data["failed_phase"] == "lr range test"
    assert data["memory"]["max_micro_batch"] >= 1 and data["throughput"]["points"]
    assert "lr range test" in (tmp_path / "report.html").read_text()
    with pytest.raises(TuneIncomplete) as raised:
        tune(load_task(example="xor4"), TuneOptions(time_budget_seconds=20))
    assert raised.value.phase == "lr range test" and "memory" in raised.value.partial


def test_out_that_is_a_file_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "taken"
    target.write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(["tune", "--example", "xor4", "--out", str(target)])
    assert info.value.code == 2 and target.read_text() == "mine"
    assert "--out:" in capsys.readouterr().err


def test_threads_are_fixed_during_measurement_and_restored() -> None:
    before = torch.get_num_threads()
    conditions = choose_threads(torch.device("cpu"), threads=1)
    assert conditions.threads == 1 and conditions.reason.startswith("as asked")
    with fixed_threads(conditions.threads):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    auto = choose_threads(torch.device("cpu"))
    assert 1 <= auto.threads <= max(1, before)
    assert math.isnan(auto.load_1min) or auto.load_1min >= 0
    with pytest.raises(BadInputError, match="threads: expected a positive integer, got 0"):
        TuneOptions(threads=0)
    assert replace(TuneOptions(), threads=2).threads == 2


@pytest.mark.slow
def test_on_a_cpu_the_ladder_stops_where_a_step_gets_slow() -> None:
    task = load_task("benchmarks/tasks/large_regression.py:task")  # 24,000 samples
    curve = measure_throughput(
        task, max_batch=task.train_size, stop_when_flat=True, max_step_seconds=0.01, timed_steps=2
    )
    top = max(p.batch for p in curve.points)
    # a step at the dataset size takes tens of ms here: the 10 ms cap ends the ladder before it
    assert top < task.train_size
    assert any("larger batches were not" in w for w in curve.warnings)


@pytest.mark.slow
def test_a_reference_batch_that_cannot_be_used_is_lowered_with_a_note() -> None:
    result = tune(
        load_task(example="xor4"),
        TuneOptions(reference_batch=1_000_000, lr_steps=20, lr_repeats=1, noise_steps=20),
    )
    assert result.recommendation.reference_batch == 8  # half the 16-sample training set
    assert any("Reference batch 1000000" in n and "lowered to 8" in n for n in result.notes)


def test_a_task_too_small_to_tune_is_refused_naming_it() -> None:
    x = torch.randn(1, 4)
    tiny = Task(
        model=lambda: nn.Linear(4, 2),
        train_data=TensorDataset(x, torch.zeros(1, dtype=torch.long)),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )
    with pytest.raises(
        BadInputError,
        match=r"task: tune needs at least 4 training samples .*got 1",
    ):
        tune(tiny)
