from __future__ import annotations

import math
from pathlib import Path

import pytest

from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.sweep import Budget, LrPlan
from batchpilot.sweep.budgets import first_crossing, interpolate, objective_mode

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"


def test_equal_epochs_and_equal_samples_give_the_same_samples_to_every_batch() -> None:
    epochs = Budget.equal_epochs(3)
    assert epochs.kind == "epochs"
    assert epochs.samples_for(train_size=1437) == 4311
    # 4311 samples: 135 steps at 32 (4320 samples), 34 at 128 (4352): rounded up, never short.
    assert [epochs.steps_for(b, train_size=1437) for b in (32, 128, 8192)] == [135, 34, 1]
    samples = Budget.equal_samples(10_000)
    assert samples.kind == "samples"
    assert samples.steps_for(1000, train_size=50) == 10


def test_evaluations_are_spread_over_the_run() -> None:
    budget = Budget.equal_epochs(1, evals=10)
    assert budget.eval_every(200) == 20
    assert budget.eval_every(3) == 1  # fewer steps than evaluations: every step


def test_until_target_caps_the_run() -> None:
    budget = Budget.until_target(loss=0.3)
    assert budget.kind == "target" and budget.epochs == 10.0 and budget.target_loss == 0.3
    assert Budget.from_dict(budget.to_dict()) == budget


def test_budget_rejects_bad_settings() -> None:
    with pytest.raises(BadInputError, match=r"^epochs: give exactly one of epochs and samples"):
        Budget(epochs=1, samples=10)
    with pytest.raises(BadInputError, match=r"^target_loss: give either"):
        Budget(epochs=1, target_loss=0.1, target_metric=0.9)
    with pytest.raises(BadInputError, match=r"^budget_epochs: expected a positive number, got -1"):
        Budget(epochs=-1)
    with pytest.raises(BadInputError, match=r"^evals: expected a positive integer, got 0"):
        Budget(epochs=1, evals=0)
    with pytest.raises(BadInputError, match=r"^target_loss: expected a finite number"):
        Budget(epochs=1, target_loss=math.nan)
    with pytest.raises(BadInputError, match=r"^target_loss: give a target"):
        Budget.until_target()


def test_first_crossing_interpolates_between_validation_points() -> None:
    assert first_crossing([1.0, 0.8, 0.4], 0.6, mode="min") == 1.5
    assert first_crossing([0.5, 0.7, 0.9], 0.8, mode="max") == pytest.approx(1.5)
    assert first_crossing([0.2, 0.1], 0.5, mode="min") == 0.0  # there from the start
    assert first_crossing([1.0, 0.9], 0.5, mode="min") is None
    # A missing point (a diverged evaluation) breaks the line: no interpolation across it.
    assert first_crossing([1.0, None, 0.4], 0.6, mode="min") == 2.0
    assert interpolate(1.5, [0, 100, 300]) == 200.0
    assert interpolate(2.0, [0, 100, 300]) == 300.0


def test_objective_directions() -> None:
    assert objective_mode("val_metric", metric_mode="min") == "min"
    assert objective_mode("val_metric", metric_mode="max") == "max"
    assert objective_mode("val_loss", metric_mode="max") == "min"
    assert objective_mode("seconds_to_target", metric_mode="max") == "min"
    with pytest.raises(BadInputError, match=r"^objective: unknown objective 'accuracy'"):
        objective_mode("accuracy", metric_mode="max")


def test_lr_plan_rescales_the_reference_by_rule() -> None:
    task = load_task(TASK)  # reference: batch 16, lr 0.2
    linear = LrPlan().with_reference(task)
    assert (linear.ref_batch, linear.ref_lr) == (16, 0.2)
    assert linear.base_lr(64) == pytest.approx(0.8)
    assert LrPlan(rule="sqrt").with_reference(task).base_lr(64) == pytest.approx(0.4)
    assert LrPlan(rule="adam").with_reference(task).base_lr(4) == pytest.approx(0.1)
    assert LrPlan(rule="none").with_reference(task).base_lr(256) == pytest.approx(0.2)
    # A summed loss already grows with the batch: the linear rule keeps the lr.
    assert linear.base_lr(64, reduction="sum") == pytest.approx(0.2)
    explicit = LrPlan(ref_batch=32, ref_lr=0.1).with_reference(task)
    assert explicit.base_lr(64) == pytest.approx(0.2)


def test_lr_plan_grid_and_errors() -> None:
    grid = LrPlan.grid((0.5, 1, 2))
    assert grid.rule == "sqrt" and grid.factors == (0.5, 1.0, 2.0)
    assert LrPlan.from_dict(grid.to_dict()) == grid
    task = load_task(TASK)
    no_reference = type(task)(**{**task.__dict__, "reference_batch": None, "reference_lr": None})
    with pytest.raises(BadInputError, match=r"^ref_batch: the linear rule rescales a reference"):
        LrPlan().with_reference(no_reference)
    assert LrPlan(rule="range-test").with_reference(no_reference).ref_batch is None
    with pytest.raises(BadInputError, match=r"^lr_rule: unknown rule 'cubic'"):
        LrPlan(rule="cubic")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"^lr_grid: expected a positive number, got -1"):
        LrPlan(factors=(1.0, -1.0))
    with pytest.raises(BadInputError, match=r"^lr_rule: the range-test lr is measured"):
        LrPlan(rule="range-test").base_lr(64)
