"""``batchpilot memory`` and ``batchpilot throughput``: the largest batch that fits, the batch that
runs fastest, and the accumulation plan for a global batch larger than what fits."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.checks import check_fraction, check_positive_int, check_run_steps
from batchpilot.cli._text import plain, precision_text
from batchpilot.cli.app import (
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    OldMaxBatchOpt,
    OutOpt,
    OutputFormat,
    PrecisionOpt,
    SeedOpt,
    TaskArg,
    check_out_folder,
    command_app,
    emit,
    get_task,
    option_names,
    renamed,
    stderr,
)
from batchpilot.devices import resolve_device
from batchpilot.errors import BadInputError
from batchpilot.measure._memory import MEMORY_MODES
from batchpilot.measure._memory_search import (
    MaxBatchResult,
    find_max_batch,
    format_bytes,
    parse_size,
)
from batchpilot.measure._throughput import ROUNDINGS, ThroughputCurve, round_batch
from batchpilot.measure._throughput_run import run_throughput
from batchpilot.plan._accumulation import AccumulationPlan

DeviceMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--device-memory",
        help="Memory to plan for, e.g. 80GiB, 80GB, 512MiB [default: what the device has free]. "
        "More than this machine has: measured on fake tensors.",
    ),
]
MarginOpt = Annotated[
    float,
    typer.Option(
        "--margin", help="Fraction of the memory kept free as a safety margin (0.05 = 5 %)."
    ),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help=f"How memory is measured: {', '.join(MEMORY_MODES)} (auto; tracked: live tensors, "
        "any device; cuda: the allocator; fake: fake tensors, no device needed).",
    ),
]
# Library argument names and the options of these commands that carry them.
_NAMES = {
    "budget_bytes": "--device-memory",
    "max_batch": "--max-micro-batch",
    "batches": "--micro-batches",
    "timed_steps": "--steps",
    "warmup_steps": "--warmup",
}


def _margin(margin: float) -> float:
    if margin >= 1:
        raise BadInputError(f"--margin: expected a fraction in [0, 1) (0.05 = 5 %), got {margin:g}")
    return check_fraction("--margin", margin)


def _budget(device_memory: str | None) -> int | None:
    with option_names(device_memory="--device-memory"):
        return parse_size(device_memory) if device_memory is not None else None


commands = command_app()


@commands.command(
    "memory",
    help=(
        "The largest micro-batch whose training step fits in memory: a fitted memory model from "
        "a few probes, verified by a real step. --device-memory plans for a device you do not "
        "have. Example: batchpilot memory --example digits --device-memory 256MiB"
    ),
)
def memory_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    device_memory: DeviceMemoryOpt = None,
    margin: MarginOpt = 0.05,
    rounding: Annotated[
        str,
        typer.Option(
            "--round",
            help="Round the answer down: none, 8 (a multiple of 8) or pow2 (a power of 2).",
        ),
    ] = "none",
    max_micro_batch: Annotated[
        int | None,
        typer.Option(
            "--max-micro-batch",
            help="Largest micro-batch to consider (the training set size caps it).",
        ),
    ] = None,
    old_max_batch: OldMaxBatchOpt = None,
    mode: ModeOpt = "auto",
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    if rounding not in ROUNDINGS:
        raise BadInputError(f"--round: expected one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    check_out_folder(out)
    fraction, budget = _margin(margin), _budget(device_memory)
    cap = renamed("--max-batch", "--max-micro-batch", old_max_batch, max_micro_batch)
    task = get_task(task_spec, example).with_precision(precision)
    with option_names(**_NAMES), stderr().status("measuring memory…"):
        result = find_max_batch(
            task,
            device=resolve_device(device),
            budget_bytes=budget,
            margin=fraction,
            max_batch=cap,
            mode=mode,
            seed=seed,
        )
    micro_batch = round_batch(result.max_micro_batch, rounding)
    data: dict[str, Any] = {**result.to_dict(), "round": rounding, "micro_batch": micro_batch}
    if out is not None:
        from batchpilot.plots import save_figure
        from batchpilot.plots.memory import plot_memory_and_throughput

        data["plot"] = str(
            save_figure(plot_memory_and_throughput(result, None), out / "memory.png")
        )
    emit(fmt, data, lambda console: _render_memory(console, result, micro_batch, rounding, data))


def _render_memory(
    console: Console, result: MaxBatchResult, micro_batch: int, rounding: str, data: dict[str, Any]
) -> None:
    precision = precision_text(result.precision)
    table = Table(
        title=f"memory of a training step ({result.mode}, {result.device})"
        + (f", measured in {precision}" if precision else "")
    )
    # Reserved differs from the peak only where an allocator reports it (CUDA).
    reserved = any(p.reserved_bytes != p.peak_bytes for p in result.probes)
    columns = ("micro-batch", "peak", *(("reserved",) if reserved else ()), "fits", "how")
    for column in columns:
        table.add_column(column, justify="right" if column != "how" else "left")
    for probe in result.probes:
        cells = [
            str(probe.batch),
            "out of memory" if probe.peak_bytes is None else format_bytes(probe.peak_bytes),
        ]
        if reserved:
            cells.append("" if probe.reserved_bytes is None else format_bytes(probe.reserved_bytes))
        cells += [
            "yes" if probe.ok else "no",
            f"{probe.stage}{' (fake tensors)' if probe.estimated else ''}",
        ]
        table.add_row(*cells)
    console.print(table)
    answer = f"[bold]max micro-batch {result.max_micro_batch}[/bold]"
    if micro_batch != result.max_micro_batch:
        answer += f" → {micro_batch} rounded ({rounding})"
    console.print(
        f"{answer} ({result.capped_by} bound): peak {format_bytes(result.peak_bytes)} of a "
        f"{format_bytes(result.limit_bytes)} limit = {format_bytes(result.budget_bytes)} budget − "
        f"{format_bytes(result.margin_bytes)} margin ({result.margin:.0%} + "
        f"{format_bytes(result.overhead_bytes)} allocator overhead)"
    )
    console.print(
        f"memory model: {format_bytes(result.fixed_bytes)} + "
        f"{format_bytes(result.bytes_per_sample)} × micro-batch; {result.steps} "
        f"{'steps on fake tensors' if result.mode == 'fake' else 'training steps'}, "
        f"{result.seconds:.1f} s"
    )
    for note in result.notes:
        console.print(f"• {plain(note)}")
    if "plot" in data:
        console.print(f"plot: {plain(data['plot'])}")


@commands.command(
    "throughput",
    help=(
        "Samples per second against micro-batch on a doubling ladder up to the memory limit: the "
        "knee (where doubling stops paying), the fastest micro-batch, the measured cost of "
        "rounding to a power of 2 or a multiple of 8, and with --batch the accumulation plan. "
        "Without --max-micro-batch or --micro-batches the memory limit is found first. "
        "Example: batchpilot throughput --example digits --max-micro-batch 512"
    ),
)
def throughput_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    max_micro_batch: Annotated[
        int | None,
        typer.Option(
            "--max-micro-batch",
            help="Top of the ladder [default: the largest micro-batch that fits, found first].",
        ),
    ] = None,
    old_max_batch: OldMaxBatchOpt = None,
    micro_batches: Annotated[
        str | None,
        typer.Option(
            "--micro-batches", help="Comma-separated micro-batches to time instead of a ladder."
        ),
    ] = None,
    old_batches: Annotated[str | None, typer.Option("--batches", hidden=True)] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed steps before timing each batch.")
    ] = 2,
    steps: Annotated[
        int, typer.Option("--steps", help="Timed steps per batch (the median is kept).")
    ] = 5,
    knee: Annotated[
        float,
        typer.Option(
            "--knee",
            help="The knee is the smallest micro-batch reaching this fraction of the best speed.",
        ),
    ] = 0.9,
    global_batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            help="A global batch to plan: micro-batch × accumulation × world size, fastest first.",
        ),
    ] = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="Data-parallel devices for --batch.")
    ] = 1,
    device_memory: DeviceMemoryOpt = None,
    margin: MarginOpt = 0.05,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    if not 0 < knee <= 1:
        raise BadInputError(f"--knee: expected a fraction in (0, 1] (0.9 = 90 %), got {knee:g}")
    check_run_steps("--steps", steps)
    if warmup < 0:
        raise BadInputError(f"--warmup: expected a non-negative integer, got {warmup}")
    if warmup:
        check_run_steps("--warmup", warmup)
    check_positive_int("--world-size", world_size)
    if global_batch is not None:
        check_positive_int("--batch", global_batch)
    check_out_folder(out)
    fraction, budget = _margin(margin), _budget(device_memory)
    top = renamed("--max-batch", "--max-micro-batch", old_max_batch, max_micro_batch)
    listed = renamed("--batches", "--micro-batches", old_batches, micro_batches)
    chosen: list[int] | None = None
    if listed is not None:
        try:
            chosen = [int(value) for value in listed.split(",") if value.strip()]
        except ValueError as exc:
            raise BadInputError(
                f"--micro-batches: expected comma-separated integers, got {listed!r}"
            ) from exc
    task = get_task(task_spec, example).with_precision(precision)
    with option_names(**_NAMES), stderr().status("timing training steps…"):
        run = run_throughput(
            task,
            micro_batches=chosen,
            max_micro_batch=top,
            global_batch=global_batch,
            world_size=world_size,
            budget_bytes=budget,
            margin=fraction,
            device=resolve_device(device),
            warmup_steps=warmup,
            timed_steps=steps,
            knee_fraction=knee,
            seed=seed,
        )
    data: dict[str, Any] = run.to_dict()
    if out is not None:
        from batchpilot.plots import save_figure
        from batchpilot.plots.memory import plot_memory_and_throughput

        figure = plot_memory_and_throughput(run.memory, run.curve)
        data["plot"] = str(save_figure(figure, out / "throughput.png"))
    emit(
        fmt,
        data,
        lambda console: _render_throughput(console, run.curve, run.accumulation, data),
    )


def _render_throughput(
    console: Console, curve: ThroughputCurve, plan: AccumulationPlan | None, data: dict[str, Any]
) -> None:
    precision = precision_text(curve.precision)
    table = Table(
        title=f"throughput on {curve.device} (median of {curve.timed_steps} steps after "
        f"{curve.warmup_steps} warm-up)" + (f", measured in {precision}" if precision else "")
    )
    for column in ("micro-batch", "samples/s", "ms/step", ""):
        table.add_column(column, justify="right" if column else "left")
    for point in curve.points:
        marks = [
            label
            for label, batch in (("knee", curve.knee_batch), ("best", curve.best_batch))
            if batch == point.batch
        ]
        table.add_row(
            str(point.batch),
            f"{point.samples_per_second:,.0f}",
            f"{point.seconds_per_step * 1000:.2f}",
            ", ".join(marks),
        )
    console.print(table)
    console.print(
        f"knee: micro-batch {curve.knee_batch} (smallest reaching {curve.knee_fraction:.0%} of the "
        f"best); fastest: {curve.best_batch}"
    )
    if curve.stopped_at is not None:
        console.print(f"micro-batch {curve.stopped_at} ran out of memory: the ladder stopped there")
    for cost in curve.rounding:
        rule = "a power of 2" if cost.rule == "pow2" else "a multiple of 8"
        console.print(
            f"rounding {cost.batch} down to {rule} ({cost.rounded_batch}): "
            f"{cost.change:+.1%} samples/s (measured)"
        )
    if plan is not None:
        speed = (
            f", ~{plan.samples_per_second:,.0f} samples/s"
            if plan.samples_per_second is not None
            else ""
        )
        console.print(
            f"[bold]global batch {plan.global_batch}[/bold] = micro-batch {plan.micro_batch} × "
            f"{plan.accumulation_steps} accumulation × {plan.world_size} device(s){speed}: "
            f"{plain(plan.reason)}"
        )
    if "plot" in data:
        console.print(f"plot: {plain(data['plot'])}")
