"""``batchpilot noise``: the gradient noise scale during a short training run, and the goodput plan.

A thin adapter over :func:`batchpilot.measure.run_noise`: the phases it runs (a range test only
without ``--lr``, throughput only for the goodput table) are named in the help and printed.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    BatchOpt,
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    MicroBatchOpt,
    OutOpt,
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
from batchpilot.measure._noise_run import (
    GOODPUT_SPAN,
    NOISE_LR_REPEATS,
    NOISE_LR_STEPS,
    NOISE_THROUGHPUT_SECONDS,
    NoiseRun,
    run_noise,
)

commands = command_app()


@commands.command(
    "noise",
    help=(
        "Measure the gradient noise scale (the critical batch) during a short training run at "
        "--batch and --lr, and the goodput = throughput × statistical efficiency of each global "
        "batch. What runs, each phase printed: without --lr first a range test (--lr-repeats × "
        "--lr-steps steps at --batch); the noise-scale run (--steps steps); with --throughput "
        f"(the default) the speed of micro-batches from --batch / {GOODPUT_SPAN} to "
        f"{GOODPUT_SPAN} × --batch (at most --max-batch), within --throughput-seconds. "
        "Example: batchpilot noise --example digits --batch 64 --lr 0.05 --steps 200"
    ),
)
def noise_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    batch: BatchOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps of the run.")] = 200,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate [default: from a range test at --batch]."),
    ] = None,
    micro_batch: MicroBatchOpt = None,
    accumulation: Annotated[
        int | None,
        typer.Option(
            "--accumulation",
            help="Micro-batches each step is split into: the small batch of the estimate is "
            "--batch / this [default: 4, or 3 or 2 when 4 does not divide --batch].",
        ),
    ] = None,
    old_micro_batches: Annotated[int | None, typer.Option("--micro-batches", hidden=True)] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            help="Largest global batch of the goodput table [default: the training set size].",
        ),
    ] = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="Data-parallel devices to plan the batch for.")
    ] = 1,
    throughput: Annotated[
        bool,
        typer.Option(
            "--throughput/--no-throughput",
            help="Time the micro-batches of the goodput table and plan goodput; "
            "--no-throughput measures the noise scale only.",
        ),
    ] = True,
    throughput_seconds: Annotated[
        float,
        typer.Option("--throughput-seconds", help="Wall-clock bound of the throughput phase."),
    ] = NOISE_THROUGHPUT_SECONDS,
    lr_steps: Annotated[
        int, typer.Option("--lr-steps", help="Steps of each range test (only without --lr).")
    ] = NOISE_LR_STEPS,
    lr_repeats: Annotated[
        int, typer.Option("--lr-repeats", help="Range tests over seeds (only without --lr).")
    ] = NOISE_LR_REPEATS,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    check_out_folder(out)
    accumulation = renamed("--micro-batches", "--accumulation", old_micro_batches, accumulation)
    task = get_task(task_spec, example).with_precision(precision)
    with option_names(micro_batches="--accumulation"), progress() as bar:
        run = run_noise(
            task,
            batch=batch,
            steps=steps,
            lr=lr,
            micro_batch=micro_batch,
            micro_batches=accumulation,
            max_batch=max_batch,
            world_size=world_size,
            throughput=throughput,
            throughput_seconds=throughput_seconds,
            lr_steps=lr_steps,
            lr_repeats=lr_repeats,
            device=resolve_device(device),
            seed=seed,
            progress=PhaseBars(bar),
        )
    data = run.to_dict()
    if out is not None:
        data["plot"] = str(_save_plot(run, out))
    emit(fmt, data, lambda console: _render(console, run, data))


def _save_plot(run: NoiseRun, out: Any) -> Any:
    import matplotlib.pyplot as plt

    from batchpilot.plots import save_figure
    from batchpilot.plots.noise import plot_goodput, plot_noise_history

    plan = run.goodput
    figure, axes = plt.subplots(1, 2 if plan is not None else 1, figsize=(12, 4), squeeze=False)
    plot_noise_history(run.noise, ax=axes[0][0])
    if plan is not None:
        plot_goodput(plan, ax=axes[0][1])
    figure.tight_layout()
    path = save_figure(figure, out / "noise.png")
    plt.close(figure)
    return path


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.4g}"


def _render(console: Console, run: NoiseRun, data: dict[str, Any]) -> None:
    result, plan = run.noise, run.goodput
    for phase in run.phases:
        console.print(f"ran: {plain(phase)}")
    low, high = result.noise_scale_interval
    table = Table(
        title=f"gradient noise scale of {plain(result.task)}: batch {result.batch} "
        f"({result.micro_batches} × {result.micro_batch}), lr {result.lr:.3g} "
        f"({data['lr_source']}), {result.steps} steps, {result.seconds:.1f} s"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("noise scale B_simple (end of run)", _fmt(result.noise_scale))
    table.add_row("95% interval", f"{_fmt(low)} – {_fmt(high)}")
    table.add_row("critical batch of this run", _fmt(result.critical_batch))
    table.add_row("|G|² (EMA)", _fmt(result.gradient_sq_norm))
    table.add_row("tr(Σ) (EMA)", _fmt(result.trace_covariance))
    table.add_row(
        "steps used / skipped", f"{result.steps - result.skipped_steps} / {result.skipped_steps}"
    )
    if plan is not None:
        best = plan.recommended
        table.add_row(
            "recommended global batch",
            f"{best.global_batch} = {best.micro_batch} × {best.accumulation_steps}"
            + (f" × {best.world_size} devices" if best.world_size > 1 else ""),
        )
    console.print(table)
    if plan is not None:
        goodput = Table(title="goodput per global batch (throughput measured, efficiency E(B))")
        for column in (
            "batch",
            "micro × accum",
            "samples/s",
            "efficiency",
            "steps / S_min",
            "goodput (rel.)",
        ):
            goodput.add_column(column, justify="right")
        best_goodput = plan.recommended.goodput
        for point in plan.points:
            mark = " ←" if point.global_batch == plan.recommended_batch else ""
            goodput.add_row(
                f"{point.global_batch}{mark}",
                f"{point.micro_batch} × {point.accumulation_steps}",
                f"{point.samples_per_second:.4g}",
                f"{point.efficiency:.3f}",
                f"{point.steps_ratio:.3g}",
                f"{point.goodput / best_goodput:.3f}",
            )
        console.print(goodput)
    for line in data["warnings"]:
        stderr().print(f"[yellow]warning:[/yellow] {plain(line)}")
    for line in data["notes"]:
        console.print(f"• {plain(line)}")
    if "plot" in data:
        console.print(f"plot: {plain(data['plot'])}")
