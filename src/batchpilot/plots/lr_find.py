"""The range-test curve with its suggestions marked (:func:`plot_lr_find`), and the lr check at
the recommended batch (:func:`plot_lr_check`).

>>> from batchpilot.loading import load_task
>>> from batchpilot.measure._lr_range import find_lr
>>> result = find_lr(load_task(example="spiral"), micro_batch=10, steps=40, repeats=2)
>>> ax = plot_lr_find(result)
>>> ax.get_xscale()
'log'
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from batchpilot.measure._lr_check import LrCheck
from batchpilot.measure._lr_range import LRFinderResult

_COLORS = {"steepest": "tab:red", "valley": "tab:green", "minimum_over_10": "tab:purple"}


def plot_lr_find(result: LRFinderResult, ax: Axes | None = None) -> Axes:
    """Loss against lr: each repeat's raw losses (faint), the smoothed mean curve, a vertical line
    per suggestion (the default one solid, with its interquartile range over repeats shaded),
    where the test stopped on divergence, and the verified lr when verification ran."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in result.runs:
        ax.plot(run.lrs, run.losses, color="0.7", linewidth=0.7, alpha=0.6)
    ax.plot([], [], color="0.7", linewidth=0.7, label=f"raw loss ({len(result.runs)} repeats)")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2.0, label="smoothed mean")
    for name, lr in result.suggestions.items():
        if lr is None:
            continue
        default = name == result.method and result.verification is None
        ax.axvline(
            lr,
            color=_COLORS.get(name, "black"),
            linestyle="-" if default else "--",
            linewidth=1.8 if default else 1.0,
            label=f"{name}{' (suggestion)' if default else ''}: {lr:.3g}",
        )
    spread = result.spread.get(result.method, {})
    q1, q3 = spread.get("q1"), spread.get("q3")
    if result.suggestion is not None and q1 is not None and q3 is not None and q3 > q1:
        ax.axvspan(
            q1, q3, color=_COLORS.get(result.method, "black"), alpha=0.12, label="IQR over repeats"
        )
    if result.diverged_at is not None:
        ax.axvline(
            result.diverged_at, color="black", linestyle=":", linewidth=1.0, label="diverged"
        )
    verification = result.verification
    if verification is not None and verification.best_lr is not None:
        ax.axvline(
            verification.best_lr,
            color="tab:green",
            linestyle="-",
            linewidth=2.4,
            alpha=0.8,
            label=(
                f"verified (suggestion): {verification.best_lr:.3g}, best of "
                f"{len(verification.candidates)} lrs trained {verification.steps} steps"
            ),
        )
    if result.mode == "exponential":
        ax.set_xscale("log")
    ax.set_ylim(*_loss_limits(result))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (per sample)")
    title = (
        f"LR range test: batch {result.global_batch}"
        + (
            f" ({result.micro_batch} × {result.accumulation_steps})"
            if result.accumulation_steps > 1
            else ""
        )
        + f", {len(result.runs)} repeats"
    )
    ax.set_title(title)
    if result.message:
        ax.text(0.02, 0.02, "no descent found", transform=ax.transAxes, color="tab:red")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(True, which="both", alpha=0.2)
    return ax


def _loss_limits(result: LRFinderResult) -> tuple[float, float]:
    """Keep the descent readable: the blow-up at the end is cut at 1.5 × the starting loss."""
    values = np.array([v for run in result.runs for v in run.losses] + list(result.smoothed))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return 0.0, 1.0
    start = result.smoothed[0] if result.smoothed else float(values[0])
    low = float(values.min())
    high = min(float(values.max()), 1.5 * start if start > 0 else float(values.max()))
    if not math.isfinite(high) or high <= low:
        high = low + 1.0
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def plot_lr_check(check: LrCheck, ax: Axes | None = None) -> Axes:
    """The lr check at the recommended batch: each seed's final loss per lr (dots), their median
    (line; shorter horizons the check ran first, faint), the rule's grid point and the chosen lr;
    a diverged lr is marked at the top."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    if check.score == "steps to target":
        return _plot_steps_to_target(check, ax)
    finite = [v for t in check.trials for v in t.losses if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    shorter = sorted({t.steps for t in check.earlier})
    for steps in shorter:  # the shorter horizons, faint
        level = [t for t in check.earlier if t.steps == steps and math.isfinite(t.median)]
        ax.plot(
            [t.lr for t in level],
            [t.median for t in level],
            color="tab:blue",
            alpha=0.3,
            linestyle=":",
            marker=".",
            label=f"median after {steps} steps",
        )
    for trial in check.trials:
        values = [v for v in trial.losses if math.isfinite(v)]
        ax.scatter([trial.lr] * len(values), values, color="0.5", s=14, zorder=2)
        if trial.diverged:
            ax.scatter([trial.lr], [top], marker="x", color="tab:red", s=40, zorder=3)
    steady = [t for t in check.trials if math.isfinite(t.median)]
    ax.plot(
        [t.lr for t in steady],
        [t.median for t in steady],
        color="tab:blue",
        label=f"median after {check.steps} steps",
    )
    _mark_rule_and_choice(check, ax)
    ax.set_ylabel(f"{check.split} loss after {check.steps} steps")
    ax.set_title(f"lr check at batch {check.global_batch}")
    ax.legend(loc="best", fontsize=8)
    return ax


def _mark_rule_and_choice(check: LrCheck, ax: Axes) -> None:
    """The rule's grid point (dashed) and the chosen lr (green) on a log lr axis."""
    ax.axvline(check.rule_grid_lr, color="0.4", linestyle="--", label=f"rule {check.rule_lr:.3g}")
    ax.axvline(check.lr, color="tab:green", linewidth=2, label=f"chosen {check.lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (constant)")


def _plot_steps_to_target(check: LrCheck, ax: Axes) -> Axes:
    """The lr check scored by steps to the target loss: each seed's steps per lr (dots; a seed
    that did not get there within the horizon, a triangle at the top; a diverged lr, a cross),
    their median (line), the rule's grid point and the chosen lr."""
    finite = [v for t in check.trials for v in t.reached if math.isfinite(v)]
    top = check.steps * 1.05 if finite else 1.0
    for trial in check.trials:
        values = [v for v in trial.reached if math.isfinite(v)]
        ax.scatter([trial.lr] * len(values), values, color="0.5", s=14, zorder=2)
        if trial.diverged:
            ax.scatter([trial.lr], [top], marker="x", color="tab:red", s=40, zorder=3)
        elif len(values) < len(trial.reached):
            ax.scatter([trial.lr], [top], marker="^", color="tab:orange", s=30, zorder=3)
    steady = [t for t in check.trials if math.isfinite(t.median_steps)]
    ax.plot(
        [t.lr for t in steady],
        [t.median_steps for t in steady],
        color="tab:blue",
        marker=".",
        label="median steps to the target",
    )
    ax.axhline(check.steps, color="0.7", linestyle=":", label=f"horizon {check.steps} steps")
    _mark_rule_and_choice(check, ax)
    target = "the target" if check.target_loss is None else f"{check.target_loss:.4g}"
    ax.set_ylabel(f"steps to {check.split} loss {target}")
    ax.set_title(f"lr check at batch {check.global_batch}: steps to the noise window's loss")
    ax.legend(loc="best", fontsize=8)
    return ax


__all__ = ["plot_lr_check", "plot_lr_find"]
