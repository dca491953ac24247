"""Plots of the gradient noise scale over training and of goodput against the global batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from batchpilot.measure._noise import NoiseScalePoint, NoiseScaleResult
from batchpilot.plan._goodput import GoodputPlan


def plot_noise_history(
    result: NoiseScaleResult | Sequence[NoiseScalePoint], ax: Axes | None = None
) -> Axes:
    """The running noise-scale estimate over the training steps (log scale); for a measurement
    result, the window's end with the estimate's interval there, the critical batch over the
    window and the measured batch."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    history = result.history if isinstance(result, NoiseScaleResult) else tuple(result)
    finite = [p for p in history if math.isfinite(p.noise_scale) and p.noise_scale > 0]
    if finite:
        ax.plot([p.step for p in finite], [p.noise_scale for p in finite], label="B_simple (EMA)")
        ax.set_yscale("log")
    if isinstance(result, NoiseScaleResult) and finite:
        # the estimate and its interval are read at the window's end, not at the run's
        low, high = result.noise_scale_interval
        end, estimate = result.window_steps or finite[-1].step, result.noise_scale
        if (
            math.isfinite(low)
            and math.isfinite(high)
            and math.isfinite(estimate)
            and 0 < low <= estimate <= high
        ):
            ax.errorbar(
                [end],
                [estimate],
                yerr=[[estimate - low], [high - estimate]],
                fmt="o",
                color="C0",
                capsize=4,
                label="95% interval at the window's end",
            )
        if result.window_steps and result.window_steps < result.steps:
            ax.axvline(result.window_steps, color="0.6", ls="-.", label="window's end")
        if math.isfinite(result.critical_batch) and result.critical_batch > 0:
            ax.axhline(
                result.critical_batch,
                color="C2",
                ls="--",
                label=f"critical batch over the window ≈ {result.critical_batch:.3g}",
            )
        ax.axhline(result.batch, color="0.5", ls=":", label=f"measured at batch {result.batch}")
        ax.set_title(f"gradient noise scale: {result.task}, lr {result.lr:.3g}")
    else:
        ax.set_title("gradient noise scale")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("noise scale (samples)")
    if finite:
        ax.legend(fontsize=8)
    return ax


def plot_goodput(plan: GoodputPlan, ax: Axes | None = None) -> Axes:
    """Goodput, throughput and statistical efficiency against the global batch, each relative to
    its maximum, with the recommended batch marked."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    batches = [p.global_batch for p in plan.points]
    best_goodput = max(p.goodput for p in plan.points)
    best_speed = max(p.samples_per_second for p in plan.points)
    ax.plot(batches, [p.goodput / best_goodput for p in plan.points], "o-", label="goodput")
    ax.plot(
        batches,
        [p.samples_per_second / best_speed for p in plan.points],
        "s--",
        alpha=0.7,
        label="throughput",
    )
    ax.plot(
        batches,
        [p.efficiency / max(p.efficiency for p in plan.points) for p in plan.points],
        "^:",
        alpha=0.7,
        label=f"efficiency (B_noise {plan.noise_scale:.3g})",
    )
    ax.axvline(
        plan.recommended_batch,
        color="C3",
        ls="--",
        label=f"recommended {plan.recommended_batch} "
        f"({plan.recommended.micro_batch} × {plan.recommended.accumulation_steps})",
    )
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("global batch")
    ax.set_ylabel("relative to the best")
    ax.set_title("goodput = throughput × statistical efficiency")
    ax.legend(fontsize=8)
    return ax


__all__ = ["plot_goodput", "plot_noise_history"]
