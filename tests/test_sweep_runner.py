from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.sweep import (
    Budget,
    Grid,
    Ladder,
    LrPlan,
    TrialStore,
    load_sweep,
    objective_score,
    run_sweep,
)

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"
BUDGET = Budget.equal_epochs(2, evals=4, target_loss=0.4)


def test_ladder_sweep_follows_the_measured_scores(tmp_path: Path) -> None:
    seen: list[tuple[str, bool]] = []
    rng = torch.get_rng_state()
    result = run_sweep(
        TASK,
        budget=BUDGET,
        strategy=Ladder(start=32),
        objective="val_loss",
        store=tmp_path / "s.sqlite",
        on_trial=lambda trial, reused: seen.append((trial.key, reused)),
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert [key for key, _ in seen][:3] == ["b32-lr1", "b16-lr1", "b64-lr1"]
    assert not any(reused for _, reused in seen)
    # Replaying the ladder on the measured scores visits the same batches, in the same order.
    scores = {t.batch: objective_score(t, "val_loss", metric_mode="max") for t in result.trials}
    assert [int(key[1:].split("-")[0]) for key, _ in seen] == _replay(Ladder(start=32), scores)
    best = min(result.trials, key=lambda t: t.val_loss or 1e9)
    assert result.best_batch == best.batch
    assert result.analysis.steps_fit is not None  # every batch reached the target
    data = result.to_dict()
    assert {"trials", "best", "fit", "sweep"} <= set(data)
    assert data["sweep"]["ran"] == len(result.trials) and data["sweep"]["reused"] == 0
    assert data["best"]["val_loss"]["batch"] == best.batch


def _replay(ladder: Ladder, scores: dict[int, float]) -> list[int]:
    order: list[int] = []
    known: dict[int, float] = {}
    while batches := ladder.next_batches(known):
        for batch in batches:
            known[batch] = scores[batch]
            order.append(batch)
    return order


def test_a_stored_sweep_is_resumed_not_rerun(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    first = run_sweep(TASK, budget=BUDGET, strategy=Grid((16, 64)), store=store)
    with pytest.raises(BadInputError, match=r"^resume: the store .* already holds sweep"):
        run_sweep(TASK, budget=BUDGET, strategy=Grid((16, 64)), store=store)
    again = run_sweep(TASK, budget=BUDGET, strategy=Grid((16, 64)), store=store, resume=True)
    assert (again.ran, again.reused) == (0, 2)
    assert json.dumps([t.to_dict() for t in again.trials]) == json.dumps(
        [t.to_dict() for t in first.trials]
    )
    # A grid that grows reuses what it has and runs only the new batch.
    wider = run_sweep(
        TASK, budget=BUDGET, strategy=Grid((16, 64, 128)), store=store, name=first.name + "-w"
    )
    assert wider.ran == 3  # another name: another sweep
    with pytest.raises(BadInputError, match=r"^name: the store already holds a sweep .*strategy"):
        run_sweep(TASK, budget=BUDGET, strategy=Grid((16,)), store=store, name=first.name)
    shown = load_sweep(store, first.name)
    assert [t.key for t in shown.trials] == ["b16-lr1", "b64-lr1"]
    assert shown.best_batch == first.best_batch


def test_lr_grid_measures_the_lr_exponent() -> None:
    result = run_sweep(
        TASK,
        budget=Budget.equal_epochs(2, evals=2),
        strategy=Grid((16, 32, 64)),
        lr=LrPlan.grid((0.5, 1.0, 2.0)),
        objective="val_loss",
    )
    assert len(result.trials) == 9
    assert {t.lr_factor for t in result.trials} == {0.5, 1.0, 2.0}
    fit = result.analysis.lr_fit
    assert fit is not None and fit.tuned
    for batch, lr in result.analysis.best_lr.items():
        at_batch = [t for t in result.trials if t.batch == batch]
        assert lr == min(at_batch, key=lambda t: t.val_loss or 1e9).lr


def test_sweep_with_range_test_and_accumulation(monkeypatch: pytest.MonkeyPatch) -> None:
    found: list[int] = []

    def find_lr(task: Any, *, micro_batch: int, accumulation_steps: int, seed: int, device: Any):
        found.append(micro_batch * accumulation_steps)
        return types.SimpleNamespace(suggestion=0.01 * micro_batch * accumulation_steps)

    monkeypatch.setattr("batchpilot.sweep.trials.find_lr", find_lr)
    result = run_sweep(
        TASK,
        budget=Budget.equal_epochs(1, evals=2),
        strategy=Grid((16, 64)),
        lr=LrPlan(rule="range-test"),
        max_micro_batch=32,
    )
    assert sorted(found) == [16, 64]
    by_batch = {t.batch: t for t in result.trials}
    assert by_batch[64].lr == pytest.approx(0.64)
    assert (by_batch[64].micro_batch, by_batch[64].accumulation_steps) == (32, 2)
    assert (by_batch[16].micro_batch, by_batch[16].accumulation_steps) == (16, 1)


def test_sweep_checks_its_settings() -> None:
    task = load_task(TASK)
    with pytest.raises(BadInputError, match=r"^objective: 'steps_to_target' needs a target"):
        run_sweep(task, budget=Budget.equal_epochs(1), objective="steps_to_target")
    with pytest.raises(BadInputError, match=r"^start: 512 is larger than the training set"):
        run_sweep(task, budget=Budget.equal_epochs(1), strategy=Ladder(start=512))
    with pytest.raises(BadInputError, match=r"^task: the pool executor loads the task"):
        run_sweep(task, budget=Budget.equal_epochs(1), executor="pool")
    no_val = type(task)(**{**task.__dict__, "val_data": None})
    with pytest.raises(BadInputError, match=r"^task: a sweep compares validation results"):
        run_sweep(no_val, budget=Budget.equal_epochs(1))
    no_metric = type(task)(**{**task.__dict__, "metric": None})
    with pytest.raises(BadInputError, match=r"^objective: 'val_metric' needs a task with a metric"):
        run_sweep(no_metric, budget=Budget.equal_epochs(1), objective="val_metric")


def test_a_task_object_runs_in_process_and_default_objective_is_the_metric() -> None:
    result = run_sweep(
        load_task(TASK), budget=Budget.equal_epochs(1, evals=2), strategy=Grid((32,))
    )
    assert result.config["task"] is None and result.analysis.objective == "val_metric"
    assert result.store is None


def test_store_object_is_left_open(tmp_path: Path) -> None:
    with TrialStore(tmp_path / "s.sqlite") as store:
        run_sweep(TASK, budget=Budget.equal_epochs(1, evals=2), strategy=Grid((32,)), store=store)
        assert len(store.sweeps()) == 1 and store.sweeps()[0].finished_trials == 1
