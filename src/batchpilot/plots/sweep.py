"""Plots of a batch-size sweep: validation curves per batch, steps-to-target with its fit, best lr.

Each takes a :class:`~batchpilot.sweep.SweepResult` and draws on ``ax`` (a new figure if none).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter

from batchpilot.errors import BadInputError
from batchpilot.plots import save_figure
from batchpilot.sweep.runner import SweepResult
from batchpilot.sweep.trials import TrialResult

CurveAxis = Literal["steps", "samples", "seconds"]
_X_LABELS = {
    "steps": "optimizer steps",
    "samples": "training samples",
    "seconds": "training time (s, validation excluded)",
}


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.4))
    return ax


def _batch_axis(ax: Axes, batches: list[int]) -> None:
    """A log batch axis labelled at the batches tried (plain numbers, no minor labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ticks = sorted(set(batches))
    if ticks:
        ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.set_xlabel("batch size")


def _best_trials(result: SweepResult) -> list[TrialResult]:
    """The trial at each batch's best lr (the one the sweep's objective preferred there)."""
    chosen = []
    for batch, lr in sorted(result.analysis.best_lr.items()):
        for trial in result.trials:
            if trial.batch == batch and trial.lr == lr and trial.curve:
                chosen.append(trial)
                break
    return chosen


def plot_loss_curves(
    result: SweepResult, *, x: CurveAxis = "steps", ax: Axes | None = None
) -> Axes:
    """Validation loss of each batch (at its best lr) against steps, samples or training time."""
    if x not in _X_LABELS:
        raise BadInputError(f"x: expected one of {', '.join(_X_LABELS)}, got {x!r}")
    ax = _axes(ax)
    trials = _best_trials(result)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(trials), 1)))
    # Steps and samples span orders of magnitude across batch sizes: log axes, without step 0.
    log_x = x != "seconds"
    losses = []
    for trial, colour in zip(trials, colours, strict=False):
        points = [p for p in trial.curve if not (log_x and p.step == 0)]
        xs = [getattr(point, "step" if x == "steps" else x) for point in points]
        ys = [point.val_loss for point in points]
        losses += [y for y in ys if math.isfinite(y)]
        ax.plot(xs, ys, marker=".", color=colour, label=f"B={trial.batch}, lr={trial.lr:.3g}")
    target = result.config.get("budget", {}).get("target_loss")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("validation loss")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 5:
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"{result.config.get('task_name', 'task')}: validation loss per batch size")
    if trials:
        ax.legend(fontsize="small")
    return ax


def plot_steps_to_target(result: SweepResult, ax: Axes | None = None) -> Axes:
    """Steps to the target against batch on log-log axes, with ``S = S_min (1 + B_crit / B)``."""
    ax = _axes(ax)
    reached = [
        (t.batch, t.steps_to_target)
        for t in result.trials
        if t.ok and t.steps_to_target is not None
    ]
    if not reached:
        ax.text(
            0.5,
            0.5,
            "no trial reached a target\n(give the sweep a target loss or metric)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return ax
    ax.scatter(
        [batch for batch, _ in reached],
        [steps for _, steps in reached],
        color="lightgrey",
        label="every trial",
        zorder=2,
    )
    fit = result.analysis.steps_fit
    if fit is not None:
        ax.scatter(fit.batches, fit.steps, color="C0", label="best lr per batch", zorder=3)
        grid = np.geomspace(min(fit.batches) / 1.5, max(fit.batches) * 1.5, 100)
        b_crit = "∞" if math.isinf(fit.b_crit) else f"{fit.b_crit:.3g}"
        ax.plot(
            grid,
            [fit.steps_at(b) for b in grid],
            color="C1",
            label=f"S_min (1 + B_crit/B): S_min={fit.s_min:.3g}, B_crit={b_crit}",
        )
        # Mark B_crit where it falls near the batches tried, not stretch the axis to it.
        if min(fit.batches) / 4 <= fit.b_crit <= max(fit.batches) * 4:
            ax.axvline(fit.b_crit, color="C1", linestyle=":", linewidth=1)
    _batch_axis(ax, [batch for batch, _ in reached])
    ax.set_yscale("log")
    ax.set_ylabel("steps to target")
    ax.set_title("steps to target vs batch size")
    ax.legend(fontsize="small")
    return ax


def plot_lr_vs_batch(result: SweepResult, ax: Axes | None = None) -> Axes:
    """Every lr tried (grey), the best per batch, and the fitted ``lr ∝ B^α``."""
    ax = _axes(ax)
    tried = [(t.batch, t.lr) for t in result.trials if t.lr is not None]
    ax.scatter(
        [batch for batch, _ in tried],
        [lr for _, lr in tried],
        color="lightgrey",
        label="tried",
        zorder=2,
    )
    best = result.analysis.best_lr
    ax.scatter(list(best), list(best.values()), color="C0", label="best per batch", zorder=3)
    fit = result.analysis.lr_fit
    if fit is not None:
        grid = np.geomspace(min(fit.batches), max(fit.batches), 50)
        note = "" if fit.tuned else " (set by the rule)"
        ax.plot(
            grid,
            [fit.lr_at(b) for b in grid],
            color="C1",
            label=f"lr ∝ B^{fit.exponent:.2f}{note}",
        )
    _batch_axis(ax, [batch for batch, _ in tried])
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("best learning rate vs batch size")
    ax.legend(fontsize="small")
    return ax


def save_sweep_plots(result: SweepResult, folder: Path) -> list[Path]:
    """Write every sweep plot as a PNG in ``folder``; the paths written."""
    paths = []
    drawings = [
        *(
            (f"sweep_loss_vs_{x}.png", lambda ax, x=x: plot_loss_curves(result, x=x, ax=ax))
            for x in ("steps", "samples", "seconds")
        ),
        ("sweep_steps_to_target.png", lambda ax: plot_steps_to_target(result, ax=ax)),
        ("sweep_lr_vs_batch.png", lambda ax: plot_lr_vs_batch(result, ax=ax)),
    ]
    for filename, draw in drawings:
        figure, ax = plt.subplots(figsize=(6.4, 4.4))
        try:
            draw(ax)
            paths.append(save_figure(figure, folder / filename))
        finally:
            plt.close(figure)
    return paths


__all__ = ["plot_loss_curves", "plot_lr_vs_batch", "plot_steps_to_target", "save_sweep_plots"]
