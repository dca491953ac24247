"""Memory and throughput against the micro-batch.

``plot_memory`` draws the probes of a max-batch search, the fitted line, the budget and the limit;
``plot_throughput`` draws samples per second — timed blocks, medians, the fitted step-time model
with its uncertainty, rejected batches — with the knee and the best batch;
``plot_step_time_residuals`` the fit's relative residuals;
``plot_memory_and_throughput`` puts both side by side.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchpilot.measure._memory_search import MaxBatchResult
from batchpilot.measure._throughput import ThroughputCurve

_MIB = 2**20


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    figure = Figure(figsize=(6, 4))
    return figure.add_subplot()


def plot_memory(result: MaxBatchResult, ax: Axes | None = None) -> Axes:
    """Peak memory of each probe (MiB) against micro-batch, the fitted line and the budget."""
    ax = _axes(ax)
    measured = [p for p in result.probes if p.peak_bytes is not None]
    for estimated, marker, label in ((True, "o", "fake tensors"), (False, "s", "real step")):
        chosen = [p for p in measured if p.estimated == estimated]
        if chosen:
            ax.scatter(
                [p.batch for p in chosen],
                [(p.peak_bytes or 0) / _MIB for p in chosen],
                marker=marker,
                facecolors="none" if estimated else None,
                edgecolors="tab:blue",
                color="tab:blue",
                label=f"probe ({label})",
                zorder=3,
            )
    failed = [p.batch for p in result.probes if p.out_of_memory]
    if failed:
        ax.scatter(
            failed,
            [result.budget_bytes / _MIB] * len(failed),
            marker="x",
            color="tab:red",
            label="out of memory",
            zorder=3,
        )
    top = max([p.batch for p in result.probes] + [result.max_micro_batch])
    xs = [0, top]
    ax.plot(
        xs,
        [(result.fixed_bytes + result.bytes_per_sample * x) / _MIB for x in xs],
        color="tab:blue",
        alpha=0.5,
        label=f"fit: {result.bytes_per_sample / 1024:.1f} KiB/sample",
    )
    highest = max(
        [(p.peak_bytes or 0) for p in measured]
        + [result.fixed_bytes + result.bytes_per_sample * top]
    )
    if result.limit_bytes <= 4 * highest:
        ax.axhline(result.budget_bytes / _MIB, color="tab:red", linestyle="--", label="budget")
        ax.axhline(result.limit_bytes / _MIB, color="tab:orange", linestyle=":", label="limit")
    else:  # a budget far above every probe would flatten them onto the axis: say it in words
        ax.set_ylim(0, highest / _MIB * 1.15)
        ax.text(
            0.02,
            0.97,
            f"budget {result.budget_bytes / 2**30:.1f} GiB, off this scale",
            transform=ax.transAxes,
            va="top",
            fontsize="small",
            color="tab:red",
        )
    ax.axvline(
        result.max_micro_batch,
        color="tab:green",
        linestyle="-.",
        label=f"max micro-batch {result.max_micro_batch}",
    )
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("peak memory of a training step (MiB)")
    ax.set_title(f"memory ({result.mode}, {result.device})")
    ax.legend(fontsize="small")
    return ax


def plot_throughput(curve: ThroughputCurve, ax: Axes | None = None) -> Axes:
    """Samples per second against micro-batch (log scale): every timed block, the medians, the
    fitted step-time model with a ±2 standard-error band, rejected batches, knee and best batch."""
    ax = _axes(ax)
    points = sorted(curve.points)
    batches = [p.batch for p in points]
    if curve.timings is not None:
        for batch, samples in curve.timings.samples().items():
            ax.scatter(
                [batch] * len(samples),
                [batch / s for s in samples],
                s=6,
                color="tab:purple",
                alpha=0.25,
                label="timed blocks" if batch == batches[0] else None,
            )
    rejected = set(curve.model.rejected_batches) if curve.model is not None else set()
    kept = [p for p in points if p.batch not in rejected]
    ax.scatter(
        [p.batch for p in kept],
        [p.samples_per_second for p in kept],
        marker="o",
        color="tab:purple",
        label="median per batch",
        zorder=3,
    )
    if rejected:
        out = [p for p in points if p.batch in rejected]
        ax.scatter(
            [p.batch for p in out],
            [p.samples_per_second for p in out],
            marker="x",
            color="tab:red",
            label="rejected by the fit",
            zorder=4,
        )
    if curve.model is not None:
        grid = sorted({*batches, *(2**k for k in range(batches[-1].bit_length()))})
        grid = [b for b in grid if batches[0] <= b <= batches[-1]]
        fitted = [curve.samples_per_second_at(b) for b in grid]
        band = [2 * curve.relative_uncertainty_at(b) for b in grid]
        ax.plot(grid, fitted, color="black", label="fit: b / (α + β·b)")
        ax.fill_between(
            grid,
            [s / (1 + u) for s, u in zip(fitted, band, strict=True)],
            [s / max(1 - u, 0.05) for s, u in zip(fitted, band, strict=True)],
            color="black",
            alpha=0.12,
            label="±2 standard errors",
        )
        best = max(fitted)
    else:
        best = max(p.samples_per_second for p in points)
    ax.set_xscale("log", base=2)
    ax.axhline(
        curve.knee_fraction * best,
        color="grey",
        linestyle=":",
        label=f"{curve.knee_fraction:.0%} of best",
    )
    ax.axvline(
        curve.knee_batch, color="tab:green", linestyle="-.", label=f"knee {curve.knee_batch}"
    )
    ax.axvline(
        curve.best_batch, color="tab:orange", linestyle="--", label=f"best {curve.best_batch}"
    )
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("samples per second")
    threads = "" if curve.conditions is None else f", {curve.conditions.threads} thread(s)"
    ax.set_title(f"throughput ({curve.device}{threads})")
    ax.legend(fontsize="small")
    return ax


def plot_step_time_residuals(curve: ThroughputCurve, ax: Axes | None = None) -> Axes:
    """Relative residual of every batch's median step time against the fit, rejected in red."""
    ax = _axes(ax)
    if curve.model is None:
        ax.set_title("no step-time model")
        return ax
    residuals = sorted(curve.model.relative_residuals.items())
    rejected = set(curve.model.rejected_batches)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.scatter(
        [b for b, _ in residuals],
        [100 * r for _, r in residuals],
        color=["tab:red" if b in rejected else "tab:purple" for b, _ in residuals],
        zorder=3,
    )
    scale = curve.model.residual_scale
    if scale == scale:  # not NaN
        for sign in (1, -1):
            ax.axhline(sign * 200 * scale, color="grey", linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch")
    ax.set_ylabel("median step time vs fit (%)")
    ax.set_title(f"fit residuals (scale {100 * scale:.1f} %; red: rejected)")
    return ax


def plot_memory_and_throughput(
    memory: MaxBatchResult | None, curve: ThroughputCurve | None
) -> Figure:
    """Memory and throughput side by side (either may be missing)."""
    panels = [p for p in (memory, curve) if p is not None]
    if not panels:
        raise ValueError("plot_memory_and_throughput: nothing to draw")
    figure = Figure(figsize=(6 * len(panels), 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    index = 0
    if memory is not None:
        plot_memory(memory, axes[index])
        index += 1
    if curve is not None:
        plot_throughput(curve, axes[index])
    return figure


__all__ = ["plot_memory", "plot_memory_and_throughput", "plot_throughput"]
