from __future__ import annotations

import math
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from batchpilot.loading import load_task
from batchpilot.sweep import TrialResult, TrialSpec, run_trial
from batchpilot.sweep.trials import _training_seconds, _with_adam_scaling
from batchpilot.training._loop import train

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"


@pytest.fixture(scope="module")
def task():
    return load_task(TASK)


def spec(**fields: Any) -> TrialSpec:
    base: dict[str, Any] = {
        "key": "b32-lr1",
        "batch": 32,
        "micro_batch": 32,
        "accumulation_steps": 1,
        "lr_rule": "linear",
        "lr_factor": 1.0,
        "ref_batch": 16,
        "ref_lr": 0.2,
        "steps": 16,
        "eval_every": 4,
        "target_loss": 0.5,
    }
    return TrialSpec(**{**base, **fields})


def test_trial_trains_like_train_and_records_its_curve(task) -> None:
    rng = torch.get_rng_state()
    result = run_trial(task, spec())
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    reference = train(task, micro_batch=32, lr=0.4, steps=16, eval_every=4, seed=0)
    assert result.status == "done" and result.ok
    assert result.lr == pytest.approx(0.4)  # linear rule: 0.2 × 32 / 16
    assert [p.step for p in result.curve] == [0, 4, 8, 12, 16]
    assert [p.samples for p in result.curve] == [0, 128, 256, 384, 512]
    assert [p.val_loss for p in result.curve[1:]] == [e.loss for _, e in reference.evaluations]
    assert result.val_loss == reference.final.loss if reference.final else False
    # Step 0 is the initial model, drawn from the same seed as train's: ln 2 for 2 classes.
    assert result.curve[0].val_loss == pytest.approx(math.log(2), abs=0.1)
    assert math.isnan(result.curve[0].train_loss)
    # The gap is validation loss minus the mean training loss since the previous point.
    window = reference.train_losses[12:16]
    assert result.train_loss == pytest.approx(sum(window) / 4)
    assert result.generalization_gap == pytest.approx(result.val_loss - result.train_loss)
    seconds = [p.seconds for p in result.curve]
    assert seconds == sorted(seconds) and result.seconds == seconds[-1]


def test_target_is_read_at_the_interpolated_crossing(task) -> None:
    result = run_trial(task, spec())
    losses = [p.val_loss for p in result.curve]
    i = next(i for i, loss in enumerate(losses) if loss <= 0.5)
    assert i > 0
    fraction = (0.5 - losses[i - 1]) / (losses[i] - losses[i - 1])
    steps = result.curve[i - 1].step + fraction * (result.curve[i].step - result.curve[i - 1].step)
    assert result.steps_to_target == pytest.approx(steps)
    assert result.samples_to_target == pytest.approx(steps * 32)
    assert result.seconds_to_target is not None and result.seconds_to_target <= result.seconds
    never = run_trial(task, spec(target_loss=0.001))
    assert never.steps_to_target is None and never.seconds_to_target is None


def test_validation_time_is_taken_out_of_training_seconds() -> None:
    # Steps take 1 s; the validations after steps 2 and 4 add 10 s to the step after them;
    # the first interval also holds building the model (5 s more).
    stamps = [0.0, 6.0, 7.0, 18.0, 19.0, 30.0, 31.0]
    assert _training_seconds(stamps, {2, 4, 6}) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_trial_failures_become_failed_results(task) -> None:
    too_big = run_trial(task, spec(key="b512-lr1", batch=512, micro_batch=512))
    assert too_big.status == "failed" and not too_big.ok
    assert too_big.error is not None and too_big.error.startswith("micro_batch: 512 is larger")
    assert too_big.curve == () and too_big.val_loss is None
    round_trip = TrialResult.from_dict(too_big.to_dict())
    assert round_trip == too_big


def test_adam_rule_rescales_betas_and_eps(task) -> None:
    adam_task = replace(task, optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr))
    wrapped = _with_adam_scaling(adam_task, spec(lr_rule="adam", batch=32))
    optimizer = wrapped.optimizer([torch.nn.Parameter(torch.zeros(1))], 0.01)
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    assert beta1 == pytest.approx(0.8) and beta2 == pytest.approx(0.998)  # κ = 2
    assert optimizer.param_groups[0]["eps"] == pytest.approx(1e-8 / math.sqrt(2))
    result = run_trial(adam_task, spec(lr_rule="adam"))
    assert result.ok and result.lr == pytest.approx(0.2 * math.sqrt(2))
    # κ = 16 would push beta1 = 0.9 below 0: the shared rule falls back to lr·√κ, betas as set.
    far = _with_adam_scaling(adam_task, spec(lr_rule="adam", batch=256, micro_batch=256))
    kept = far.optimizer([torch.nn.Parameter(torch.zeros(1))], 0.01).param_groups[0]
    assert tuple(kept["betas"]) == (0.9, 0.999) and kept["eps"] == 1e-8
    done = run_trial(adam_task, spec(lr_rule="adam", batch=256, micro_batch=256))
    assert done.ok and done.lr == pytest.approx(0.2 * math.sqrt(16))


def fake_lr_finder(monkeypatch: pytest.MonkeyPatch, suggestion: float | None) -> list[int]:
    calls: list[int] = []

    def find_lr(task: Any, *, micro_batch: int, accumulation_steps: int, seed: int, device: Any):
        calls.append(micro_batch * accumulation_steps)
        return types.SimpleNamespace(suggestion=suggestion)

    monkeypatch.setattr("batchpilot.sweep.trials.find_lr", find_lr)
    return calls


def test_range_test_lr_is_found_once_per_batch(task, monkeypatch) -> None:
    calls = fake_lr_finder(monkeypatch, 0.3)
    half = run_trial(task, spec(lr_rule="range-test", lr_factor=0.5, ref_batch=None, ref_lr=None))
    full = run_trial(task, spec(lr_rule="range-test", ref_batch=None, ref_lr=None))
    assert (half.lr, full.lr) == (pytest.approx(0.15), pytest.approx(0.3))
    assert calls == [32]  # the second factor reused the first range test
    fake_lr_finder(monkeypatch, None)
    other = run_trial(task, spec(lr_rule="range-test", batch=64, micro_batch=64))
    assert other.status == "failed" and other.error is not None
    assert other.error.startswith("lr_rule: the lr range test gave no usable suggestion")


def test_range_tests_are_cached_for_a_few_batches_only(task, monkeypatch) -> None:
    from batchpilot.sweep import trials

    calls = fake_lr_finder(monkeypatch, 0.3)
    monkeypatch.setattr(trials, "_RANGE_TESTS", trials.OrderedDict())
    monkeypatch.setattr(trials, "RANGE_TEST_CACHE", 2)
    for seed in (0, 1, 2, 0):
        trials.trial_lr(task, spec(lr_rule="range-test", seed=seed), device=torch.device("cpu"))
    assert len(calls) == 4  # seed 0 had been dropped to keep the cache at 2 entries
    assert len(trials._RANGE_TESTS) == 2
    trials.trial_lr(task, spec(lr_rule="range-test", seed=2), device=torch.device("cpu"))
    assert len(calls) == 4  # the most recent ones are kept
