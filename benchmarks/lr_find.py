"""batchpilot's range test against torch-lr-finder and Lightning's ``lr_find``, on every example.

For each built-in example and each of several seeds, every tool runs its range test (the same lr
range, number of steps and batch for all; each tool's own smoothing and suggestion rule), and
each suggested lr is then trained for a fixed budget. The oracle is the best lr of a grid trained
for the same budget. Printed per tool: the suggestions' median and seed-to-seed spread (q3/q1 and
max/min over seeds), and the final validation loss as a ratio to the oracle's (mean and worst
over seeds). Every loss is the mean over ``--train-seeds`` training seeds (initialisation and data
order; 8 by default), the same for every lr, so only the lr differs between tools. With fewer, the
scoring noise alone is about the size of the goal's 10% on xor4 (docs/lr-find.md).

Goal (issue 4): within 10% of the oracle's loss on every example, with a smaller spread than both
anchors.

    .venv/bin/python benchmarks/lr_find.py                 # the full run (~30 minutes)
    .venv/bin/python benchmarks/lr_find.py --seeds 2 --examples digits   # a quick look

Needs the ``bench`` extra (lightning, torch-lr-finder).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from batchpilot.loading import load_task
from batchpilot.measure._lr_range import (
    DEFAULT_METHOD,
    VERIFY_FINAL_SEEDS,
    VERIFY_SEEDS,
    LRFinderResult,
    find_lr,
)
from batchpilot.measure._lr_suggest import METHODS
from batchpilot.task import Task
from batchpilot.training._loop import train


@dataclass(frozen=True)
class Setup:
    """How one example is tested: the batch, the range test, and the training budget."""

    batch: int
    range_steps: int
    min_lr: float
    max_lr: float
    train_steps: int
    grid: tuple[float, ...]
    why: str


def _grid(low: float, high: float) -> tuple[float, ...]:
    """Quarter-decade grid from ``low`` to ``high``."""
    count = round(4 * math.log10(high / low)) + 1
    return tuple(float(x) for x in np.geomspace(low, high, count))


# The task's reference batch everywhere; the budget is a short but real training run. spiral and
# xor4 learn nothing in 100 steps (their loss sits on a plateau for hundreds of steps), so every
# tool gets a 600-step range test there.
SETUPS: dict[str, Setup] = {
    "digits": Setup(64, 100, 1e-6, 10.0, 67, _grid(1e-3, 1.0), "3 epochs"),
    "spiral": Setup(10, 600, 1e-4, 10.0, 2500, _grid(1e-2, 3.0), "100 epochs"),
    "xor4": Setup(4, 600, 1e-3, 100.0, 2000, _grid(0.3, 100.0), "500 epochs"),
}


@dataclass
class ToolRecord:
    name: str
    range_steps: int  # optimizer steps of range testing behind one suggestion
    lrs: list[float | None] = field(default_factory=list)
    training_runs: list[int] = field(default_factory=list)  # verification runs of the budget
    seconds: float = 0.0


class Scorer:
    """Final validation loss after the budget, averaged over training seeds, cached by lr."""

    def __init__(self, task: Task, setup: Setup, train_seeds: int) -> None:
        self.task, self.setup, self.train_seeds = task, setup, train_seeds
        self.cache: dict[float, float] = {}

    def __call__(self, lr: float) -> float:
        if lr not in self.cache:
            losses = []
            for seed in range(self.train_seeds):
                run = train(
                    self.task,
                    micro_batch=self.setup.batch,
                    lr=lr,
                    steps=self.setup.train_steps,
                    seed=seed,
                )
                final = run.final
                ok = not run.diverged and final is not None and math.isfinite(final.loss)
                losses.append(final.loss if ok and final is not None else math.inf)
            self.cache[lr] = float(np.mean(losses))
        return self.cache[lr]


# ---------------------------------------------------------------------------------------- tools


def range_test(task: Task, setup: Setup, seed: int, **options: Any) -> LRFinderResult:
    """batchpilot's range test as the benchmark runs it: 3 repeats from seed ``seed``."""
    return find_lr(
        task,
        micro_batch=setup.batch,
        min_lr=setup.min_lr,
        max_lr=setup.max_lr,
        steps=setup.range_steps,
        repeats=3,
        seed=seed,
        **options,
    )


def batchpilot_suggestions(
    task: Task,
    setup: Setup,
    seed: int,
    *,
    verify: bool,
    verify_seeds: int = VERIFY_SEEDS,
    verify_final_seeds: int = VERIFY_FINAL_SEEDS,
) -> tuple[dict[str, float | None], float | None, int]:
    """Each rule's suggestion; with ``verify``, also the lr that won the verification runs
    (``verify_steps`` = the training budget, seed ``seed``: not one of the scoring seeds) and
    how many runs that took."""
    result = range_test(
        task,
        setup,
        seed,
        verify_steps=setup.train_steps if verify else None,
        verify_seeds=verify_seeds,
        verify_final_seeds=verify_final_seeds,
    )
    runs = 0 if result.verification is None else result.verification.runs
    verified = result.suggestion if verify else None
    return dict(result.suggestions), verified, runs


class _PassThrough(torch.nn.Module):
    """torch-lr-finder calls ``criterion(model(inputs), labels)``: hand the inputs through, so
    the criterion can call the task's own loss on the real model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs


def torch_lr_finder_suggestion(task: Task, setup: Setup, seed: int) -> float | None:
    import matplotlib.pyplot as plt
    from torch_lr_finder import LRFinder

    torch.manual_seed(seed)
    model = task.make_model("cpu")
    wrapper = _PassThrough(model)
    optimizer = task.make_optimizer(model.parameters(), setup.min_lr)

    def criterion(inputs: Any, labels: Any) -> torch.Tensor:
        return task.compute_loss(model, (inputs, labels))

    loader = task.loader(setup.batch, shuffle=True, seed=seed, drop_last=True)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        finder = LRFinder(wrapper, optimizer, criterion, device="cpu")
        finder.range_test(
            loader,
            start_lr=setup.min_lr,
            end_lr=setup.max_lr,
            num_iter=setup.range_steps,
            step_mode="exp",
        )
        figure, ax = plt.subplots()
        try:
            _, lr = finder.plot(ax=ax, suggest_lr=True)  # its documented defaults: skip 10 / 5
        except RuntimeError:  # too few points before it stopped
            lr = None
        finally:
            plt.close(figure)
        finder.reset()
    return None if lr is None else float(lr)


def lightning_suggestion(task: Task, setup: Setup, seed: int) -> float | None:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)  # Lightning sets INFO on import

    class TaskModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = task.make_model("cpu")
            self.lr = setup.min_lr

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return task.compute_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return task.make_optimizer(self.model.parameters(), self.lr)

    torch.manual_seed(seed)
    module = TaskModule()
    loader = task.loader(setup.batch, shuffle=True, seed=seed, drop_last=True)
    quiet = io.StringIO()
    with (
        tempfile.TemporaryDirectory() as folder,
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
        )
        finder = Tuner(trainer).lr_find(
            module,
            train_dataloaders=loader,
            min_lr=setup.min_lr,
            max_lr=setup.max_lr,
            num_training=setup.range_steps,
            mode="exponential",
            early_stop_threshold=4.0,
        )
    lr = None if finder is None else finder.suggestion()
    return None if lr is None else float(lr)


# -------------------------------------------------------------------------------------- running


def _spread(values: list[float]) -> tuple[float, float]:
    """(q3 / q1, max / min) of positive values; 1 is no spread at all."""
    if len(values) < 2:
        return math.nan, math.nan
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 / q1), float(max(values) / min(values))


VERIFIED = "batchpilot verified"


def run_example(
    name: str,
    seeds: int,
    train_seeds: int,
    log: Callable[[str], None],
    *,
    verify: bool = True,
    verify_seeds: int = VERIFY_SEEDS,
    verify_final_seeds: int = VERIFY_FINAL_SEEDS,
) -> dict[str, Any]:
    setup = SETUPS[name]
    task = load_task(example=name)
    score = Scorer(task, setup, train_seeds)
    start = time.perf_counter()
    grid = {lr: score(lr) for lr in setup.grid}
    oracle_lr = min(grid, key=lambda lr: grid[lr])
    oracle = grid[oracle_lr]
    log(f"{name}: grid done in {time.perf_counter() - start:.0f} s, best lr {oracle_lr:.3g}")

    records = {
        f"batchpilot {m}": ToolRecord(f"batchpilot {m}", 3 * setup.range_steps) for m in METHODS
    }
    if verify:
        records[VERIFIED] = ToolRecord(VERIFIED, 3 * setup.range_steps)
    records["torch-lr-finder"] = ToolRecord("torch-lr-finder", setup.range_steps)
    records["lightning lr_find"] = ToolRecord("lightning lr_find", setup.range_steps)
    for seed in range(seeds):
        range_seed = 1000 + 7919 * seed  # apart from the training seeds
        t0 = time.perf_counter()
        ours, verified, runs = batchpilot_suggestions(
            task,
            setup,
            range_seed,
            verify=verify,
            verify_seeds=verify_seeds,
            verify_final_seeds=verify_final_seeds,
        )
        elapsed = time.perf_counter() - t0
        for method in METHODS:
            records[f"batchpilot {method}"].lrs.append(ours[method])
            records[f"batchpilot {method}"].seconds += elapsed
        if verify:
            records[VERIFIED].lrs.append(verified)
            records[VERIFIED].training_runs.append(runs)
            records[VERIFIED].seconds += elapsed
        for key, tool in (
            ("torch-lr-finder", torch_lr_finder_suggestion),
            ("lightning lr_find", lightning_suggestion),
        ):
            t0 = time.perf_counter()
            records[key].lrs.append(tool(task, setup, range_seed))
            records[key].seconds += time.perf_counter() - t0
        log(f"{name}: seed {seed + 1}/{seeds} done")

    rows = []
    for record in records.values():
        found = [lr for lr in record.lrs if lr is not None]
        ratios = [score(lr) / oracle for lr in found]
        q3q1, maxmin = _spread(found)
        rows.append(
            {
                "tool": record.name,
                "default": record.name == f"batchpilot {DEFAULT_METHOD}",
                "suggestions": record.lrs,
                "median_lr": float(np.median(found)) if found else None,
                "spread_q3_q1": q3q1,
                "spread_max_min": maxmin,
                "mean_ratio": float(np.mean(ratios)) if ratios else math.inf,
                "worst_ratio": float(max(ratios)) if ratios else math.inf,
                "no_answer": len(record.lrs) - len(found),
                "range_steps": record.range_steps,
                "training_runs": float(np.mean(record.training_runs))
                if record.training_runs
                else 0.0,
                "seconds_per_suggestion": record.seconds / max(seeds, 1),
            }
        )
    return {
        "example": name,
        "batch": setup.batch,
        "range_steps": setup.range_steps,
        "lr_range": [setup.min_lr, setup.max_lr],
        "train_steps": setup.train_steps,
        "budget": setup.why,
        "oracle_lr": oracle_lr,
        "oracle_loss": oracle,
        "grid": {f"{lr:.4g}": loss for lr, loss in grid.items()},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞"
    return format(value, spec)


def render(console: Console, report: dict[str, Any]) -> None:
    title = (
        f"{report['example']}: batch {report['batch']}, range test {report['range_steps']} steps "
        f"over [{report['lr_range'][0]:g}, {report['lr_range'][1]:g}], budget "
        f"{report['train_steps']} steps ({report['budget']}); grid-best lr "
        f"{report['oracle_lr']:.3g}, val loss {report['oracle_loss']:.4f}"
    )
    table = Table(title=title, title_justify="left")
    for column in (
        "tool",
        "median lr",
        "spread q3/q1",
        "max/min",
        "loss ratio mean",
        "worst",
        "no answer",
        "range steps",
        "budget runs",
    ):
        table.add_column(column, justify="left" if column == "tool" else "right")
    for row in report["rows"]:
        name = row["tool"] + (" (default)" if row["default"] else "")
        table.add_row(
            name,
            _fmt(row["median_lr"]),
            _fmt(row["spread_q3_q1"], ".2f"),
            _fmt(row["spread_max_min"], ".2f"),
            _fmt(row["mean_ratio"], ".3f"),
            _fmt(row["worst_ratio"], ".3f"),
            str(row["no_answer"]),
            str(row["range_steps"]),
            f"{row['training_runs']:.1f}" if row["training_runs"] else "—",
        )
    console.print(table)


def render_goal(console: Console, reports: list[dict[str, Any]]) -> None:
    table = Table(title="goal: loss within 10% of the grid best, spread below both anchors")
    for column in (
        "example",
        "batchpilot",
        "mean ratio",
        "worst",
        "within 10%",
        "spread q3/q1 (ours / tlf / lightning)",
        "smallest spread",
    ):
        table.add_column(column)
    for report in reports:
        rows = {row["tool"]: row for row in report["rows"]}
        tlf, light = rows["torch-lr-finder"], rows["lightning lr_find"]
        ours_rows = [(f"range test ({DEFAULT_METHOD})", rows[f"batchpilot {DEFAULT_METHOD}"])]
        if VERIFIED in rows:
            ours_rows.append(("verified at the budget", rows[VERIFIED]))
        for index, (label, ours) in enumerate(ours_rows):
            within = ours["no_answer"] == 0 and ours["mean_ratio"] <= 1.10
            spreads = [ours["spread_q3_q1"], tlf["spread_q3_q1"], light["spread_q3_q1"]]
            smallest = not math.isnan(spreads[0]) and all(
                math.isnan(other) or spreads[0] < other for other in spreads[1:]
            )
            table.add_row(
                report["example"] if index == 0 else "",
                label,
                _fmt(ours["mean_ratio"], ".3f"),
                _fmt(ours["worst_ratio"], ".3f"),
                "yes" if within else "no",
                " / ".join(_fmt(s, ".2f") for s in spreads),
                "yes" if smallest else "no",
            )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(SETUPS), help="comma-separated examples")
    parser.add_argument("--seeds", type=int, default=4, help="range-test seeds per tool")
    parser.add_argument("--train-seeds", type=int, default=8, help="training seeds per lr")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip batchpilot's verification runs"
    )
    parser.add_argument(
        "--verify-seeds",
        type=int,
        default=VERIFY_SEEDS,
        help="seeds of batchpilot's verification finalists",
    )
    parser.add_argument(
        "--verify-final-seeds",
        type=int,
        default=VERIFY_FINAL_SEEDS,
        help="seeds of batchpilot's tie-break round (at most --verify-seeds: none)",
    )
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    console = Console(highlight=False, width=160)
    err = Console(stderr=True, highlight=False)
    load = os.getloadavg()[0]
    console.print(
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average {load:.1f} at "
        f"start (the machine is shared: times are indicative only); {args.seeds} seeds, "
        f"{args.train_seeds} training seeds per lr; batchpilot: 3 repeats per suggestion, "
        f"verification with {args.verify_seeds} seeds, tie-break with {args.verify_final_seeds}"
    )
    reports = []
    start = time.perf_counter()
    for name in args.examples.split(","):
        if name not in SETUPS:
            sys.exit(f"unknown example {name!r}; choose from {', '.join(SETUPS)}")
        report = run_example(
            name,
            args.seeds,
            args.train_seeds,
            lambda line: err.print(line),
            verify=not args.no_verify,
            verify_seeds=args.verify_seeds,
            verify_final_seeds=args.verify_final_seeds,
        )
        render(console, report)
        reports.append(report)
    render_goal(console, reports)
    console.print(
        f"total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} at end"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(reports, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
