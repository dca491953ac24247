"""The noise-scale window, the lr check at the recommended batch, warm-up from evidence."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot import Task
from batchpilot.errors import BadInputError
from batchpilot.measure import (
    _lr_check,
    check_lr,
    grid_point,
    measure_noise_scale,
    with_adam_scaling,
)
from batchpilot.measure._lr_check import (
    GRID_FACTOR,
    MAX_NEW_LRS,
    LrTrial,
    _decide,
    check_betas,
)
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


def _fast_drop_then_plateau(window: _Window, *, until: int) -> list[str | None]:
    """A loss that drops to its best at step 6, then wanders just above it on a plateau (the
    shape of a regression whose loss sits on a plateau before its second descent)."""
    stops, step = [], 1
    while step <= until:
        value = 1.2 * math.exp(-step / 2) + 0.30 if step <= 6 else 0.38 + 0.002 * (step % 3)
        stops.append(window.add(step, value, [1.0 / (1 + i) for i in range(step)]))
        step = window.next_eval
    return stops


def test_overfitting_is_not_called_within_the_first_epoch() -> None:
    # a plateau just above an early best, with the training loss falling: after an epoch it is
    # called overfitting, within the first epoch (every batch scored before it is trained on,
    # the training loss a held-out estimate) it is not
    assert "overfitting" in _fast_drop_then_plateau(_Window(min_steps=5), until=60)
    assert "overfitting" not in _fast_drop_then_plateau(
        _Window(min_steps=5, epoch_steps=100), until=60
    )


def test_the_window_does_not_stop_above_a_loss_a_run_of_its_lr_was_seen_to_reach() -> None:
    # another run of this lr and batch reached 0.2 within 100 steps: no early stop above 0.2
    # before step 200, then the rules apply again
    reached = _Window(min_steps=5, reach=(0.2, 100))
    stops = _fast_drop_then_plateau(reached, until=190)
    assert not any(stops)
    assert _fast_drop_then_plateau(_Window(min_steps=5, reach=(0.2, 100)), until=400)[-1]
    assert _fast_drop_then_plateau(_Window(min_steps=5, reach=(0.5, 100)), until=60)[-1]


def test_steps_ties_allow_one_progress_interval() -> None:
    # steps read between progress points 10 % apart: seeds of 64.8-64.9 steps do not make 67
    # steps a loss; 80 steps is one
    close = {t.lr: t for t in (_trial(0, 64.8, 64.85, 64.9), _trial(1, 66.0, 67.0, 67.5))}
    lr, reason = _decide(close, close[GRID_FACTOR**0], GRID_FACTOR**0, "steps to target")
    assert "2 lrs" in reason and "plus one progress interval" in reason
    apart = {t.lr: t for t in (_trial(0, 64.8, 64.85, 64.9), _trial(1, 78.0, 80.0, 82.0))}
    lr, reason = _decide(apart, apart[GRID_FACTOR**0], GRID_FACTOR**0, "steps to target")
    assert lr == pytest.approx(1.0) and "trained best" in reason
    # scored by loss, the worst seed alone is the reach: the first pair does not tie
    lr, reason = _decide(close, close[GRID_FACTOR**0], GRID_FACTOR**0, "loss")
    assert "trained best" in reason


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


def test_ties_are_paired_seed_against_seed() -> None:
    from batchpilot.measure._lr_check import _next_lr, _tie

    # adam_mlp at batch 512, steps to the target per seed (seed s: same init and data order at
    # every lr). The middle lr's median is past the best's worst seed plus an interval (19.25),
    # but its seed 0 got there first: the seeds cannot rank them, so it ties.
    runs = {
        t.lr: t
        for t in (
            _trial(-1, 19.6, 22.8, 20.6),
            _trial(0, 14.9, 17.5, 16.5),
            _trial(1, 11.6, 19.6, 31.6),
        )
    }
    best, tied = _tie(runs, "steps to target")
    assert best.lr == pytest.approx(1.0)
    assert tied == [pytest.approx(1.0), pytest.approx(GRID_FACTOR)]  # −1 lost every seed
    # so the tie is not yet bounded above: the check runs the next lr up
    assert _next_lr(runs, {1: 0, -1: 0}, "steps to target") == pytest.approx(GRID_FACTOR**2)
    # a constant offset between draws cancels: lr 1 is behind in every seed by 0.02, less than
    # the 0.1 between seeds, and ties by its median; lr 2, behind by 0.15 in each, does not
    offset = {
        t.lr: t
        for t in (
            _trial(0, 0.50, 0.60, 0.70),
            _trial(1, 0.52, 0.62, 0.72),
            _trial(2, 0.65, 0.75, 0.85),
        )
    }
    assert _tie(offset, "loss")[1] == [pytest.approx(1.0), pytest.approx(GRID_FACTOR)]
    # the same losses with lr 2 ahead in one seed: it ties
    offset[GRID_FACTOR**2] = _trial(2, 0.45, 0.75, 0.85)
    assert len(_tie(offset, "loss")[1]) == 3


def _fake_training(
    monkeypatch: pytest.MonkeyPatch,
    loss: Any,
    seconds_per_step: float = 0.0,
) -> list[tuple[float, int]]:
    """Replace the check's training runs by ``loss(lr, steps, seed)`` (inf = diverged; a pair
    ``(loss, steps to the target)`` for a run that follows one); returns the (lr, steps) of
    every candidate run, in order (one entry per candidate, not per seed)."""
    calls: list[tuple[float, int]] = []

    def seed_run(
        task: Task, lr: float, seed: int, *, steps: int, target_loss: Any, **_: Any
    ) -> tuple[float, float, tuple[tuple[int, float], ...]]:
        if not calls or calls[-1] != (lr, steps):
            calls.append((lr, steps))
        if seconds_per_step:
            import time

            time.sleep(seconds_per_step * steps)
        value = loss(lr, steps, seed)
        if isinstance(value, tuple):
            final, reached = value
            return float(final), float(reached) if reached <= steps else math.inf, ()
        return float(value), math.inf, ()

    monkeypatch.setattr(_lr_check, "_seed_run", seed_run)
    return calls


def _bowl(best: float, *, width: float = 1.0, noise: float = 0.01) -> Any:
    """A loss that is lowest at lr ``best``, quadratic in log lr, with a seed's own offset."""

    def loss(lr: float, steps: int, seed: int) -> float:
        return 1.0 + (math.log(lr / best) / width) ** 2 + noise * ((seed * 7919) % 13) / 13

    return loss


def _exp(lr: float) -> int:
    return round(math.log(lr) / math.log(GRID_FACTOR))


def test_check_lr_gallops_to_an_optimum_far_from_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # the optimum 64× (12 grid points) above the rule's lr: a walk of √2 steps would need 12 runs
    calls = _fake_training(monkeypatch, _bowl(0.01 * 64, width=0.5))
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.01, micro_batch=16, steps=20, seeds=3)
    assert _exp(checked.lr) == _exp(0.64) and checked.complete
    assert len(calls) <= 3 + MAX_NEW_LRS  # ×√2, ×2, ×4, ×16 steps, then the gap next to the best
    exponents = sorted(_exp(t.lr) for t in checked.trials)
    assert _exp(0.64) - 1 in exponents and _exp(0.64) + 1 in exponents  # both neighbours run
    assert not checked.kept_rule and checked.best_lr == checked.lr


def test_check_lr_leaves_a_plateau_upward(monkeypatch: pytest.MonkeyPatch) -> None:
    # below lr 0.5 every run sits on the same plateau (seed noise only); above it the loss drops
    def loss(lr: float, steps: int, seed: int) -> float:
        plateau = 1.0 + 0.001 * seed
        return plateau if lr < 0.5 else plateau - 0.5 + (math.log(lr / 2.0)) ** 2 * 0.1

    _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.02, micro_batch=16, steps=20, seeds=3)
    assert checked.lr > 0.5  # off the plateau
    assert abs(_exp(checked.lr) - _exp(2.0)) <= 1


def test_a_plateau_tie_does_not_gallop_down_to_lrs_that_cannot_train(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every lr below 4 sits on the same plateau, 4 and above diverge: the tie reaches down
    def loss(lr: float, steps: int, seed: int) -> float:
        return math.inf if lr >= 4.0 else 0.69 + 0.0001 * seed

    calls = _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.5, micro_batch=16, steps=20, seeds=3, max_doublings=0)
    below = [lr for lr, _ in calls if lr < 0.5]
    # single √2 steps down, at most the cap: never below 0.5 / √2^(9 + 1)
    assert min(below) >= 0.5 / GRID_FACTOR**10 * 0.999
    assert checked.lr >= 0.5 / GRID_FACTOR**6 * 0.999  # the centre of a tie of ≤ 12 points


def _short_horizon_bias(target: float) -> Any:
    """Short-horizon bias: after t steps the loss is c·lr (the floor a constant lr leaves) plus
    A/(lr·t) (the distance still to go), so the best lr at a horizon falls as √(A/(c t)) as it
    grows; a run following ``target`` stops there, after A/(lr (target − c·lr)) steps."""

    def loss(lr: float, steps: int, seed: int) -> tuple[float, float]:
        floor, distance = 0.5 * lr + 0.001 * seed, 2.0
        reached = distance / (lr * (target - floor)) if target > floor else math.inf
        return (target if reached <= steps else floor + distance / (lr * steps)), reached

    return loss


def test_check_lr_doubles_its_horizon_until_the_target_is_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_training(monkeypatch, _short_horizon_bias(0.21))
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    # at 25 steps the best (lr ≈ 0.4) reaches 0.4; no lr reaches 0.21 before ~91 steps (lr 0.21)
    checked = check_lr(task, rule_lr=0.4, micro_batch=16, steps=25, seeds=3, target_loss=0.21)
    assert checked.horizons == (25, 50, 100) and checked.steps == 100
    assert checked.reached is True and checked.score == "steps to target"
    assert {steps for _, steps in calls} == {25, 50, 100}
    assert _exp(checked.lr) == _exp(0.2)  # the fewest steps to 0.21, half the short one's best
    assert checked.steps_to_target == pytest.approx(2.0 / (0.177 * (0.21 - 0.5 * 0.177)), rel=0.02)
    assert {t.steps for t in checked.earlier} == {25, 50}
    assert "target loss" in checked.reason and "steps to the target" in checked.reason
    # without a target the first horizon decides
    short = check_lr(task, rule_lr=0.4, micro_batch=16, steps=25, seeds=3)
    assert short.horizons == (25,) and _exp(short.lr) == _exp(0.4)


def test_check_lr_lengthens_a_horizon_too_short_to_tell_lrs_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a plateau left after 40/lr steps, and lrs from 2 up diverge: at 20 steps every lr that
    # trains sits on the plateau (the tie spans the whole grid below 2); at 40 steps lr 1.41 has
    # left it, and is the answer
    def loss(lr: float, steps: int, seed: int) -> float:
        if lr >= 2.0:
            return math.inf
        left = steps * lr > 40.0
        return 1.0 + 0.001 * seed - (0.5 if left else 0.0)

    _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.1, micro_batch=16, steps=20, seeds=3)
    assert checked.horizons == (20, 40)
    assert "wider than the check resolves" in checked.reason
    assert _exp(checked.lr) == 1  # √2, off the plateau
    # without the longer horizon the plateau's tie answers its centre, far below
    short = check_lr(task, rule_lr=0.1, micro_batch=16, steps=20, seeds=3, max_doublings=0)
    assert short.lr < 0.5


def test_check_lr_starts_a_longer_horizon_only_when_it_fits_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 seeds × 25 steps: 15 ms a run
    _fake_training(monkeypatch, _short_horizon_bias(0.21), seconds_per_step=2e-4)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(
        task,
        rule_lr=0.4,
        micro_batch=16,
        steps=25,
        seeds=3,
        target_loss=0.21,
        time_budget_seconds=0.12,
    )
    # the first horizon's ~5 runs take ~75 ms; the next (3 lrs × 50 steps, ~90 ms) does not fit
    assert checked.horizons == (25,) and checked.reached is False


def test_a_tie_is_bounded_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    # a flat optimum from 0.1 to 0.4: seeds cannot tell those lrs apart, outside they are worse
    def loss(lr: float, steps: int, seed: int) -> float:
        inside = 0.1 <= lr <= 0.4 + 1e-9
        return 1.0 + 0.01 * seed + (0.0 if inside else abs(math.log(lr / 0.2)))

    _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.2, micro_batch=16, steps=20, seeds=3)
    exponents = {_exp(t.lr) for t in checked.trials}
    assert {-6, -5, -4, -3} <= exponents  # the grid points 0.125 … 0.354 inside the flat part
    assert {-7, -2} <= exponents  # and a worse lr run beyond each end (0.0884, 0.5)
    assert _exp(checked.lr) == -5  # the centre of −6 … −3: −5 or −4, the lower median (a tie): −5
    assert len(checked.trials) <= 3 + MAX_NEW_LRS


def test_check_betas_keeps_rescaled_betas_only_on_evidence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    own = LrTrial(0.1, (1.0, 1.01, 1.02), 1.01, False, 20)  # the check's run, own betas
    check = _lr_check.LrCheck(
        global_batch=16, micro_batch=16, accumulation_steps=1, steps=20, seeds=3, rule_lr=0.1,
        rule_grid_lr=0.1, trials=(own,), best_lr=0.1, lr=0.1, kept_rule=True, reason="",
        split="val", seconds=0.0, complete=True,
    )  # fmt: skip
    _fake_training(monkeypatch, lambda lr, steps, seed: 0.5 + 0.01 * seed)  # rescaled: better
    clear = check_betas(task, check)
    assert clear is not None and clear.keep_rescaled and "above every rescaled seed" in clear.reason
    assert clear.unchanged is own and clear.rescaled.median == pytest.approx(0.51)
    _fake_training(monkeypatch, lambda lr, steps, seed: 1.0 + 0.005 * seed)  # within the spread
    tie = check_betas(task, check)
    assert tie is not None and not tie.keep_rescaled and "tie" in tie.reason
    assert tie.rescaled.steps == 20 and len(tie.rescaled.losses) == 3
    _fake_training(monkeypatch, lambda lr, steps, seed: 1.5 + 0.01 * seed)  # rescaled: worse
    worse = check_betas(task, check)
    assert worse is not None and not worse.keep_rescaled and "as well or better" in worse.reason


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


def test_a_measured_critical_batch_replaces_the_noise_scale_and_says_what_chose_the_batch() -> None:
    from batchpilot.plan import StepsCriticalBatch, with_measured_critical_batch

    rec = recommend(
        train_size=50_000,
        max_micro_batch=1024,
        reference_batch=32,
        reference_lr=0.05,
        optimizer_name="SGD",
        throughput=[(32, 1e3), (256, 8e3), (1024, 2e4)],
        noise_scale=100.0,
        window_steps=3000,
    )
    at_batch = predicted_steps(400, from_batch=32, to_batch=rec.global_batch, critical_batch=800.0)
    measured = StepsCriticalBatch.measure(
        0.5,
        reference=(32, 400.0),
        reference_resolution=0.1,
        checked=(rec.global_batch, at_batch, (0.95 * at_batch, 1.05 * at_batch)),
        dataset_size=None,
    )
    assert measured is not None
    updated = with_measured_critical_batch(rec, measured)
    assert updated.noise_scale == pytest.approx(800.0, rel=0.01)
    assert updated.critical_batch_source == "steps at two batches"
    assert updated.global_batch == rec.global_batch and updated.lr == rec.lr
    assert updated.predicted_steps == pytest.approx(at_batch)
    # the earlier reasons explain the batch with the noise scale; the last says so
    assert "noise scale's 100, with which the batch above was chosen" in updated.reasons[-1]
    assert "B_crit ≈ 800" in updated.reasons[-1]


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
    betas = result.betas_check
    if rec.lr_rule == "adam":  # κ < 10: betas and eps rescaled, then checked against the own ones
        assert betas is not None and betas.lr == rec.lr and betas.steps == check.steps
        assert len(betas.unchanged.losses) == check.seeds
        if betas.keep_rescaled:
            assert rec.betas == pytest.approx((1 - kappa * 0.1, 1 - kappa * 0.001))
            assert betas.rescaled.median < betas.unchanged.median
        else:
            assert rec.betas is None
            assert any(r.startswith("Adam betas checked") for r in rec.reasons)
    else:  # κ = 1 (no change) or beyond the rule's reach (lr·√κ, betas kept)
        assert rec.betas is None and betas is None
    from batchpilot.report.tune import build_tune_document

    text = str(build_tune_document(result).sections[0].paragraphs[1])
    assert text.startswith("Optimizer settings to change: lr")
    changes = text.split(". Keep")[0]  # the settings to change, before any "keep" sentence
    assert ("betas" in changes) == (rec.betas is not None)
    if betas is not None and not betas.keep_rescaled:
        assert "Keep the optimizer's betas and eps" in text


def test_the_report_says_how_long_the_check_ran_and_whether_it_reached_the_target() -> None:
    from batchpilot.report.tune import _horizon_sentence

    trial = LrTrial(0.1, (1.0, 1.1, 1.2), 1.1, False, 80)
    check = _lr_check.LrCheck(
        global_batch=16, micro_batch=16, accumulation_steps=1, steps=80, seeds=3, rule_lr=0.1,
        rule_grid_lr=0.1, trials=(trial,), best_lr=0.1, lr=0.1, kept_rule=True, reason="",
        split="val", seconds=0.0, complete=True, horizons=(20, 40, 80), target_loss=0.95,
        reached=False,
    )  # fmt: skip
    text = _horizon_sentence(check)
    assert "doubled from 20 to 80 steps" in text and "0.95: not reached" in text
    from dataclasses import replace

    once = _horizon_sentence(replace(check, horizons=(80,), target_loss=None, reached=None))
    assert once == ""


def test_a_run_following_a_target_stops_there_and_counts_its_steps() -> None:
    from batchpilot.training import train

    task = _regression_task(train=256, val=128, features=4, noise=0.1)
    free = train(task, micro_batch=32, lr=0.05, steps=200, seed=0, progress=True)
    assert free.steps == 200 and free.progress[0][0] == 1
    steps = [s for s, _ in free.progress]
    assert steps[:10] == list(range(1, 11)) and steps[-1] <= 200
    assert all(b - a <= max(1, int(0.1 * a)) for a, b in pairwise(steps))  # ~10 % apart
    target = free.progress[len(free.progress) // 2][1]  # a loss the run reached half-way
    stopped = train(task, micro_batch=32, lr=0.05, steps=200, seed=0, target_loss=target)
    first = next(s for s, v in free.progress if v <= target)
    assert stopped.steps == first < 200  # the same seed stops at the first point at the target
    assert stopped.final is not None  # evaluated where it stopped
    assert first - 0.1 * first - 1 <= stopped.steps_to_target <= first
    never = train(task, micro_batch=32, lr=0.05, steps=30, seed=0, target_loss=-1.0)
    assert never.steps == 30 and math.isinf(never.steps_to_target)


def test_steps_to_interpolates_between_the_points_either_side() -> None:
    from batchpilot.training import steps_to

    assert steps_to([(10, 1.0), (20, 0.25)], 0.5) == pytest.approx(15.0)  # halfway in log-loss
    assert steps_to([(10, 1.0), (20, -1.0)], 0.0) == pytest.approx(15.0)  # linear below zero
    assert steps_to([(3, 0.2)], 0.5) == 3.0
    assert math.isinf(steps_to([(1, 1.0), (2, 0.9)], 0.5))


@pytest.mark.parametrize("dataset_size", [None, 10_000])
@pytest.mark.parametrize("critical", [3.0, 150.0, 2_000.0])
def test_critical_batch_from_steps_inverts_the_predicted_steps(
    critical: float, dataset_size: int | None
) -> None:
    from batchpilot.plan import critical_batch_from_steps

    for small, large in ((16, 512), (32, 4096)):
        at_large = predicted_steps(
            1000.0,
            from_batch=small,
            to_batch=large,
            critical_batch=critical,
            dataset_size=dataset_size,
        )
        found = critical_batch_from_steps(
            1000.0, at_large, small_batch=small, large_batch=large, dataset_size=dataset_size
        )
        assert found == pytest.approx(critical, rel=1e-9)


def test_critical_batch_from_steps_at_the_ends() -> None:
    from batchpilot.errors import BadInputError
    from batchpilot.plan import StepsCriticalBatch, critical_batch_from_steps

    # no steps saved by the larger batch: no critical batch; all saved in proportion: unbounded
    assert critical_batch_from_steps(100, 120, small_batch=32, large_batch=512) == 0.0
    assert math.isinf(critical_batch_from_steps(1600, 100, small_batch=32, large_batch=512))
    with pytest.raises(BadInputError, match="large_batch"):
        critical_batch_from_steps(100, 50, small_batch=64, large_batch=64)
    # the interval spans the seeds' spread and the reference's resolution, either order
    at_512 = predicted_steps(400, from_batch=32, to_batch=512, critical_batch=200.0)
    up = StepsCriticalBatch.measure(
        0.5,
        reference=(32, 400.0),
        reference_resolution=0.1,
        checked=(512, at_512, (0.9 * at_512, 1.1 * at_512)),
        dataset_size=None,
    )
    assert up is not None and up.critical_batch == pytest.approx(200.0)
    assert up.interval[0] < 200.0 < up.interval[1]
    down = StepsCriticalBatch.measure(
        0.5,
        reference=(512, at_512),
        reference_resolution=0.1,
        checked=(32, 400.0, (380, 420)),
        dataset_size=None,
    )
    assert down is not None and down.critical_batch == pytest.approx(200.0)
    assert down.interval[0] < 200.0 < down.interval[1]
    same = StepsCriticalBatch.measure(
        0.5,
        reference=(32, 400.0),
        reference_resolution=0.1,
        checked=(32, 400.0, (1, 2)),
        dataset_size=None,
    )
    assert same is None


def test_check_lr_scores_by_steps_once_an_lr_reaches_the_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every lr up to 1 ends below the target at the horizon, but lr 0.354 gets there first;
    # by the loss at the horizon the largest lr would win (it ends lowest)
    def loss(lr: float, steps: int, seed: int) -> tuple[float, float]:
        if lr > 1.0:
            return math.inf, math.inf
        reached = 10.0 * (1 + abs(math.log2(lr / GRID_FACTOR**-3))) + seed
        return 0.1 - lr / 10, reached

    calls = _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.2, micro_batch=16, steps=40, seeds=3, target_loss=0.5)
    assert checked.score == "steps to target" and _exp(checked.lr) == -3
    assert checked.steps_to_target == pytest.approx(11.0)
    assert checked.horizons == (40,) and {s for _, s in calls} == {40}
    assert "steps to the target loss" in checked.reason
    assert checked.to_dict()["steps_to_target"] == pytest.approx(11.0)


def test_a_longer_horizon_reruns_only_the_lrs_that_had_not_reached_the_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # by grid exponent e (lr = √2^e): e = −3 reaches the target in 30 and 31 steps, but its third
    # seed needs 60; e = −2 and −1 in 33–38 (every seed within the 40-step horizon); e ≥ 0 in
    # 50 + 10 e; e < −3 in hundreds; lrs above 2 diverge. The best's third seed has not reached
    # the target at 40 steps, so the horizon doubles once; −2 and −1 are not run again.
    def loss(lr: float, steps: int, seed: int) -> tuple[float, float]:
        e = _exp(lr)
        if lr > 2.0:
            return math.inf, math.inf
        if e == -3:
            return 0.4, (30.0, 31.0, 60.0)[seed]
        if e in (-2, -1):
            return 0.4, 33.0 + 3 * (e + 2) + seed
        return 0.4, 50.0 + 10 * e if e >= 0 else 100.0 / lr

    calls = _fake_training(monkeypatch, loss)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(task, rule_lr=0.4, micro_batch=16, steps=40, seeds=3, target_loss=0.5)
    assert checked.horizons == (40, 80)
    assert "a seed of the best lr had not reached the target loss" in checked.reason
    rerun = sorted(_exp(lr) for lr, steps in calls if steps == 80)
    kept = sorted(_exp(t.lr) for t in checked.trials if t.steps == 40)
    assert kept == [-2, -1]  # every seed reached at 40 steps: the same runs, kept
    assert -3 in rerun and not set(rerun) & set(kept)
    # at 80 steps −3's worst seed (60) bounds a tie from −3 to 1 (60 steps): its centre, −1
    assert _exp(checked.lr) == -1 and checked.score == "steps to target"


def _converging(k: int, halfway: float) -> LrTrial:
    """Three seeds that reach 1e-6 from 4.0 in 100 steps, through 1e-3 at step ``halfway``."""
    curve = ((1, 4.0), (round(halfway), 1e-3), (100, 1e-6))
    return LrTrial(GRID_FACTOR**k, (100.0,) * 3, 100.0, False, 400, (100.0,) * 3, (curve,) * 3)


def test_a_tie_at_the_target_too_wide_to_resolve_is_narrowed_by_the_descent_before_it() -> None:
    # five lrs reach the target in the same 100 steps (a momentum method converging at one rate
    # to a float floor); on the way, lrs 1 and 2 were half-way there first
    runs = {
        t.lr: t
        for t in (
            _converging(k, h) for k, h in zip(range(-2, 3), (60, 50, 40, 22, 21), strict=True)
        )
    }
    best = runs[GRID_FACTOR**-2]
    lr, reason = _decide(runs, best, GRID_FACTOR**0, "steps to target", 1e-6)
    assert lr == pytest.approx(GRID_FACTOR**2)  # of the narrowed tie {1, 2}, the lower median
    assert "5 lrs tie" in reason and "halfway there in log-loss" in reason
    assert "2 of them tie" in reason
    # without the target the tie is not re-read: its centre
    lr, reason = _decide(runs, best, GRID_FACTOR**0, "steps to target")
    assert lr == pytest.approx(GRID_FACTOR**0) and "halfway" not in reason
    # a tie the grid resolves (three points, ×2) is not narrowed
    three = {lr: t for lr, t in runs.items() if t.lr <= GRID_FACTOR**0}
    lr, reason = _decide(three, three[GRID_FACTOR**-2], GRID_FACTOR**0, "steps to target", 1e-6)
    assert lr == pytest.approx(GRID_FACTOR**-1) and "halfway" not in reason


def _window_result(progress: tuple[tuple[int, float], ...], window_steps: int) -> Any:
    from batchpilot.measure import NoiseScaleResult

    return NoiseScaleResult(
        *("t", 32, 8, 4, 0.1, progress[-1][0], 10.0, (5.0, 20.0), 10.0, 1.0, 1.0, 0, (), ()),
        *(1.0, False, ()),
        window_steps=window_steps,
        progress=progress,
    )


def test_the_target_stays_above_the_float_resolution_of_where_the_run_started() -> None:
    # a realizable task: from 5 to the float floor (1e-13), where reaching it is luck
    floor = _window_result(((1, 5.0), (50, 1e-3), (100, 2e-13), (120, 3e-13), (140, 1e-13)), 140)
    assert floor.window_loss == pytest.approx(2e-13)
    assert floor.target_loss == pytest.approx(5.0 * torch.finfo(torch.float32).eps)
    assert floor.target_source == "rounding"
    # a window that ends well above it: the loss on the descent 95 % of the way (in log-loss)
    # from the first point to the window's, not the window's floor
    noisy = _window_result(((1, 2.3), (50, 0.9), (100, 0.6), (120, 0.55), (140, 0.58)), 140)
    assert noisy.window_loss == pytest.approx(0.58)
    assert noisy.target_loss == pytest.approx(0.58 * (2.3 / 0.58) ** 0.05)  # 0.621
    assert noisy.target_source == "descent"
    assert floor.to_dict()["target_loss"] == floor.target_loss
    assert noisy.to_dict()["target_source"] == "descent"
    # no progress to take a share of (the window's loss at or above the first): the window's
    flat = _window_result(((1, 0.7), (50, 0.71), (100, 0.72)), 100)
    assert flat.target_loss == pytest.approx(0.71) and flat.target_source == "window"


def test_the_report_says_where_the_lr_checks_target_came_from() -> None:
    from batchpilot.measure._lr_check import LrCheck
    from batchpilot.report.tune import _horizon_sentence

    floor = _window_result(((1, 5.0), (50, 1e-3), (100, 2e-13), (120, 3e-13), (140, 1e-13)), 140)
    check = LrCheck(
        *(512, 512, 1, 300, 3, 1e-4, 1e-4, (), 1e-4, 1e-4, True, "r", "val", 1.0, True),
        horizons=(300,),
        target_loss=floor.target_loss,
        reached=True,
        score="steps to target",
    )
    text = _horizon_sentence(check, floor)
    assert "float32's resolution" in text and "5.96e-07" in text and "reached." in text
    noisy = _window_result(((1, 2.3), (50, 0.9), (100, 0.6), (120, 0.55), (140, 0.58)), 140)
    text = _horizon_sentence(replace(check, target_loss=noisy.target_loss), noisy)
    assert "0.6214, where the noise run had made 95% of its log-loss progress" in text
    assert "from 2.3 to the window's 0.58" in text
    deeper = replace(check, target_loss=0.42, deepened_from=0.6738, horizons=(28, 448), steps=448)
    text = _horizon_sentence(deeper, noisy)
    assert "0.42, deeper than the first, 0.6738" in text and "448-step runs" in text


def test_a_critical_batch_from_a_few_steps_is_not_used() -> None:
    from batchpilot.plan import StepsCriticalBatch
    from batchpilot.tune import _resolved

    def measured(reference_steps: float, steps: float) -> StepsCriticalBatch:
        found = StepsCriticalBatch.measure(
            0.5,
            reference=(64, reference_steps),
            reference_resolution=0.1,
            checked=(512, steps, (0.9 * steps, 1.1 * steps)),
            dataset_size=None,
        )
        assert found is not None
        return found

    # 6 steps at 512 against 40 at 64 reads B_crit ≈ 700: a whole step is 17 % of the count
    few = measured(40.0, 6.0)
    assert few.critical_batch > 500 and not _resolved(few)
    assert _resolved(measured(82.0, 40.0))  # the grid's own counts: read as they are
    assert not _resolved(measured(9.0, 40.0))  # the fewer of the two decides, either batch


def _plateau_runs(
    monkeypatch: pytest.MonkeyPatch, *, start: float = 1.0, escape: float = 400.0
) -> list[tuple[float, int]]:
    """Runs that start at ``start`` (1 % apart between seeds) and sit on a plateau at loss
    0.998 from their second step, which each lr leaves after ``400 / lr`` steps, down to 0.2;
    from lr 4 up the loss oscillates once off the plateau (every other evaluation back at 1.5),
    from lr 16 it diverges. A run that follows a target stops at it; a deep run (no target)
    records its whole progress signal."""
    calls: list[tuple[float, int]] = []

    def curve(lr: float, steps: int, seed: int) -> tuple[tuple[int, float], ...]:
        points = list(range(1, 21))
        while points[-1] < steps:
            points.append(min(steps, max(points[-1] + 1, round(points[-1] * 1.1))))
        leaves = escape / lr * (1 + 0.05 * seed)
        out = []
        for i, step in enumerate(points):
            loss = 0.998 - 0.0001 * seed if step < leaves else 0.2
            if i == 0:
                loss = start * (1 + 0.01 * seed)
            if step >= escape and lr >= 4 and i % 2:
                loss = 1.5
            out.append((step, loss))
        return tuple(out)

    def seed_run(
        task: Task, lr: float, seed: int, *, steps: int, target_loss: Any, **kw: Any
    ) -> tuple[float, float, tuple[tuple[int, float], ...]]:
        if not calls or calls[-1] != (lr, steps):
            calls.append((lr, steps))
        if lr >= 16:
            return math.inf, math.inf, ()
        progress = curve(lr, steps, seed)
        if target_loss is not None:
            reached = next((s for s, loss in progress if loss <= target_loss), math.inf)
            return progress[-1][1], float(reached), progress
        return progress[-1][1], math.inf, progress if kw.get("progress") else ()

    monkeypatch.setattr(_lr_check, "_seed_run", seed_run)
    return calls


def test_a_wide_tie_reached_within_the_first_updates_is_read_by_longer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # every lr reaches the target 0.999 at its first step: the check at 20 steps ties the whole
    # grid below 16; the runs that leave the plateau come 100-400 steps later
    calls = _plateau_runs(monkeypatch)
    task = _regression_task(train=64, val=16, features=2, noise=0.1)
    checked = check_lr(
        task, rule_lr=0.5, micro_batch=16, steps=20, seeds=3, target_loss=0.999, max_doublings=0
    )
    assert checked.deepened_from == pytest.approx(0.999)
    assert checked.horizons == (20, 20 * _lr_check.MAX_DEEPENING)
    assert 0.2 < checked.target_loss < 0.999 and checked.score == "steps to target"
    # the longer runs go to the tie's top (11.3, 5.66, 2.83), ×2 apart, and one lower (1.41)
    # since the two largest bounce back off the plateau and never settle; 2.83 leaves it at
    # step 141-155 and stays down, 1.41 at 283-311
    assert _exp(checked.lr) == _exp(2.83)
    assert "stay at or below" in checked.reason and "first updates" in checked.reason
    deep = sorted(_exp(lr) for lr, steps in calls if steps == checked.steps)
    assert deep == [_exp(1.41), _exp(2.83), _exp(5.66), _exp(11.3)]
    # the first horizon's runs stay in the result, as the level before
    assert checked.earlier and {t.steps for t in checked.earlier} == {20}
    # the same tie after a real descent (from 2.0, where the seeds start 2 % apart, to the
    # target in one step) is a fast task, not a plateau: the target's steps decide
    calls = _plateau_runs(monkeypatch, start=2.0)
    fast = check_lr(
        task, rule_lr=0.5, micro_batch=16, steps=20, seeds=3, target_loss=0.999, max_doublings=0
    )
    assert fast.deepened_from is None and fast.horizons == (20,)
    assert {steps for _, steps in calls} == {20}
    # a plateau no lr leaves within the longer runs: they are still on it, and the tie stands
    calls = _plateau_runs(monkeypatch, escape=1e6)
    stuck = check_lr(
        task, rule_lr=0.5, micro_batch=16, steps=20, seeds=3, target_loss=0.999, max_doublings=0
    )
    assert stuck.deepened_from is None and stuck.horizons == (20,)
    assert "so the tie stands" in stuck.reason and stuck.lr == fast.lr
    assert len([lr for lr, steps in calls if steps > 20]) == _lr_check.DEEP_LRS
    # a target the user gave is kept, plateau or not
    calls = _plateau_runs(monkeypatch)
    kept = check_lr(
        task,
        rule_lr=0.5,
        micro_batch=16,
        steps=20,
        seeds=3,
        target_loss=0.999,
        max_doublings=0,
        look_past_plateau=False,
    )
    assert kept.deepened_from is None and kept.target_loss == 0.999
    assert {steps for _, steps in calls} == {20}


def test_a_deeper_look_that_finds_no_lower_loss_keeps_the_tie() -> None:
    from batchpilot.measure._lr_check import _deepest_reached, settled_at

    flat = ((1, 1.0), (2, 0.99), (3, 0.99))
    trial = LrTrial(1.0, (0.99,) * 2, 0.99, False, 3, (), (flat, flat))
    assert _deepest_reached({1.0: trial}) == pytest.approx(0.99)
    assert _deepest_reached({1.0: replace(trial, diverged=True)}) == math.inf
    # one evaluation back above the level is a spike; two in a row are not settled
    assert settled_at(((1, 1.0), (2, 0.3), (3, 0.9), (4, 0.3), (5, 0.3)), 0.5) < 3
    assert settled_at(((1, 1.0), (2, 0.3), (3, 0.9), (4, 0.9), (5, 0.3)), 0.5) == math.inf


def test_the_critical_batch_is_read_at_two_batches_only_from_one_kind_of_step_count() -> None:
    from batchpilot.measure._lr_check import LrCheck
    from batchpilot.tune import _critical_from_steps

    # the noise run at batch 32 crosses 0.5 at step 100; the check at 512 in 40 steps
    noise = _window_result(((1, 2.0), (50, 0.8), (100, 0.5), (200, 0.3)), 200)
    chosen = LrTrial(0.1, (40.0,) * 3, 40.0, False, 80, (38.0, 40.0, 42.0), ())
    check = LrCheck(
        *(512, 512, 1, 80, 3, 0.1, 0.1, (chosen,), 0.1, 0.1, True, "r", "val", 1.0, True),
        horizons=(80,),
        target_loss=0.5,
        reached=True,
        score="steps to target",
    )
    measured = _critical_from_steps(noise, check, 32, 100_000, 0.5)
    assert measured is not None and measured.reference_steps == pytest.approx(100.0)
    assert measured.steps == pytest.approx(40.0) and measured.critical_batch > 0
    # steps until the runs stay below a deeper loss (a check that looked past a plateau) are
    # not the first crossing the noise run's steps are: no reading
    deeper = replace(check, deepened_from=0.9)
    assert _critical_from_steps(noise, deeper, 32, 100_000, 0.5) is None
