"""The noise-scale window, the lr check at the recommended batch, warm-up from evidence."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task
from batchpilot.errors import BadInputError
from batchpilot.measure import check_lr, grid_point, measure_noise_scale, with_adam_scaling
from batchpilot.measure._lr_check import GRID_FACTOR, LrTrial, _decide
from batchpilot.measure._noise import _Window
from batchpilot.plan import (
    WARMUP_MAX_FRACTION,
    predicted_steps,
    recommend,
    warmup_from_evidence,
    with_checked_lr,
)


def _regression_task(*, train: int, val: int, features: int, noise: float, seed: int = 0) -> Task:
    """Linear regression with a teacher: few samples and many features overfit within steps."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 1, generator=generator)
    x = torch.randn(train + val, features, generator=generator)
    y = x @ w + noise * torch.randn(train + val, 1, generator=generator)

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return F.mse_loss(model(inputs), targets)

    return Task(
        model=lambda: nn.Linear(features, 1),
        train_data=TensorDataset(x[:train], y[:train]),
        val_data=TensorDataset(x[train:], y[train:]),
        loss=loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        name="regression",
    )


# ----------------------------------------------------------------------------- the window


def test_window_ends_at_the_best_point_and_stops_on_a_clear_rise() -> None:
    window = _Window(min_steps=5)
    curve = [(s, 10.0 / s) for s in range(1, 11)] + [
        (s, 1.0 + 0.2 * (s - 10)) for s in (12, 14, 16)
    ]
    stops = [window.add(s, v) for s, v in curve]
    assert stops[-1] == "overfitting" and not any(stops[:-1])
    assert window.best == (10, 1.0)
    assert window.end(16) == 10


def test_window_keeps_running_through_noise_around_a_slow_descent() -> None:
    window = _Window(min_steps=5)
    generator = torch.Generator().manual_seed(0)
    stops = []
    step = 1
    while step <= 400:
        # a slow descent with noise of the size of its step-to-step change: never a clear rise
        value = 1.0 / math.sqrt(step) + 0.01 * float(torch.randn(1, generator=generator))
        stops.append(window.add(step, value))
        step = window.next_eval
    assert not any(stops)


def test_window_stops_where_the_loss_flattens_whatever_the_clock() -> None:
    window = _Window(min_steps=10)
    step, reason = 1, None
    while reason is None and step < 10_000:
        reason = window.add(step, 0.05 + 2.0 * math.exp(-step / 40))  # flattens past ~200
        step = window.next_eval
    assert reason == "diminishing returns"
    assert window.best is not None and 150 < window.best[0] < 1000


def test_a_flat_signal_keeps_the_whole_run_as_the_window() -> None:
    window = _Window(min_steps=5)
    for step, value in [(1, 0.70), (2, 0.69), (3, 0.70), (4, 0.69), (5, 0.70), (6, 0.71)]:
        window.add(step, value)
    assert not window.progressed()
    assert window.end(40) == 40


def test_measure_noise_scale_window_stops_a_fast_overfitting_task_early() -> None:
    task = _regression_task(train=48, val=512, features=40, noise=3.0)
    fixed = measure_noise_scale(task, batch=16, steps=400, lr=0.05, seed=0)
    windowed = measure_noise_scale(task, batch=16, steps=400, lr=0.05, seed=0, window=True)
    assert fixed.steps == 400 and fixed.window_steps == 400 and not fixed.plateau
    assert windowed.plateau and windowed.steps < 400
    assert windowed.window_steps < windowed.steps
    best_step, _ = min(windowed.progress, key=lambda p: p[1])
    assert windowed.window_steps == max(best_step, 30)
    # overfitting: the noise scale grows past the best step, so the window's is smaller
    assert windowed.plan_noise_scale < fixed.critical_batch
    assert windowed.plan_quantity == "critical batch over the window"
    low, high = windowed.plan_interval
    assert low <= windowed.plan_noise_scale <= high
    assert windowed.progress_split == "val"


def test_the_noise_plot_marks_the_window_not_the_run_end() -> None:
    from batchpilot.plots.noise import plot_noise_history

    task = _regression_task(train=48, val=512, features=40, noise=3.0)
    windowed = measure_noise_scale(task, batch=16, steps=400, lr=0.05, seed=0, window=True)
    assert windowed.window_steps < windowed.steps
    ax = plot_noise_history(windowed)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "window's end" in labels
    assert any(label.startswith("critical batch over the window") for label in labels)


def test_measure_noise_scale_time_budget_binds() -> None:
    task = _regression_task(train=4096, val=256, features=8, noise=1.0)
    result = measure_noise_scale(
        task, batch=64, steps=1_000_000, lr=1e-5, window=True, time_budget_seconds=0.5
    )
    assert result.seconds < 1.5
    assert "time budget" in result.window_reason


# ----------------------------------------------------------------------------- the lr check


def test_grid_points_are_powers_of_root_two() -> None:
    for lr in (1e-4, 0.003, 0.1, 0.7, 3.0):
        exponent = math.log(grid_point(lr)) / math.log(math.sqrt(2))
        assert abs(exponent - round(exponent)) < 1e-9
        assert 2**-0.25 - 1e-9 <= grid_point(lr) / lr <= 2**0.25 + 1e-9


def test_check_lr_moves_a_far_too_low_rule_lr_up_the_grid() -> None:
    task = _regression_task(train=2048, val=512, features=8, noise=0.1)
    checked = check_lr(task, rule_lr=0.004, micro_batch=64, steps=40, seeds=2)
    tried = [t.lr for t in checked.trials]
    assert len(tried) >= 4  # extended past the first three
    assert not checked.kept_rule and checked.lr > checked.rule_grid_lr
    assert checked.lr == checked.best_lr
    assert checked.stable
    # the chosen lr trains to a lower loss than the rule's
    by_lr = {t.lr: t for t in checked.trials}
    assert by_lr[checked.lr].median < by_lr[checked.rule_grid_lr].median


def _trial(k: int, *losses: float) -> LrTrial:
    return LrTrial(GRID_FACTOR**k, losses, sorted(losses)[len(losses) // 2], False)


def test_a_tie_answers_its_centre_and_a_clear_win_its_best() -> None:
    flat = {
        t.lr: t
        for t in (
            _trial(-1, 1.0, 1.1, 1.2),
            _trial(0, 1.02, 1.1, 1.3),
            _trial(1, 1.0, 1.05, 1.1),
            _trial(2, 1.1, 1.15, 1.2),
            _trial(3, 2.0, 2.1, 2.2),
        )
    }
    best = min(flat.values(), key=lambda t: (t.median, t.lr))
    # the best (lr 1, median 1.05) reaches 1.1: lrs −1, 0 and 1 tie, 2 (1.15) and 3 do not
    lr, reason = _decide(flat, best, GRID_FACTOR**0)
    assert lr == pytest.approx(GRID_FACTOR**0)  # tie of −1, 0, 1: its centre
    assert "tie" in reason
    sharp = {
        t.lr: t
        for t in (_trial(-1, 2.0, 2.1, 2.2), _trial(0, 1.5, 1.6, 1.7), _trial(1, 1.0, 1.05, 1.1))
    }
    lr, reason = _decide(sharp, sharp[GRID_FACTOR**1], GRID_FACTOR**0)
    assert lr == pytest.approx(GRID_FACTOR**1) and "beat every other lr" in reason
    even = {
        t.lr: t
        for t in (
            _trial(0, 1.0, 1.1, 1.2),
            _trial(1, 1.0, 1.05, 1.2),
            _trial(2, 1.0, 1.1, 1.3),
            _trial(3, 1.0, 1.12, 1.3),
        )
    }
    lr, _ = _decide(even, even[GRID_FACTOR**1], GRID_FACTOR**0)
    assert lr == pytest.approx(GRID_FACTOR**1)  # middles 1 and 2: the lower median, 1


def test_check_lr_goes_down_when_the_rule_lr_diverges() -> None:
    task = _regression_task(train=2048, val=256, features=8, noise=0.1)
    checked = check_lr(task, rule_lr=8.0, micro_batch=64, steps=30, seeds=1)
    assert checked.lr < 8.0 / 2
    assert any(t.diverged for t in checked.trials)
    assert checked.stable


def test_check_lr_refuses_a_bad_rule_lr() -> None:
    task = _regression_task(train=256, val=64, features=4, noise=0.1)
    with pytest.raises(BadInputError, match="rule_lr"):
        check_lr(task, rule_lr=-1.0, micro_batch=16, steps=5)


def test_with_adam_scaling_sets_the_rescaled_betas() -> None:
    task = _regression_task(train=256, val=64, features=4, noise=0.1)
    adam = Task(
        model=task.model,
        train_data=task.train_data,
        val_data=task.val_data,
        loss=task.loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    )
    scaled = with_adam_scaling(adam, ref_batch=32, batch=128)
    group = scaled.make_optimizer(nn.Linear(2, 1).parameters(), 1e-3).param_groups[0]
    assert group["betas"] == pytest.approx((0.6, 0.996))
    assert group["eps"] == pytest.approx(1e-8 / 2)
    far = with_adam_scaling(adam, ref_batch=32, batch=1024)  # κ = 32 > 1/(1 − 0.9)
    group = far.make_optimizer(nn.Linear(2, 1).parameters(), 1e-3).param_groups[0]
    assert group["betas"] == (0.9, 0.999)


# ----------------------------------------------------------------------------- warm-up


def test_warmup_only_on_evidence() -> None:
    grows = {"ref_lr": 0.1, "steps_per_epoch": 100}
    assert warmup_from_evidence(0.1, **grows).steps == 0  # the lr does not grow
    assert warmup_from_evidence(0.8, verified_runs=3, **grows).steps == 0
    assert warmup_from_evidence(0.8, stable_lr=2.0, **grows).steps == 0
    goyal = warmup_from_evidence(0.8, stable_lr=0.5, **grows)
    assert goyal.steps == 500 and "Goyal" in goyal.reason
    short = warmup_from_evidence(0.8, predicted_steps=120, **grows)
    assert short.steps == math.ceil(WARMUP_MAX_FRACTION * 120)
    adam = warmup_from_evidence(4e-3, ref_lr=1e-3, steps_per_epoch=10, adam_beta2=0.99)
    assert adam.steps == 200 and "Ma & Yarats" in adam.reason


def test_predicted_steps_follow_the_critical_batch() -> None:
    assert predicted_steps(100, from_batch=32, to_batch=32, critical_batch=50.0) == 100
    far = predicted_steps(200, from_batch=16, to_batch=4096, critical_batch=16.0)
    assert far == pytest.approx(200 * (1 + 16 / 4096) / 2)
    finite = predicted_steps(
        100, from_batch=32, to_batch=1000, critical_batch=50.0, dataset_size=1000
    )
    assert finite == pytest.approx(100 / (1 + 50 * (1000 - 32) / (32 * 999)))


def test_with_checked_lr_replaces_the_lr_and_drops_a_verified_warmup() -> None:
    rec = recommend(
        train_size=50_000,
        max_micro_batch=1024,
        reference_batch=32,
        reference_lr=0.05,
        optimizer_name="SGD",
        throughput=[(32, 1e3), (256, 8e3), (1024, 2e4)],
        noise_scale=2000.0,
        window_steps=3000,
    )
    assert rec.global_batch > 32 and rec.lr > 0.05
    assert rec.warmup_steps > 0
    assert rec.predicted_steps is not None
    assert rec.warmup_steps <= math.ceil(WARMUP_MAX_FRACTION * rec.predicted_steps)
    checked = with_checked_lr(rec, 0.3, reason="0.3 beat the rule", verified_runs=3)
    assert checked.lr == 0.3 and checked.rule_lr == rec.lr
    assert checked.lr_source == "checked" and checked.warmup_steps == 0
    assert "0.3 beat the rule" in checked.reasons[-2]
    assert checked.reasons[-1].startswith("No warm-up")
    assert not any(r.startswith("Warm up") for r in checked.reasons)
    assert checked.to_dict()["lr_source"] == "checked"


def test_tune_checks_adam_with_the_rescaled_betas() -> None:
    from batchpilot.tune import TuneOptions, tune

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1536, 8, generator=generator)
    labels = (x[:, :2].sum(dim=1) > 0).long()
    task = Task(
        model=lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        train_data=TensorDataset(x[:1024], labels[:1024]),
        val_data=TensorDataset(x[1024:], labels[1024:]),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        reference_batch=16,
        name="adam-task",
    )
    options = TuneOptions(
        max_batch=64, throughput_steps=1, lr_steps=20, lr_repeats=1, noise_steps=60, check_seeds=1
    )
    result = tune(task, options)
    rec, check = result.recommendation, result.lr_check
    assert check is not None and rec.lr == check.lr
    kappa = rec.global_batch / rec.reference_batch
    if rec.lr_rule == "adam":  # κ < 10: betas and eps rescaled, and reported as settings to change
        assert rec.betas == pytest.approx((1 - kappa * 0.1, 1 - kappa * 0.001))
    else:  # κ = 1 (no change) or beyond the rule's reach (lr·√κ, betas kept)
        assert rec.betas is None
    from batchpilot.report.tune import build_tune_document

    text = str(build_tune_document(result).sections[0].paragraphs[1])
    assert text.startswith("Optimizer settings to change: lr")
    assert ("betas" in text) == (rec.betas is not None)
