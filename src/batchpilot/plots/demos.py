"""Plots of the seed demonstrations: one ``plot_*(result, ax=None) -> Axes`` per demo, and
:func:`plot_demo` that lays out a demo's figure for the command line.

>>> from batchpilot.demos.sketch import run_sketch
>>> ax = plot_sketch(run_sketch(quick=True, epochs=10))
>>> len(ax.lines)  # one curve per batch size
4
"""

from __future__ import annotations

import textwrap
from typing import Literal

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchpilot.demos.decay_vs_batch import DecayVsBatchResult
from batchpilot.demos.playground import PlaygroundResult
from batchpilot.demos.sketch import SketchResult
from batchpilot.demos.xor import XorResult

DemoResult = XorResult | PlaygroundResult | SketchResult | DecayVsBatchResult

_RUN_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple")


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.5))
    return ax


def plot_xor(result: XorResult, ax: Axes | None = None) -> Axes:
    """Loss on all 16 samples against iterations, full batch and mini-batch, log scale; each
    detected plateau is drawn as a thick translucent bar at its level."""
    ax = _axes(ax)
    for run, color in zip(result.runs, _RUN_COLORS, strict=False):
        full = run is result.full_batch
        label = f"batch {run.batch}{' (full-batch GD)' if full else ' (mini-batch SGD)'}"
        ax.plot(run.curve_iterations, run.curve_losses, color=color, linewidth=1.2, label=label)
        for k, plateau in enumerate(run.plateaus):
            ax.plot(
                [plateau.start_iteration, plateau.end_iteration],
                [plateau.loss, plateau.loss],
                color=color,
                linewidth=7,
                alpha=0.25,
                solid_capstyle="butt",
                label=f"plateaus of batch {run.batch} ({len(run.plateaus)})" if k == 0 else None,
            )
    ax.axhline(result.fit_loss, color="0.4", linestyle=":", linewidth=1, label="fitted")
    ax.set_yscale("log")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("MSE on all 16 patterns")
    ax.set_title(
        f"4-input XOR, lr {result.full_batch.lr:g}, same initialisation (seed {result.seed})"
    )
    ax.legend(fontsize="small", loc="lower left")
    ax.grid(True, which="both", alpha=0.2)
    return ax


def plot_playground(
    result: PlaygroundResult,
    ax: Axes | None = None,
    *,
    metric: Literal["accuracy", "loss"] = "accuracy",
) -> Axes:
    """Held-out accuracy (or loss) after every epoch at batch 1 and batch 30."""
    ax = _axes(ax)
    for run, color in zip(result.runs, _RUN_COLORS[1::-1], strict=False):
        values = run.curve_accuracies if metric == "accuracy" else run.curve_losses
        ax.plot(run.curve_epochs, values, color=color, linewidth=1.2, label=f"batch {run.batch}")
        if metric == "accuracy" and run.epochs_to_fit is not None:
            ax.axvline(run.epochs_to_fit, color=color, linestyle="--", linewidth=0.8)
    if metric == "accuracy":
        ax.axhline(
            result.target_accuracy,
            color="0.4",
            linestyle=":",
            linewidth=1,
            label=f"fitted ({result.target_accuracy:.0%})",
        )
        ax.set_ylim(top=1.01)  # keep the target line in view
        ax.set_ylabel("held-out accuracy")
    else:
        ax.set_ylabel("held-out loss (BCE)")
    ax.set_xlabel("epoch")
    ax.set_title(f"Spiral, lr {result.small.lr:g}: held-out {metric}")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.2)
    return ax


def plot_sketch(result: SketchResult, ax: Axes | None = None) -> Axes:
    """The six training points (numbered), the test points a and b, and the function drawn at
    each batch size."""
    ax = _axes(ax)
    for run, color in zip(result.runs, _RUN_COLORS, strict=False):
        ax.plot(
            result.grid,
            run.curve,
            color=color,
            linewidth=2.0 if run is result.runs[-1] else 1.2,
            label=f"batch {run.batch} (cos {run.mean_cosine_to_full:.2f})",
        )
    ax.scatter(result.train_x, result.train_y, color="black", zorder=3, label="training 1–6")
    for k, (x, y) in enumerate(zip(result.train_x, result.train_y, strict=True), start=1):
        ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(5, 5))
    ax.scatter(
        result.test_x,
        result.test_y,
        facecolors="none",
        edgecolors="black",
        zorder=3,
        label="test a, b",
    )
    for name, x, y in zip("ab", result.test_x, result.test_y, strict=False):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -12))
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    ax.set_title(f"Six points, {result.epochs} epochs at lr {result.lr:g}")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.2)
    return ax


def plot_decay_vs_batch(
    result: DecayVsBatchResult,
    ax: Axes | None = None,
    *,
    x: Literal["epochs", "updates"] = "epochs",
) -> Axes:
    """Training loss against epochs (or parameter updates) for the three schedules; the
    milestones are marked when the x axis is epochs."""
    ax = _axes(ax)
    styles = {"decay lr": "-", "increase batch": "--", "constant": ":"}
    for run, color in zip(result.runs, _RUN_COLORS, strict=False):
        xs = run.curve_epochs if x == "epochs" else run.curve_updates
        ax.plot(
            xs,
            run.train_losses,
            color=color,
            linestyle=styles[run.kind],
            marker="o",
            markersize=3,
            label=f"{run.kind} ({run.updates} updates)",
        )
    if x == "epochs":
        for milestone in result.milestones:
            ax.axvline(milestone, color="0.6", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("epoch" if x == "epochs" else "parameter updates")
    ax.set_ylabel("training loss")
    ax.set_title(f"digits: lr ÷{result.factor} or batch ×{result.factor} at each milestone")
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.2)
    return ax


def plot_demo(result: DemoResult) -> Figure:
    """The figure the command line saves for a demo (two panels where two views help)."""
    if isinstance(result, XorResult):
        figure, ax = plt.subplots(figsize=(8, 4.8))
        plot_xor(result, ax)
    elif isinstance(result, PlaygroundResult):
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        plot_playground(result, left, metric="accuracy")
        plot_playground(result, right, metric="loss")
    elif isinstance(result, SketchResult):
        figure, ax = plt.subplots(figsize=(8, 4.8))
        plot_sketch(result, ax)
    else:
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        plot_decay_vs_batch(result, left, x="epochs")
        plot_decay_vs_batch(result, right, x="updates")
    figure.suptitle(textwrap.fill(f"{result.name}: {result.verdict}", 110), fontsize="medium")
    figure.tight_layout()
    return figure


__all__ = ["plot_decay_vs_batch", "plot_demo", "plot_playground", "plot_sketch", "plot_xor"]
