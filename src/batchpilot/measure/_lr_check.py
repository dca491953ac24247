"""Checking an lr at the batch it will train with: short runs on a √2 grid around the rule's lr.

A scaling rule (linear, square-root, noise-aware, Adam's) carries an lr measured at one batch to
another, and every input to it is a measurement with its own noise: the range test's lr, the noise
scale. :func:`check_lr` trains the new batch for the steps the plan predicts at the grid point
nearest the rule's lr and at its neighbours (``×√2``, ``÷√2``), with a few seeds each, and extends
the grid while the best candidate sits at its edge, so the optimum it reports is interior. The
grid is fixed (powers of √2, as in :func:`~batchpilot.measure._lr_range.verification_candidates`),
so two runs whose rule lrs differ a little propose the same lrs, and adjacent answers differ by at
most ×1.41.

The decision is a stated rule, not the accident of one seed: every lr whose median loss is at or
below the best candidate's worst seed ties with the best, and the grid point at the centre of the
tie is chosen (the rule's own point when it is there). A flat optimum, where several lrs train
alike, answers its middle whatever noise ranked first; a sharp one answers its best (Shallue et
al. 2019 re-tune the lr at every batch for the same reason: the best constant lr at a batch is
found by training, not by formula).

>>> round(grid_point(0.1), 4), round(grid_point(0.3), 4)
(0.0884, 0.3536)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.measure._lr_range import CandidateCheck, _more_seeds
from batchpilot.plan._lr_rule import lr_for_batch
from batchpilot.task import Task

GRID_FACTOR = math.sqrt(2.0)
# How far the grid may extend past its first three points when the best sits at an edge.
MAX_EXTENSIONS = 3


def grid_point(lr: float) -> float:
    """The power of √2 nearest ``lr`` in log scale."""
    exponent = round(math.log(check_positive_float("lr", lr)) / math.log(GRID_FACTOR))
    return float(GRID_FACTOR**exponent)


@dataclass(frozen=True)
class LrTrial:
    """One candidate lr: its loss per seed (validation loss after the run, or the mean training
    loss over its last tenth), their median, and whether a seed diverged."""

    lr: float
    losses: tuple[float, ...]
    median: float
    diverged: bool


@dataclass(frozen=True)
class LrCheck:
    """Short runs at one batch around a rule's lr, and the lr they choose."""

    global_batch: int
    micro_batch: int
    accumulation_steps: int
    steps: int
    seeds: int
    rule_lr: float
    rule_grid_lr: float
    trials: tuple[LrTrial, ...]
    best_lr: float | None
    lr: float
    kept_rule: bool
    reason: str
    split: str
    seconds: float
    complete: bool

    @property
    def stable(self) -> bool:
        """Every seed at the chosen lr trained without diverging (at a constant lr, no warm-up)."""
        return any(t.lr == self.lr and not t.diverged for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trials"] = [asdict(trial) | {"losses": list(trial.losses)} for trial in self.trials]
        data["stable"] = self.stable
        return data


def with_adam_scaling(task: Task, *, ref_batch: int, batch: int) -> Task:
    """``task`` whose optimizer factory also rescales each group's betas and eps from the values
    the factory sets at ``ref_batch`` to ``batch`` (Malladi et al. 2022; beyond the rule's reach
    they stay as they are and only the lr moves, see :func:`~batchpilot.plan.lr_for_batch`)."""
    make = task.optimizer

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        built = make(params, lr)
        for group in built.param_groups:
            if "betas" in group and "eps" in group:
                scaled = lr_for_batch(
                    group["lr"],
                    ref_batch=ref_batch,
                    batch=batch,
                    rule="adam",
                    betas=tuple(group["betas"]),
                    eps=group["eps"],
                    reduction=task.reduction,
                )
                if scaled.betas is not None and scaled.eps is not None:
                    group["betas"], group["eps"] = scaled.betas, scaled.eps
        return built

    return replace(task, optimizer=optimizer)


def _exponent(lr: float) -> int:
    return round(math.log(lr) / math.log(GRID_FACTOR))


def _decide(trials: dict[float, LrTrial], best: LrTrial, centre: float) -> tuple[float, str]:
    """The centre of the tie: every lr whose median is within the best's reach (at or below the
    best's worst seed) ties with it; the grid point halfway between the tie's lowest and highest
    lr is chosen (of two middle points, the one with the lower median)."""
    reach = max(best.losses)
    tied = sorted(t.lr for t in trials.values() if math.isfinite(t.median) and t.median <= reach)
    low, high = _exponent(tied[0]), _exponent(tied[-1])
    middle = [k for k in {math.floor((low + high) / 2), math.ceil((low + high) / 2)}]
    by_exponent = {_exponent(t.lr): t for t in trials.values()}
    choices = [by_exponent[k] for k in middle if k in by_exponent]
    chosen = min(choices, key=lambda t: (t.median, t.lr)) if choices else best
    if len(tied) == 1:
        reason = (
            f"the rule's {centre:.3g} trained best of {len(trials)} lrs"
            if chosen.lr == centre
            else f"{chosen.lr:.3g} beat every other lr in every seed (median {chosen.median:.4g}; "
            f"the rule's {centre:.3g}: {trials[centre].median:.4g})"
        )
    else:
        reason = (
            f"{len(tied)} lrs from {tied[0]:.3g} to {tied[-1]:.3g} tie with the best "
            f"{best.lr:.3g} (medians at or below its worst seed, {reach:.4g}); the tie's centre "
            f"{chosen.lr:.3g} is chosen"
            + (", the rule's own" if chosen.lr == centre else f" (the rule gave {centre:.3g})")
        )
    return chosen.lr, reason


def check_lr(
    task: Task,
    *,
    rule_lr: float,
    micro_batch: int,
    accumulation_steps: int = 1,
    steps: int,
    seeds: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    time_budget_seconds: float | None = None,
    on_run: Callable[[int], None] | None = None,
) -> LrCheck:
    """Train ``task`` at ``micro_batch × accumulation_steps`` for ``steps`` steps at the √2-grid
    point nearest ``rule_lr`` and its two neighbours (``seeds`` seeds each, from ``seed``), then
    one grid point further while the best is at an edge of what was tried (up to
    ``MAX_EXTENSIONS`` times, never past an lr that diverged), and choose by the rule in the
    module docstring. ``time_budget_seconds`` stops the extensions (and further candidates) once
    spent: the result says whether the grid was ``complete``. ``on_run(runs_done)`` after each
    candidate.
    """
    check_positive_float("rule_lr", rule_lr)
    check_positive_int("steps", steps)
    check_positive_int("seeds", seeds)
    start = time.perf_counter()
    centre = grid_point(rule_lr)
    trials: dict[float, LrTrial] = {}
    complete = True

    def out_of_time() -> bool:
        return time_budget_seconds is not None and time.perf_counter() - start > time_budget_seconds

    def run(lr: float) -> None:
        check = _more_seeds(
            task,
            CandidateCheck(lr, (), math.nan, None, False, ()),
            list(range(seed, seed + seeds)),
            micro_batch=micro_batch,
            accumulation_steps=accumulation_steps,
            steps=steps,
            device=device,
        )
        finite = [loss for loss in check.losses if math.isfinite(loss)]
        median = math.inf if check.diverged or not finite else check.loss
        trials[lr] = LrTrial(lr, check.losses, median, check.diverged)
        if on_run is not None:
            on_run(len(trials))

    for k in (0, 1, -1):
        if k and out_of_time():
            complete = False
            break
        run(centre * GRID_FACTOR**k)
    for _ in range(MAX_EXTENSIONS):
        best = min(trials.values(), key=lambda t: (t.median, t.lr))
        if not math.isfinite(best.median):
            below = min(trials) / GRID_FACTOR  # every candidate diverged: go lower
        elif best.lr == max(trials) and not any(t.diverged for t in trials.values()):
            below = best.lr * GRID_FACTOR
        elif best.lr == min(trials):
            below = best.lr / GRID_FACTOR
        else:
            break
        if out_of_time():
            complete = False
            break
        run(below)
    ranked = sorted(trials.values(), key=lambda t: (t.median, t.lr))
    best = ranked[0]
    best_lr = best.lr if math.isfinite(best.median) else None
    if best_lr is None:
        lr, reason = centre, "every candidate diverged: the rule's lr is kept, unverified"
    else:
        lr, reason = _decide(trials, best, centre)
    kept = lr == centre
    return LrCheck(
        global_batch=micro_batch * accumulation_steps,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        steps=steps,
        seeds=seeds,
        rule_lr=rule_lr,
        rule_grid_lr=centre,
        trials=tuple(sorted(trials.values(), key=lambda t: t.lr)),
        best_lr=best_lr,
        lr=lr,
        kept_rule=kept,
        reason=reason,
        split="val" if task.val_data is not None else "train",
        seconds=time.perf_counter() - start,
        complete=complete,
    )


__all__ = ["GRID_FACTOR", "LrCheck", "LrTrial", "check_lr", "grid_point", "with_adam_scaling"]
