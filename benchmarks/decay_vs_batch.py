"""Decaying the learning rate vs increasing the batch size vs adaptive batch, side by side.

Smith et al. (2018, arXiv 1711.00489): where a schedule divides the lr by k, multiplying the batch
by k keeps the SGD noise scale lr·N/(B(1−m)) — and reaches the same loss with far fewer optimizer
updates. On a built-in example (default ``digits``: a CNN with BatchNorm, SGD with momentum 0.9),
three runs per seed from the same initialisation and data order:

- **lr decay** (the anchor): a fixed batch, the lr multiplied by ``gamma`` at the milestones;
- **batch increase**: :class:`batchpilot.training._schedules.BatchIncrease` of the same decay — the batch
  multiplied by ``1/gamma`` at the milestones (the lr takes over once the batch reaches its cap);
- **adaptive**: :class:`batchpilot.training._adaptive.AdaptiveBatch` — the batch grows while the measured
  gradient noise scale says so, the lr follows the AdaScale gain, and the same decay is applied at
  the gain-weighted progress; the run ends when that progress reaches the same number of epochs.
  Each step runs as two micro-batches (the noise-scale estimator needs two gradients per step),
  so BatchNorm normalises over half-batches in this run only.

Printed per method: final validation loss and accuracy (mean ± std over seeds), optimizer updates,
epochs of data processed, training wall time, and the ratios to lr decay. Goal (issue 8): batch
increase matches lr decay's validation loss within noise with at least 2× fewer updates.

    .venv/bin/python benchmarks/decay_vs_batch.py              # the full run (a few minutes)
    .venv/bin/python benchmarks/decay_vs_batch.py --seeds 1 --epochs 6   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from batchpilot.data import batch_size as samples_in
from batchpilot.loading import load_task
from batchpilot.measure._noise import GradientNoiseScale, NoiseScaleWarning
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._adaptive import AdaptiveBatch
from batchpilot.training._loop import evaluate
from batchpilot.training._runtime import BatchRuntime
from batchpilot.training._sampler import ScheduledBatchSampler
from batchpilot.training._schedules import (
    BatchIncrease,
    BatchLimits,
    BatchSetting,
    LrDecaySchedule,
    MultiStepDecay,
)


@dataclass(frozen=True)
class RunResult:
    method: str
    seed: int
    val_loss: float
    val_metric: float | None
    updates: int
    epochs: float
    seconds: float
    final_batch: int
    final_lr: float


def _train(
    task: Task,
    *,
    method: str,
    seed: int,
    base_lr: float,
    next_setting: Callable[[float], BatchSetting],
    finished: Callable[[int], bool],
    adaptive: AdaptiveBatch | None = None,
) -> RunResult:
    """One run: the batch and lr of each step come from ``next_setting(epoch_progress)``."""
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model()
        model.train()
        optimizer = task.make_optimizer(model.parameters(), base_lr)
        sampler = ScheduledBatchSampler(task.train_data, batch_size=1, seed=seed)  # type: ignore[arg-type]
        runtime = BatchRuntime(optimizer, base_lr=base_lr, sampler=sampler)
        loader = DataLoader(task.train_data, batch_sampler=sampler, collate_fn=task.collate_fn)
        noise = None
        if adaptive is not None:
            noise = GradientNoiseScale(model, dataset_size=task.train_size, warn_batchnorm=False)
        updates, samples = 0, 0
        setting = next_setting(0.0)
        start = time.perf_counter()
        while not finished(updates):
            iterator = iter(loader)
            while not finished(updates):
                setting = next_setting(sampler.epoch_progress)
                if noise is not None:
                    # Two micro-batches per step: the estimator compares them with their mean.
                    runtime.max_micro_batch = max(1, math.ceil(setting.batch / 2))
                runtime.apply(setting)
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                optimizer.zero_grad(set_to_none=True)

                def backward(micro: Any, weight: float) -> float:
                    loss = task.compute_loss(model, micro)
                    (loss * weight).backward()
                    if noise is not None:
                        noise.record_micro_batch(samples_in(micro))
                    return float(loss.detach())

                runtime.run_step(batch, backward)
                if noise is not None and adaptive is not None:
                    noise.finish_step()
                optimizer.step()
                if noise is not None and adaptive is not None:
                    # Read the estimate only at decisions: reading it synchronises.
                    due = (adaptive.steps + 1) % adaptive.check_every == 0
                    adaptive.update(noise.estimate() if due else adaptive.noise_scale)
                updates += 1
                samples += samples_in(batch)
        seconds = time.perf_counter() - start
        final = evaluate(task, model)
    return RunResult(
        method=method,
        seed=seed,
        val_loss=final.loss,
        val_metric=final.metric,
        updates=updates,
        epochs=samples / task.train_size,
        seconds=seconds,
        final_batch=setting.batch,
        final_lr=setting.lr,
    )


def run_method(task: Task, method: str, seed: int, args: argparse.Namespace) -> RunResult:
    n = task.train_size
    decay = MultiStepDecay(milestones=tuple(args.milestones), gamma=args.gamma)
    limits = BatchLimits(dataset_size=n, max_batch=args.max_batch)
    epochs = args.epochs

    def epochs_done(progress: Callable[[], float]) -> Callable[[int], bool]:
        return lambda updates: progress() >= epochs - 1e-9

    if method in ("lr decay", "batch increase"):
        kind = LrDecaySchedule if method == "lr decay" else BatchIncrease
        schedule = kind(decay, base_batch=args.base_batch, base_lr=args.lr, limits=limits)
        state = {"progress": 0.0}

        def next_setting(progress: float) -> BatchSetting:
            state["progress"] = progress
            return schedule.at(progress)

        def finished(updates: int) -> bool:
            # Stop at the epoch boundary that completes the budget.
            return updates > 0 and state["progress"] >= epochs - 1e-9

        return _train(
            task,
            method=method,
            seed=seed,
            base_lr=args.lr,
            next_setting=next_setting,
            finished=finished,
        )
    adaptive = AdaptiveBatch(
        base_batch=args.base_batch,
        base_lr=args.lr,
        limits=limits,
        decay=decay,
        check_every=args.check_every,
        min_steps=args.check_every,
    )
    return _train(
        task,
        method=method,
        seed=seed,
        base_lr=args.lr,
        next_setting=lambda progress: adaptive.setting,
        finished=lambda updates: adaptive.done(total_epochs=epochs),
        adaptive=adaptive,
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", default="digits")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=24.0)
    parser.add_argument("--milestones", type=float, nargs="+", default=[8.0, 16.0])
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--base-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--check-every", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", NoiseScaleWarning)
    task = load_task(example=args.example)
    console = Console(width=160)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    console.print(
        f"[bold]{args.example}[/]: {task.train_size} train samples, base batch {args.base_batch}, "
        f"lr {args.lr}, {args.epochs:g} epochs, decay ×{args.gamma} at epochs "
        f"{', '.join(f'{m:g}' for m in args.milestones)}; {args.seeds} seeds; 1 torch thread; "
        f"load average {load:.1f} on {os.cpu_count()} cores (wall times inflate with load)"
    )
    methods = ["lr decay", "batch increase", "adaptive"]
    runs: list[RunResult] = []
    for seed in range(args.seeds):
        for method in methods:
            result = run_method(task, method, seed, args)
            runs.append(result)
            console.print(
                f"  seed {seed} {method:>14}: val loss {result.val_loss:.4f}, "
                f"{result.updates} updates, {result.seconds:.1f} s, final batch "
                f"{result.final_batch}, lr {result.final_lr:.3g}"
            )
    by = {m: [r for r in runs if r.method == m] for m in methods}
    anchor_loss = statistics.fmean(r.val_loss for r in by["lr decay"])
    anchor_updates = statistics.fmean(r.updates for r in by["lr decay"])
    anchor_seconds = statistics.fmean(r.seconds for r in by["lr decay"])
    table = Table(title=f"lr decay vs batch increase vs adaptive ({args.example})")
    for column in (
        "method",
        "val loss (mean ± std)",
        "val loss / decay",
        f"val {task.metric_name}",
        "updates",
        "updates: decay / this",
        "epochs of data",
        "wall s",
        "time / decay",
    ):
        table.add_column(column, justify="right")
    for method in methods:
        rows = by[method]
        loss, loss_std = _mean_std([r.val_loss for r in rows])
        metric = [r.val_metric for r in rows if r.val_metric is not None]
        updates = statistics.fmean(r.updates for r in rows)
        seconds = statistics.fmean(r.seconds for r in rows)
        table.add_row(
            method,
            f"{loss:.4f} ± {loss_std:.4f}",
            f"{loss / anchor_loss:.3f}",
            f"{statistics.fmean(metric):.4f}" if metric else "-",
            f"{updates:.0f}",
            f"{anchor_updates / updates:.2f}×",
            f"{statistics.fmean(r.epochs for r in rows):.1f}",
            f"{seconds:.1f}",
            f"{seconds / anchor_seconds:.2f}",
        )
    console.print(table)
    # "Within noise": the mean paired difference (same seed: same initialisation and data order)
    # within two standard errors of zero; the seed-to-seed spread is printed beside it.
    diffs = [
        b.val_loss - a.val_loss for a, b in zip(by["lr decay"], by["batch increase"], strict=True)
    ]
    mean_diff, std_diff = _mean_std(diffs)
    two_se = 2 * std_diff / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    spread = _mean_std([r.val_loss for r in by["lr decay"]])[1]
    within = len(diffs) > 1 and abs(mean_diff) <= two_se
    fewer = anchor_updates / statistics.fmean(r.updates for r in by["batch increase"])
    console.print(
        f"batch increase − lr decay, val loss per seed: {mean_diff:+.4f} ± {two_se:.4f} (2 SE of "
        f"the paired difference; seed-to-seed std of lr decay {spread:.4f}): "
        f"{'within' if within else 'outside'} noise; {fewer:.2f}× fewer updates → goal "
        f"{'met' if within and fewer >= 2 else 'not met'}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "runs": [asdict(r) for r in runs]}, handle, indent=2)


if __name__ == "__main__":
    main()
