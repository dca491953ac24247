"""``batchpilot tune``: the main job, from a task to one recommendation and an HTML report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.cli._text import plain, precision_text
from batchpilot.cli.app import (
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    OldMaxBatchOpt,
    OutputFormat,
    PhaseBars,
    PrecisionOpt,
    SeedOpt,
    TaskArg,
    check_out_folder,
    command_app,
    emit,
    get_task,
    option_names,
    progress,
    renamed,
    stderr,
)
from batchpilot.devices import resolve_device
from batchpilot.measure._memory_search import parse_size
from batchpilot.report.tune import write_partial_report, write_tune_report
from batchpilot.tune import (
    DEFAULT_TIME_BUDGET_SECONDS,
    TuneIncomplete,
    TuneOptions,
    TuneResult,
    phases_budget,
    tune,
)

if TYPE_CHECKING:
    from batchpilot.task import Task


commands = command_app()


@commands.command(
    "tune",
    help=(
        "The main job: measure memory, throughput, a learning-rate range test and the gradient noise "
        "scale on your task, and recommend the batch size, accumulation, learning rate and warm-up, "
        "with an HTML report of the evidence. Example: batchpilot tune --example digits"
    ),
)
def tune_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="Plan for this many data-parallel devices.")
    ] = 1,
    reference_batch: Annotated[
        int | None,
        typer.Option(
            "--reference-batch",
            help="Batch of the range test and the noise-scale run [default: the task's reference batch, else 32].",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Use this lr at the reference batch instead of the range test's suggestion.",
        ),
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(
            "--device-memory",
            help="Memory budget per device, e.g. 80GiB or 512MiB [default: what the device has].",
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", help="Safety margin, as a fraction of the budget.")
    ] = 0.05,
    max_micro_batch: Annotated[
        int | None,
        typer.Option(
            "--max-micro-batch", help="Never probe or recommend a micro-batch above this."
        ),
    ] = None,
    old_max_batch: OldMaxBatchOpt = None,
    throughput_steps: Annotated[
        int,
        typer.Option("--throughput-steps", help="Timed steps per batch of the throughput ladder."),
    ] = 5,
    lr_steps: Annotated[
        int, typer.Option("--lr-steps", help="Optimizer steps of each range test.")
    ] = 100,
    lr_repeats: Annotated[
        int,
        typer.Option(
            "--lr-repeats", help="Range tests over different seeds (the spread of the suggestion)."
        ),
    ] = 3,
    noise_steps: Annotated[
        int,
        typer.Option(
            "--noise-steps",
            help="Most training steps of the noise-scale run; its window ends at the best "
            "validation loss, and the run stops early once that loss rises (overfitting).",
        ),
    ] = TuneOptions.noise_steps,
    check_lr: Annotated[
        bool,
        typer.Option(
            "--check-lr/--no-check-lr",
            help="Check the lr by short runs on a √2 grid: at the reference batch before the "
            "noise scale, and at the recommended batch before answering.",
        ),
    ] = True,
    check_seeds: Annotated[
        int,
        typer.Option("--check-seeds", help="Seeds per lr of the check at the recommended batch."),
    ] = TuneOptions.check_seeds,
    target_loss: Annotated[
        float | None,
        typer.Option(
            "--target-loss",
            help="The validation loss you train to (time to a target, as MLPerf measures "
            "training): the lr check scores its lrs by the steps to it, and the critical batch "
            "is measured by them. Default: a loss on the noise run's descent, 95% of the way "
            "(in log-loss) to where its window ended.",
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Also train at ×0.5, ×1 and ×2 the recommended batch and keep the best (the practitioners' halve-or-double check).",
        ),
    ] = False,
    verify_epochs: Annotated[
        float, typer.Option("--verify-epochs", help="Epochs of each verification run.")
    ] = 5.0,
    time_budget: Annotated[
        float,
        typer.Option(
            "--time-budget",
            help="Seconds for the whole command, start-up and report included: every phase is "
            "sized to fit (memory and throughput take a fifth; the range test, the noise scale "
            "and the lr checks share the rest).",
        ),
    ] = DEFAULT_TIME_BUDGET_SECONDS,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="Intra-op threads for every measurement [default: torch's, lowered to the cores "
            "other programs leave free].",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the HTML report and its JSON.")
    ] = Path("batchpilot-report"),
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    check_out_folder(out)
    max_batch = renamed("--max-batch", "--max-micro-batch", old_max_batch, max_micro_batch)
    task = get_task(task_spec, example)
    resolved = resolve_device(device)
    with option_names(max_batch="--max-micro-batch", budget_bytes="--device-memory"):
        _tune(
            task,
            out,
            fmt,
            TuneOptions(
                device=str(resolved),
                seed=seed,
                world_size=world_size,
                reference_batch=reference_batch,
                lr=lr,
                budget_bytes=parse_size(device_memory) if device_memory is not None else None,
                margin=margin,
                max_batch=max_batch,
                throughput_steps=throughput_steps,
                lr_steps=lr_steps,
                lr_repeats=lr_repeats,
                noise_steps=noise_steps,
                check_lr=check_lr,
                check_seeds=check_seeds,
                target_loss=target_loss,
                verify=verify,
                verify_epochs=verify_epochs,
                time_budget_seconds=phases_budget(time_budget),
                threads=threads,
                precision=precision,
            ),
        )


def _tune(task: Task, out: Path, fmt: OutputFormat, options: TuneOptions) -> None:
    try:
        with progress() as bar:
            result = tune(task, options, progress=PhaseBars(bar))
    except TuneIncomplete as exc:
        page = write_partial_report(exc.partial, out, phase=exc.phase, error=exc.error)
        stderr().print(f"incomplete: what was measured is in {page.parent / 'result.json'}")
        raise exc.error from None
    report = write_tune_report(result, out)
    stderr().print(f"report: {report}")
    data = result.to_dict()
    data["report"] = str(report)
    emit(fmt, data, lambda console: render_tune(console, result, report))


def render_tune(console: Console, result: TuneResult, report: Path) -> None:
    rec = result.recommendation
    table = Table(title=f"batchpilot recommendation for {plain(result.task.name)}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("global batch", str(rec.global_batch)),
        (
            "micro-batch × accumulation × devices",
            f"{rec.micro_batch} × {rec.accumulation_steps} × {rec.world_size}",
        ),
        (
            "learning rate",
            f"{rec.lr:.4g} (checked at this batch; the {rec.lr_rule} rule gave {rec.rule_lr:.4g})"
            if rec.lr_source == "checked" and rec.rule_lr is not None
            else f"{rec.lr:.4g} ({rec.lr_rule} rule)",
        ),
    ]
    if rec.betas is not None and rec.eps is not None:
        rows.append(("Adam betas, eps", f"({rec.betas[0]:.4g}, {rec.betas[1]:.4g}), {rec.eps:.3g}"))
    rows += [
        ("warm-up", f"{rec.warmup_steps} steps ({rec.warmup_epochs:.2g} epochs)"),
        ("steps per epoch", str(rec.steps_per_epoch)),
    ]
    if rec.expected_samples_per_second is not None:
        rows.append(("expected samples/s", f"{rec.expected_samples_per_second:,.0f}"))
    if rec.noise_scale is not None and rec.steps_to_target_ratio is not None:
        interval = ""
        if rec.noise_interval is not None:
            interval = f" ({rec.noise_interval[0]:,.0f} to {rec.noise_interval[1]:,.0f})"
        if rec.critical_batch_source == "steps at two batches" and result.critical_batch:
            measured = result.critical_batch
            source = "critical batch (steps at two batches)"
            window = (
                f", steps {measured.reference_steps:.0f} at {measured.reference_batch} → "
                f"{measured.steps:.0f} at {measured.batch}"
            )
        else:
            source = "critical batch (noise scale)"
            window = "" if result.noise is None else f", over {result.noise.window_steps} steps"
        rows.append((source, f"{rec.noise_scale:,.0f}{interval}{window}"))
        rows.append(("steps to target vs minimum", f"{rec.steps_to_target_ratio:.2f}×"))
    rows.append(("batch bound by", rec.bound_by))
    if precision_text(result.task.precision):
        rows.append(("precision measured", precision_text(result.task.precision)))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for reason in rec.reasons:
        console.print(f"• {plain(reason)}")
    if result.lr_check is not None:
        shorter = result.lr_check.horizons[:-1]
        after = f" (after {', '.join(map(str, shorter))})" if shorter else ""
        lr_check = Table(
            title=f"lr check: {result.lr_check.steps} steps{after} × {result.lr_check.seeds} "
            f"seed(s) per lr at batch {result.lr_check.global_batch}"
        )
        by_steps = result.lr_check.score == "steps to target"
        columns = ["lr", f"median {result.lr_check.split} loss"]
        deeper = result.lr_check.deepened_from is not None
        steps_column = (
            f"median steps to stay ≤ {result.lr_check.target_loss or math.nan:.3g}"
            if deeper
            else "median steps to target"
        )
        columns += [steps_column] if by_steps else []
        for column in (*columns, "diverged"):
            lr_check.add_column(column, justify="right")
        for trial in result.lr_check.trials:
            mark = " ← chosen" if trial.lr == result.lr_check.lr else ""
            cells = [f"{trial.lr:.4g}{mark}", f"{trial.median:.4g}"]
            if by_steps:
                steps = trial.median_steps
                cells.append("not reached" if math.isinf(steps) else f"{steps:.4g}")
            lr_check.add_row(*cells, "yes" if trial.diverged else "no")
        console.print(lr_check)
    for advice in rec.warnings:
        console.print(f"[yellow]warning ({advice.code}):[/yellow] {plain(advice.message)}")
    if result.verification is not None:
        verification = result.verification
        check = Table(
            title=f"verification: {verification.epochs:.2g} epochs each (×0.5 / ×1 / ×2 the batch)"
        )
        for column in ("global batch", "lr", "steps", "val loss", "metric", "seconds"):
            check.add_column(column, justify="right")
        for run in verification.runs:
            mark = " ← best" if run.global_batch == verification.best_batch else ""
            check.add_row(
                f"{run.global_batch}{mark}",
                f"{run.lr:.3g}",
                str(run.steps),
                "-" if run.score is None else f"{run.score:.4f}",
                "-" if run.metric is None else f"{run.metric:.4f}",
                f"{run.seconds:.1f}",
            )
        console.print(check)
    for note in result.notes:
        console.print(f"note: {plain(note)}")
    console.print(f"took {result.phase_seconds.get('total', 0):.1f} s; report: {plain(report)}")
