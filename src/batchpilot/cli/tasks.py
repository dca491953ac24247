"""``batchpilot examples``, ``batchpilot check`` and ``batchpilot train``: looking at a task."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    AccumulationOpt,
    BatchOpt,
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    MicroBatchOpt,
    OutputFormat,
    PrecisionOpt,
    SeedOpt,
    TaskArg,
    check_batch_options,
    command_app,
    emit,
    get_task,
    option_names,
    progress,
    split_options,
)
from batchpilot.devices import resolve_device
from batchpilot.errors import BadInputError
from batchpilot.examples import EXAMPLE_INFO

if TYPE_CHECKING:
    from batchpilot.summary import TaskSummary
    from batchpilot.training._loop import TrainResult

commands = command_app()


@commands.command(
    "examples", help="List the built-in example tasks (use them with --example NAME)."
)
def examples_command(fmt: FormatOpt = OutputFormat.table) -> None:
    # Read from the registry, not by building each task: listing them imports no torch.
    rows = [info.to_dict() for info in EXAMPLE_INFO.values()]

    def render(console: Console) -> None:
        table = Table(title="built-in examples")
        for column in ("name", "task spec", "train", "val", "ref batch", "ref lr"):
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(value) for value in row.values()))
        console.print(table)

    emit(fmt, {"examples": rows}, render)


@commands.command(
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
) -> None:
    from batchpilot.summary import summarize_task

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


@commands.command(
    "train",
    help="Train a fresh model of the task at a given batch and lr and report the losses: "
    "the ground truth every recommendation is checked against. "
    "Example: batchpilot train --example digits --batch 64 --lr 0.05 --epochs 3",
)
def train_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    batch: BatchOpt = None,
    micro_batch: MicroBatchOpt = None,
    accumulation: AccumulationOpt = None,
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
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    # Every number is checked before the task is built; 0 is a value, never "the default".
    check_batch_options(batch, micro_batch, accumulation)
    if lr is not None:
        check_positive_float("--lr", lr)
    if epochs is not None:
        check_positive_float("--epochs", epochs)
    if steps is not None:
        check_positive_int("--steps", steps)
    check_positive_int("--evals", evals)
    if steps is not None and epochs is not None:
        raise BadInputError("--steps: give either --steps or --epochs, not both")
    task = get_task(task_spec, example).with_precision(precision)
    micro, steps_per_batch = split_options(
        batch, micro_batch, accumulation, default_batch=task.reference_batch
    )
    if lr is None:
        lr = task.reference_lr
    if lr is None:
        raise BadInputError("--lr: the task has no reference lr; give --lr")
    if steps is None and epochs is None:
        epochs = 3.0
    planned = (
        steps
        if steps is not None
        else max(1, math.ceil((epochs or 0) * task.train_size / (micro * steps_per_batch)))
    )
    from batchpilot.training._loop import train

    # Without --micro-batch the micro-batch is --batch: an error about it names that option.
    names = {} if micro_batch is not None else {"micro_batch": "--batch"}
    with progress() as bar, option_names(**names):
        job = bar.add_task("training", total=planned)
        result = train(
            task,
            micro_batch=micro,
            accumulation_steps=steps_per_batch,
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
