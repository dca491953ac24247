"""What a sweep's trials say: the best batch under each objective, S(B), and the lr that was best.

McCandlish et al. (2018, arXiv 1812.06162): with the lr tuned at every batch, the optimizer steps
to reach a given loss follow ``S = S_min (1 + B_crit / B)`` and the samples ``E = E_min (1 + B /
B_crit)`` with ``E_min = S_min · B_crit``. :func:`fit_steps_to_target` fits it to the sweep's
steps-to-target. :func:`fit_lr_exponent` fits ``lr ∝ B^α`` to the best lr per batch: α ≈ 1 says the
linear rule held, α ≈ 0.5 the square-root rule.

>>> fit = fit_steps_to_target([16, 64, 256], [1000 * (1 + 100 / b) for b in (16, 64, 256)])
>>> round(fit.s_min), round(fit.b_crit), round(fit.e_min)
(1000, 100, 100000)
>>> round(fit_lr_exponent([32, 64, 128], [0.1, 0.2, 0.4]).exponent, 6)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchpilot.errors import BadInputError
from batchpilot.jsonio import fields_dict
from batchpilot.sweep.budgets import TARGET_OBJECTIVES, Mode, check_objective, objective_mode
from batchpilot.sweep.trials import TrialResult


def objective_score(trial: TrialResult, objective: str, *, metric_mode: Mode) -> float:
    """``trial``'s value of ``objective`` as a score, lower is better: negated where larger is
    better, ``math.inf`` for a failed or diverged trial or a target never reached."""
    if not trial.ok:
        return math.inf
    value = getattr(trial, check_objective(objective))
    if value is None or not math.isfinite(value):
        return math.inf
    return -float(value) if objective_mode(objective, metric_mode=metric_mode) == "max" else value


def best_trial(
    trials: Iterable[TrialResult], objective: str, *, metric_mode: Mode
) -> TrialResult | None:
    """The trial with the best ``objective``; ties (a metric on a small validation set moves in
    steps) go to the lower validation loss, then the smaller batch."""
    scored = [
        (
            objective_score(t, objective, metric_mode=metric_mode),
            objective_score(t, "val_loss", metric_mode=metric_mode),
            t.batch,
            t.lr or 0.0,
            t.key,
            t,
        )
        for t in trials
    ]
    scored = [entry for entry in scored if math.isfinite(entry[0])]
    return min(scored, key=lambda entry: entry[:5])[5] if scored else None


def batch_scores(
    trials: Iterable[TrialResult], objective: str, *, metric_mode: Mode
) -> dict[int, float]:
    """Each batch's score: its best trial's (the lr that did best there)."""
    scores: dict[int, float] = {}
    for trial in trials:
        score = objective_score(trial, objective, metric_mode=metric_mode)
        scores[trial.batch] = min(score, scores.get(trial.batch, math.inf))
    return scores


def best_lr_per_batch(
    trials: Iterable[TrialResult], objective: str, *, metric_mode: Mode
) -> dict[int, float]:
    """The lr of the best trial at each batch (batches where every trial failed are left out)."""
    by_batch: dict[int, list[TrialResult]] = {}
    for trial in trials:
        by_batch.setdefault(trial.batch, []).append(trial)
    best: dict[int, float] = {}
    for batch in sorted(by_batch):
        winner = best_trial(by_batch[batch], objective, metric_mode=metric_mode)
        if winner is not None and winner.lr is not None:
            best[batch] = winner.lr
    return best


@dataclass(frozen=True)
class BestChoice:
    """The best (batch, lr) under one objective and its value there."""

    objective: str
    batch: int
    lr: float | None
    value: float
    key: str

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


def best_by_objective(
    trials: Sequence[TrialResult], objectives: Iterable[str], *, metric_mode: Mode
) -> dict[str, BestChoice]:
    """The best choice under each objective that some trial has a value for."""
    best: dict[str, BestChoice] = {}
    for objective in objectives:
        winner = best_trial(trials, objective, metric_mode=metric_mode)
        if winner is not None:
            value = getattr(winner, objective)
            best[objective] = BestChoice(objective, winner.batch, winner.lr, value, winner.key)
    return best


@dataclass(frozen=True)
class StepsFit:
    """``S = s_min (1 + b_crit / B)`` fitted to steps-to-target at each batch.

    ``b_crit`` is ``inf`` when steps fell as 1/B over the whole range (perfect scaling: the
    critical batch is beyond the largest tried) and 0 when larger batches saved no steps.
    """

    s_min: float
    b_crit: float
    e_min: float
    batches: tuple[int, ...]
    steps: tuple[float, ...]
    rms_log_error: float

    def steps_at(self, batch: float) -> float:
        """Predicted steps to the target at ``batch``."""
        return self.s_min + self.e_min / batch

    def to_dict(self) -> dict[str, Any]:
        return {"formula": "S = S_min (1 + B_crit / B)", **fields_dict(self)}


def fit_steps_to_target(batches: Sequence[int], steps: Sequence[float]) -> StepsFit:
    """Fit ``S = S_min + E_min / B`` (``E_min = S_min · B_crit``) by least squares on relative
    errors, with ``S_min ≥ 0`` and ``E_min ≥ 0``. Needs two or more distinct batches."""
    if len(batches) != len(steps):
        raise BadInputError(f"steps: {len(steps)} values for {len(batches)} batches")
    if len(set(batches)) < 2:
        raise BadInputError("batches: the fit needs steps-to-target at two or more batch sizes")
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise BadInputError("steps: expected positive finite steps at positive batches")
    x = 1.0 / b
    # Dividing each row by S_i turns absolute residuals into relative ones.
    design = np.stack([1.0 / s, x / s], axis=1)
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    if e_min < 0:  # larger batches never needed fewer steps: S is flat
        e_min, s_min = 0.0, float(np.sum(1.0 / s) / np.sum(1.0 / s**2))
    elif s_min <= 0:  # steps ∝ 1/B throughout: B_crit is beyond the range
        s_min, e_min = 0.0, float(np.sum(x / s) / np.sum((x / s) ** 2))
    predicted = s_min + e_min * x
    rms = float(np.sqrt(np.mean((np.log(s) - np.log(predicted)) ** 2)))
    b_crit = math.inf if s_min == 0 else e_min / s_min
    return StepsFit(
        s_min=float(s_min),
        b_crit=float(b_crit),
        e_min=float(e_min),
        batches=tuple(int(v) for v in batches),
        steps=tuple(float(v) for v in steps),
        rms_log_error=rms,
    )


@dataclass(frozen=True)
class LrFit:
    """``lr = lr_at_ref · (B / ref_batch)^exponent`` fitted to the best lr at each batch.

    ``tuned`` is false when the sweep did not search the lr (one rule, no grid): the exponent then
    only restates the rule.
    """

    exponent: float
    lr_at_ref: float
    ref_batch: int
    batches: tuple[int, ...]
    lrs: tuple[float, ...]
    tuned: bool

    def lr_at(self, batch: float) -> float:
        return self.lr_at_ref * (batch / self.ref_batch) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        return {"formula": "lr = lr_at_ref · (B / ref_batch)^exponent", **fields_dict(self)}


def fit_lr_exponent(batches: Sequence[int], lrs: Sequence[float], *, tuned: bool = True) -> LrFit:
    """Least squares of log lr on log batch; the reference is the smallest batch."""
    if len(batches) != len(lrs):
        raise BadInputError(f"lrs: {len(lrs)} values for {len(batches)} batches")
    if len(set(batches)) < 2:
        raise BadInputError("batches: the fit needs the best lr at two or more batch sizes")
    log_b = np.log(np.asarray(batches, dtype=float))
    log_lr = np.log(np.asarray(lrs, dtype=float))
    exponent, intercept = np.polyfit(log_b, log_lr, 1)
    ref_batch = int(min(batches))
    return LrFit(
        exponent=float(exponent),
        lr_at_ref=float(math.exp(intercept + exponent * math.log(ref_batch))),
        ref_batch=ref_batch,
        batches=tuple(int(v) for v in batches),
        lrs=tuple(float(v) for v in lrs),
        tuned=tuned,
    )


@dataclass(frozen=True)
class SweepAnalysis:
    """The best choice under each objective, the best lr per batch and the two fits."""

    objective: str
    metric_mode: Mode
    best: dict[str, BestChoice]
    best_lr: dict[int, float]
    steps_fit: StepsFit | None
    lr_fit: LrFit | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "best": {name: choice.to_dict() for name, choice in self.best.items()},
            "best_lr": {str(batch): lr for batch, lr in self.best_lr.items()},
            "fit": {
                "steps_to_target": None if self.steps_fit is None else self.steps_fit.to_dict(),
                "lr_vs_batch": None if self.lr_fit is None else self.lr_fit.to_dict(),
            },
        }


def analyze(
    trials: Sequence[TrialResult],
    *,
    objective: str,
    metric_mode: Mode,
    lr_tuned: bool = False,
) -> SweepAnalysis:
    """Everything :class:`SweepAnalysis` holds, from a sweep's trials."""
    objectives = ["val_metric", "val_loss", *TARGET_OBJECTIVES]
    best = best_by_objective(trials, objectives, metric_mode=metric_mode)
    best_lr = best_lr_per_batch(trials, objective, metric_mode=metric_mode)
    steps_by_batch: dict[int, float] = {}
    for trial in trials:
        if trial.ok and trial.steps_to_target is not None and trial.steps_to_target > 0:
            steps_by_batch[trial.batch] = min(
                trial.steps_to_target, steps_by_batch.get(trial.batch, math.inf)
            )
    steps_fit = None
    if len(steps_by_batch) >= 2:
        ordered = sorted(steps_by_batch)
        steps_fit = fit_steps_to_target(ordered, [steps_by_batch[b] for b in ordered])
    lr_fit = None
    if len(best_lr) >= 2:
        ordered = sorted(best_lr)
        lr_fit = fit_lr_exponent(ordered, [best_lr[b] for b in ordered], tuned=lr_tuned)
    return SweepAnalysis(
        objective=objective,
        metric_mode=metric_mode,
        best=best,
        best_lr=best_lr,
        steps_fit=steps_fit,
        lr_fit=lr_fit,
    )
