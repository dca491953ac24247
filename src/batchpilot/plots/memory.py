"""Memory and throughput against the micro-batch.

``plot_memory`` draws the probes of a max-batch search, the fitted line, the budget and the limit;
``plot_throughput`` draws samples per second with the knee and the best batch;
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
    ax.axhline(result.budget_bytes / _MIB, color="tab:red", linestyle="--", label="budget")
    ax.axhline(result.limit_bytes / _MIB, color="tab:orange", linestyle=":", label="limit")
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
    """Samples per second against micro-batch (log scale), with the knee and the best batch."""
    ax = _axes(ax)
    points = sorted(curve.points)
    ax.plot(
        [p.batch for p in points],
        [p.samples_per_second for p in points],
        marker="o",
        color="tab:purple",
        label="measured (median step)",
    )
    ax.set_xscale("log", base=2)
    best = max(p.samples_per_second for p in points)
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
    ax.set_title(f"throughput ({curve.device})")
    ax.legend(fontsize="small")
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
