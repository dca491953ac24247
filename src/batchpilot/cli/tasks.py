"""``batchpilot examples``, ``batchpilot check`` and ``batchpilot train``: looking at a task."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    DebugOpt,
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    OutputFormat,
    SeedOpt,
    TaskArg,
    app,
    emit,
    get_task,
    option_names,
    progress,
)
from batchpilot.devices import resolve_device
from batchpilot.errors import BadInputError
from batchpilot.examples import EXAMPLES
from batchpilot.loading import load_task
from batchpilot.summary import TaskSummary, summarize_task
from batchpilot.training._loop import TrainResult, train


@app.command("examples", help="List the built-in example tasks (use them with --example NAME).")
def examples_command(fmt: FormatOpt = OutputFormat.table, debug: DebugOpt = False) -> None:
    rows = []
    for name in EXAMPLES:
        task = load_task(example=name)
        rows.append(
            {
                "name": name,
                "spec": EXAMPLES[name],
                "train_size": task.train_size,
                "val_size": task.val_size,
                "reference_batch": task.reference_batch,
                "reference_lr": task.reference_lr,
            }
        )

    def render(console: Console) -> None:
        table = Table(title="built-in examples")
        for column in ("name", "task spec", "train", "val", "ref batch", "ref lr"):
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(value) for value in row.values()))
        console.print(table)

    emit(fmt, {"examples": rows}, render)


@app.command(
    "check",
    help="Load a task, build its model and optimizer and evaluate its loss once: "
    "the quickest way to see that batchpilot can use it. Example: batchpilot check --example digits",
)
def check_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
    debug: DebugOpt = False,
) -> None:
    task = get_task(task_spec, example)
    summary = summarize_task(task, device=resolve_device(device), seed=seed)
    emit(fmt, summary.to_dict(), lambda console: _render_summary(console, summary))


def _render_summary(console: Console, summary: TaskSummary) -> None:
    table = Table(title=f"task {plain(summary.name)}: OK")
    table.add_column("property")
    table.add_column("value", justify="right")
    for key, value in summary.to_dict().items():
        table.add_row(
            key.replace("_", " "), f"{value:.4g}" if isinstance(value, float) else plain(value)
        )
    console.print(table)


@app.command(
    "train",
    help="Train a fresh model of the task at a given batch and lr and report the losses: "
    "the ground truth every recommendation is checked against. "
    "Example: batchpilot train --example digits --batch 64 --lr 0.05 --epochs 3",
)
def train_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help="Micro-batch (samples per forward pass) [default: the task's reference batch].",
        ),
    ] = None,
    accumulation: Annotated[
        int, typer.Option("--accumulation", help="Micro-batches per optimizer step.")
    ] = 1,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate [default: the task's reference lr].")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Epochs to train (default 3 unless --steps).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Optimizer steps to train instead of --epochs.")
    ] = None,
    evals: Annotated[int, typer.Option("--evals", help="Validation points over the run.")] = 5,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
    debug: DebugOpt = False,
) -> None:
    # Every number is checked before the task is built; 0 is a value, never "the default".
    if batch is not None:
        check_positive_int("--batch", batch)
    check_positive_int("--accumulation", accumulation)
    if lr is not None:
        check_positive_float("--lr", lr)
    if epochs is not None:
        check_positive_float("--epochs", epochs)
    if steps is not None:
        check_positive_int("--steps", steps)
    check_positive_int("--evals", evals)
    if steps is not None and epochs is not None:
        raise BadInputError("--steps: give either --steps or --epochs, not both")
    task = get_task(task_spec, example)
    if batch is None:
        batch = task.reference_batch
    if lr is None:
        lr = task.reference_lr
    if batch is None:
        raise BadInputError("--batch: the task has no reference batch; give --batch")
    if lr is None:
        raise BadInputError("--lr: the task has no reference lr; give --lr")
    if steps is None and epochs is None:
        epochs = 3.0
    planned = (
        steps
        if steps is not None
        else max(1, math.ceil((epochs or 0) * task.train_size / (batch * accumulation)))
    )
    with (
        progress() as bar,
        option_names(micro_batch="--batch", accumulation_steps="--accumulation"),
    ):
        job = bar.add_task("training", total=planned)
        result = train(
            task,
            micro_batch=batch,
            accumulation_steps=accumulation,
            lr=lr,
            steps=steps,
            epochs=epochs,
            device=resolve_device(device),
            seed=seed,
            eval_every=max(1, planned // evals),
            on_step=lambda step, loss: bar.update(job, completed=step + 1),
        )
    emit(fmt, result.to_dict(), lambda console: _render_train(console, result))


def _render_train(console: Console, result: TrainResult) -> None:
    table = Table(
        title=f"batch {result.global_batch} (micro {result.micro_batch} × {result.accumulation_steps}), "
        f"lr {result.lr:g}: {result.steps} steps, {result.epochs:.2f} epochs, {result.seconds:.1f} s"
    )
    for column in ("step", "epoch", "val loss", "metric"):
        table.add_column(column, justify="right")
    for step, evaluation in result.evaluations:
        metric = "" if evaluation.metric is None else f"{evaluation.metric:.4f}"
        epoch = result.epochs * step / result.steps
        table.add_row(str(step), f"{epoch:.2f}", f"{evaluation.loss:.4f}", metric)
    console.print(table)
    if result.train_losses:
        console.print(
            f"training loss: first step {result.train_losses[0]:.4f}, last step {result.train_losses[-1]:.4f}"
        )
    if result.diverged:
        console.print("[red]the loss became non-finite: the run diverged[/red]")
