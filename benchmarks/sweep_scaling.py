"""What a batch-size sweep costs: the same sweep on each executor, and the ladder against a grid.

Part 1 runs one sweep (a grid of batch sizes on the digits example, equal epochs) in this process,
on a local process pool and on a local Ray, and prints the wall time of each as a ratio to the
in-process run with one torch thread (the anchor: a user with no executor at all). Workers use one
torch thread each and there are as many as cores; the in-process run also runs with a thread per
core, torch's default. The trials must be identical on every one-thread executor (checked).

Part 2 is seed 003's question: does the ×0.5 / ×2 ladder from 128 find the batch a full grid of
powers of two finds, and for how much less compute? The grid runs once per lr rule; for each
objective and stop rule the ladder walks the grid's measured trials (a ladder trial at batch B is
the grid's trial at B: same spec, same seed; one ladder also runs on its own to check that), and
the table prints the trials, samples and training time of the ladder as ratios to the grid's and
whether the best batches agree. The grid is the anchor: what a careful practitioner does by hand.

    .venv/bin/python benchmarks/sweep_scaling.py            # the full run (~4-9 minutes)
    .venv/bin/python benchmarks/sweep_scaling.py --quick    # smaller sweeps (~2-4 minutes)

Ray is optional: without it, its row says so. Timings are of this machine at the time of the run;
on a machine shared with other jobs they move by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from batchpilot.sweep import (
    Budget,
    Grid,
    Ladder,
    LrPlan,
    PoolExecutor,
    RayExecutor,
    SweepResult,
    TrialResult,
    analyze,
    run_sweep,
    walk,
)
from batchpilot.sweep.analysis import batch_scores
from batchpilot.sweep.executors import InProcessExecutor, import_ray

TASK = "batchpilot.examples.digits:task"


@dataclass
class ExecutorRow:
    name: str
    seconds: float | None
    first_result_seconds: float | None
    workers: int
    note: str
    result: SweepResult | None


def run_on(name: str, executor: Any, workers: int, settings: dict[str, Any]) -> ExecutorRow:
    started = time.perf_counter()
    first: list[float] = []

    def on_trial(trial: TrialResult, reused: bool) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    try:
        result = run_sweep(TASK, executor=executor, on_trial=on_trial, **settings)
    finally:
        executor.close()
    seconds = time.perf_counter() - started
    return ExecutorRow(name, seconds, first[0] if first else None, workers, "", result)


def part_executors(console: Console, *, quick: bool) -> None:
    cores = os.cpu_count() or 1
    batches = (64, 128, 256, 512) if quick else (32, 64, 128, 256, 512)
    settings: dict[str, Any] = {
        "budget": Budget.equal_epochs(1 if quick else 2, evals=5),
        "strategy": Grid(batches),
        "lr": LrPlan(rule="sqrt"),
        "objective": "val_loss",
    }
    # The in-process run pays torch's one-time first-step costs up front, as a long sweep would.
    run_sweep(TASK, budget=Budget.equal_samples(64, evals=1), strategy=Grid((32,)))
    # One thread is the anchor: trials are bit-for-bit those of one-thread workers. Torch's
    # default (a thread per core) sums in another order, so its losses differ in the last digits,
    # which two epochs of SGD amplify.
    torch.set_num_threads(1)
    rows = [run_on("in-process", InProcessExecutor(), 1, settings)]
    torch.set_num_threads(cores)
    row = run_on("in-process", InProcessExecutor(), 1, settings)
    row.note = f"{cores} torch threads"
    rows.append(row)
    torch.set_num_threads(1)
    rows.append(run_on("process pool", PoolExecutor(cores, threads_per_worker=1), cores, settings))
    try:
        ray = import_ray()
    except Exception as exc:
        rows.append(ExecutorRow("ray (local)", None, None, cores, str(exc), None))
    else:
        started = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        init_seconds = time.perf_counter() - started
        row = run_on("ray (local)", RayExecutor(), cores, settings)
        ray.shutdown()
        assert row.seconds is not None
        row.seconds += init_seconds
        if row.first_result_seconds is not None:
            row.first_result_seconds += init_seconds
        row.note = f"ray.init {init_seconds:.1f} s"
        rows.append(row)

    anchor = rows[0]
    assert anchor.result is not None and anchor.seconds is not None
    table = Table(
        title=f"one sweep, {len(batches)} trials (digits, grid {list(batches)}, "
        f"{settings['budget'].epochs:g} epochs each), {cores} cores",
    )
    for column in (
        "executor",
        "workers",
        "wall s",
        "first trial s",
        "vs in-process",
        "same trials",
    ):
        table.add_column(column, justify="right")
    table.add_column("note")
    for row in rows:
        same = "—"
        if row.result is not None:
            same = "yes" if _same(row.result, anchor.result) else "no"
        table.add_row(
            row.name,
            str(row.workers),
            "—" if row.seconds is None else f"{row.seconds:.1f}",
            "—" if row.first_result_seconds is None else f"{row.first_result_seconds:.1f}",
            "—" if row.seconds is None else f"{row.seconds / anchor.seconds:.2f}×",
            same,
            row.note,
        )
    console.print(table)


def _same(a: SweepResult, b: SweepResult) -> bool:
    """The same trials with the same validation curves (to float32 precision)."""
    if [t.key for t in a.trials] != [t.key for t in b.trials]:
        return False
    return all(
        len(x.curve) == len(y.curve)
        and all(
            abs(p.val_loss - q.val_loss) <= 1e-6 * abs(q.val_loss)
            for p, q in zip(x.curve, y.curve, strict=True)
        )
        for x, y in zip(a.trials, b.trials, strict=True)
    )


@dataclass
class Cost:
    trials: int
    samples: int
    seconds: float


def _cost(trials: Sequence[TrialResult]) -> Cost:
    return Cost(
        trials=len(trials),
        samples=sum(t.samples for t in trials),
        seconds=sum(t.wall_seconds for t in trials),
    )


def part_ladder(console: Console, *, quick: bool) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    low, high = (32, 512) if quick else (16, 1024)
    budget = Budget.equal_epochs(1 if quick else 2, evals=5)
    scenarios = [
        ("sqrt", "val_metric", 1),
        ("sqrt", "val_metric", 2),
        ("sqrt", "val_loss", 1),
        ("linear", "val_metric", 1),
        ("linear", "val_loss", 1),
    ]
    grids = {
        rule: run_sweep(
            TASK,
            budget=budget,
            lr=LrPlan(rule=rule),
            strategy=Grid.powers_of_two(low, high),
            objective="val_loss",
        )
        for rule in ("sqrt", "linear")
    }
    # A ladder trial at batch B is the grid's trial at B (same spec, same seed): the ladders below
    # walk the grid's measured scores. One ladder also runs for real, to check that it is so.
    real_order: list[int] = []
    real = run_sweep(
        TASK,
        budget=budget,
        lr=LrPlan(rule="sqrt"),
        strategy=Ladder(start=128, min_batch=low, max_batch=high),
        objective="val_metric",
        on_trial=lambda trial, reused: real_order.append(trial.batch),
    )
    table = Table(
        title=f"ladder from 128 (×0.5 / ×2) vs the grid of powers of two {low}–{high} "
        f"(digits, {budget.epochs:g} epochs per trial, in-process)"
    )
    for column in (
        "lr rule",
        "objective",
        "patience",
        "grid best",
        "ladder best",
        "same",
        "ladder path",
        "trials",
        "samples vs grid",
        "train s (ladder/grid)",
    ):
        table.add_column(column, justify="right")
    for rule, objective, patience in scenarios:
        grid = grids[rule]
        scores = batch_scores(grid.trials, objective, metric_mode="max")
        ladder = Ladder(start=128, patience=patience, min_batch=low, max_batch=high)
        order = walk(ladder, scores.__getitem__)
        visited = [t for t in grid.trials if t.batch in order]
        choice = analyze(grid.trials, objective=objective, metric_mode="max").best[objective]
        found = analyze(visited, objective=objective, metric_mode="max").best[objective]
        if (rule, objective, patience) == ("sqrt", "val_metric", 1):
            same_trials = [t.val_loss for t in real.trials] == [t.val_loss for t in visited]
            assert real_order == order and same_trials, "the real ladder left the grid's path"
        g = _cost(grid.trials)
        lad = _cost(visited)
        table.add_row(
            rule,
            objective,
            str(patience),
            str(choice.batch),
            str(found.batch),
            "yes" if choice.batch == found.batch else "no",
            "→".join(str(b) for b in order),
            f"{lad.trials}/{g.trials} = {lad.trials / g.trials:.2f}",
            f"{lad.samples / g.samples:.2f}",
            f"{lad.seconds:.1f}/{g.seconds:.1f} = {lad.seconds / g.seconds:.2f}",
        )
    console.print(table)
    console.print(
        "the sqrt / val_metric / patience 1 ladder also ran on its own: the same path and trials"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweeps (~2-4 minutes)")
    parser.add_argument("--skip-executors", action="store_true")
    parser.add_argument("--skip-ladder", action="store_true")
    args = parser.parse_args()
    console = Console(width=140)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load:.1f} at the start "
        "(a shared machine: timings move between runs)"
    )
    started = time.perf_counter()
    if not args.skip_executors:
        part_executors(console, quick=args.quick)
    if not args.skip_ladder:
        part_ladder(console, quick=args.quick)
    console.print(f"benchmark took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
