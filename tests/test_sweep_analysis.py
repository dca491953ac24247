from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from batchpilot.errors import BadInputError
from batchpilot.sweep import (
    TrialResult,
    analyze,
    best_lr_per_batch,
    fit_lr_exponent,
    fit_steps_to_target,
    objective_score,
)


def trial(batch: int, lr: float, val_loss: float, **fields: Any) -> TrialResult:
    base: dict[str, Any] = {
        "key": f"b{batch}-lr{lr:g}",
        "batch": batch,
        "micro_batch": batch,
        "accumulation_steps": 1,
        "lr": lr,
        "lr_rule": "sqrt",
        "lr_factor": 1.0,
        "seed": 0,
        "status": "done",
        "error": None,
        "diverged": False,
        "steps": 100,
        "samples": 100 * batch,
        "epochs": 1.0,
        "seconds": 1.0,
        "wall_seconds": 1.0,
        "val_loss": val_loss,
        "val_metric": None,
        "train_loss": val_loss - 0.1,
        "generalization_gap": 0.1,
        "steps_to_target": None,
        "samples_to_target": None,
        "seconds_to_target": None,
        "curve": (),
        "device": "cpu",
        "worker": "test",
    }
    return TrialResult(**{**base, **fields})


def test_fit_recovers_s_min_and_b_crit_from_noisy_steps() -> None:
    batches = [8, 16, 32, 64, 128, 256, 512]
    noise = np.random.default_rng(0).normal(0.0, 0.03, len(batches))
    steps = [2000 * (1 + 100 / b) * math.exp(e) for b, e in zip(batches, noise, strict=True)]
    fit = fit_steps_to_target(batches, steps)
    assert fit.s_min == pytest.approx(2000, rel=0.1)
    assert fit.b_crit == pytest.approx(100, rel=0.15)
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_crit)
    assert fit.rms_log_error < 0.05
    assert fit.steps_at(fit.b_crit) == pytest.approx(2 * fit.s_min)


def test_fit_edge_cases_perfect_and_no_scaling() -> None:
    # Steps halve with every doubling: perfect scaling, the critical batch is beyond the range.
    perfect = fit_steps_to_target([16, 32, 64], [800.0, 400.0, 200.0])
    assert perfect.s_min == 0.0 and math.isinf(perfect.b_crit)
    assert perfect.e_min == pytest.approx(12800)
    # Larger batches never saved a step: B_crit is 0.
    flat = fit_steps_to_target([16, 32, 64], [90.0, 100.0, 110.0])
    assert flat.b_crit == 0.0 and flat.s_min == pytest.approx(99, rel=0.05)
    with pytest.raises(BadInputError, match=r"^batches: the fit needs steps-to-target at two"):
        fit_steps_to_target([16], [10.0])
    with pytest.raises(BadInputError, match=r"^steps: expected positive finite"):
        fit_steps_to_target([16, 32], [10.0, math.inf])


def test_lr_exponent_tells_linear_from_square_root() -> None:
    batches = [16, 32, 64, 128]
    linear = fit_lr_exponent(batches, [0.1 * b / 16 for b in batches])
    root = fit_lr_exponent(batches, [0.1 * math.sqrt(b / 16) for b in batches])
    assert linear.exponent == pytest.approx(1.0)
    assert root.exponent == pytest.approx(0.5)
    assert root.lr_at(64) == pytest.approx(0.2)
    assert root.ref_batch == 16 and root.lr_at_ref == pytest.approx(0.1)


def test_scores_put_failures_last_and_respect_the_metric_direction() -> None:
    good = trial(32, 0.1, 0.5, val_metric=0.9)
    assert objective_score(good, "val_loss", metric_mode="max") == 0.5
    assert objective_score(good, "val_metric", metric_mode="max") == -0.9
    assert objective_score(good, "val_metric", metric_mode="min") == 0.9
    assert objective_score(good, "steps_to_target", metric_mode="max") == math.inf
    diverged = trial(64, 1.0, 0.1, diverged=True)
    failed = trial(128, 1.0, 0.1, status="failed")
    assert objective_score(diverged, "val_loss", metric_mode="max") == math.inf
    assert objective_score(failed, "val_loss", metric_mode="max") == math.inf


def test_analysis_picks_the_best_batch_per_objective() -> None:
    trials = [
        trial(16, 0.05, 0.40, val_metric=0.90, steps_to_target=400.0, seconds_to_target=8.0),
        trial(16, 0.10, 0.30, val_metric=0.93, steps_to_target=300.0, seconds_to_target=6.0),
        trial(32, 0.10, 0.31, val_metric=0.95, steps_to_target=200.0, seconds_to_target=3.0),
        trial(32, 0.20, 0.35, val_metric=0.95, steps_to_target=160.0, seconds_to_target=2.5),
        trial(64, 0.40, 0.50, val_metric=0.91, steps_to_target=100.0, seconds_to_target=2.8),
        trial(128, 0.80, 0.20, val_metric=0.99, diverged=True),
    ]
    trials = [
        t
        if t.steps_to_target is None
        else TrialResult(**{**t.__dict__, "samples_to_target": t.steps_to_target * t.batch})
        for t in trials
    ]
    analysis = analyze(trials, objective="val_metric", metric_mode="max", lr_tuned=True)
    best = {name: (choice.batch, choice.lr) for name, choice in analysis.best.items()}
    # Accuracy ties at batch 32 are broken by the lower validation loss.
    assert best["val_metric"] == (32, 0.10)
    assert best["val_loss"] == (16, 0.10)
    assert best["steps_to_target"] == (64, 0.40)
    assert best["samples_to_target"] == (16, 0.10)
    assert best["seconds_to_target"] == (32, 0.20)
    assert analysis.best_lr == {16: 0.10, 32: 0.10, 64: 0.40}
    # The fit takes the fewest steps at each batch, whatever lr got there.
    assert analysis.steps_fit is not None
    assert analysis.steps_fit.steps == (300.0, 160.0, 100.0)
    assert analysis.lr_fit is not None and analysis.lr_fit.tuned
    assert best_lr_per_batch(trials, "val_loss", metric_mode="max") == {
        16: 0.10,
        32: 0.10,
        64: 0.40,
    }
    data = analysis.to_dict()
    assert set(data) == {"objective", "best", "best_lr", "fit"}
    assert data["fit"]["steps_to_target"]["formula"] == "S = S_min (1 + B_crit / B)"
