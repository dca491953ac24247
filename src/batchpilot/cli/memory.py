"""``batchpilot memory`` and ``batchpilot throughput``: the largest batch that fits, the batch that
runs fastest, and the accumulation plan for a global batch larger than what fits."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.checks import check_positive_int, check_run_steps
from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    DebugOpt,
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    OutOpt,
    OutputFormat,
    SeedOpt,
    TaskArg,
    app,
    check_out_folder,
    emit,
    get_task,
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
from batchpilot.measure._throughput import (
    ROUNDINGS,
    ThroughputCurve,
    measure_throughput,
    round_batch,
)
from batchpilot.plan._accumulation import AccumulationPlan, plan_accumulation

DeviceMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--device-memory",
        help="Memory to plan for, e.g. 80GiB, 80GB, 512MiB [default: what the device has free]. "
        "More than this machine has: measured on fake tensors.",
    ),
]
MarginOpt = Annotated[
    float, typer.Option("--margin", help="Percent of the memory kept free as a safety margin.")
]
MaxBatchOpt = Annotated[
    int | None,
    typer.Option("--max-batch", help="Largest micro-batch to consider (the dataset size caps it)."),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        help="How memory is measured: auto, tracked (live tensors, any device), cuda (allocator) "
        "or fake (fake tensors, no device needed).",
    ),
]

# Library argument names and the options that carry them here.
_OPTIONS = {
    "budget_bytes": "--device-memory",
    "device_memory": "--device-memory",
    "margin": "--margin",
    "max_batch": "--max-batch",
    "mode": "--mode",
    "batches": "--batches",
    "global_batch": "--batch",
    "timed_steps": "--steps",
    "warmup_steps": "--warmup",
    "world_size": "--world-size",
}


def _as_option(exc: BadInputError) -> BadInputError:
    """The library names its arguments (``budget_bytes:``); say the option instead."""
    message = str(exc)
    for name, option in _OPTIONS.items():
        if message.startswith(f"{name}:"):
            return BadInputError(option + message[len(name) :])
    return exc


def _margin_fraction(percent: float) -> float:
    if not 0 <= percent < 100:
        raise BadInputError(f"--margin: expected a percentage in [0, 100), got {percent:g}")
    return percent / 100


def _max_batch_result(
    task_spec: str | None,
    example: str | None,
    *,
    device: str,
    device_memory: str | None,
    margin: float,
    max_batch: int | None,
    mode: str,
    seed: int,
) -> MaxBatchResult:
    task = get_task(task_spec, example)
    if mode not in MEMORY_MODES:
        raise BadInputError(f"--mode: expected one of {', '.join(MEMORY_MODES)}, got {mode!r}")
    try:
        budget = parse_size(device_memory) if device_memory is not None else None
        with stderr().status("measuring memory…"):
            return find_max_batch(
                task,
                device=resolve_device(device),
                budget_bytes=budget,
                margin=_margin_fraction(margin),
                max_batch=max_batch,
                mode=mode,
                seed=seed,
            )
    except BadInputError as exc:
        raise _as_option(exc) from exc


@app.command(
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
    margin: MarginOpt = 5.0,
    rounding: Annotated[
        str,
        typer.Option(
            "--round",
            help="Round the answer down: none, 8 (a multiple of 8) or pow2 (a power of 2).",
        ),
    ] = "none",
    max_batch: MaxBatchOpt = None,
    mode: ModeOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    debug: DebugOpt = False,
) -> None:
    if rounding not in ROUNDINGS:
        raise BadInputError(f"--round: expected one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    check_out_folder(out)
    result = _max_batch_result(
        task_spec,
        example,
        device=device,
        device_memory=device_memory,
        margin=margin,
        max_batch=max_batch,
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
    table = Table(title=f"memory of a training step ({result.mode}, {result.device})")
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


@app.command(
    "throughput",
    help=(
        "Samples per second against micro-batch on a doubling ladder up to the memory limit: the "
        "knee (where doubling stops paying), the fastest batch, the measured cost of rounding to a "
        "power of 2 or a multiple of 8, and with --batch the accumulation plan. "
        "Example: batchpilot throughput --example digits --max-batch 512"
    ),
)
def throughput_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            help="Top of the ladder [default: the largest micro-batch that fits, found first].",
        ),
    ] = None,
    batches: Annotated[
        str | None,
        typer.Option(
            "--batches", help="Comma-separated micro-batches to time instead of a ladder."
        ),
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed steps before timing each batch.")
    ] = 2,
    steps: Annotated[
        int, typer.Option("--steps", help="Timed steps per batch (the median is kept).")
    ] = 5,
    knee_percent: Annotated[
        float,
        typer.Option("--knee", help="The knee is the smallest batch reaching this % of the best."),
    ] = 90.0,
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
    margin: MarginOpt = 5.0,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    debug: DebugOpt = False,
) -> None:
    if not 0 < knee_percent <= 100:
        raise BadInputError(f"--knee: expected a percentage in (0, 100], got {knee_percent:g}")
    check_run_steps("--steps", steps)
    if warmup < 0:
        raise BadInputError(f"--warmup: expected a non-negative integer, got {warmup}")
    if warmup:
        check_run_steps("--warmup", warmup)
    check_positive_int("--world-size", world_size)
    if global_batch is not None:
        check_positive_int("--batch", global_batch)
    check_out_folder(out)
    chosen: list[int] | None = None
    if batches is not None:
        try:
            chosen = [int(value) for value in batches.split(",") if value.strip()]
        except ValueError as exc:
            raise BadInputError(
                f"--batches: expected comma-separated integers, got {batches!r}"
            ) from exc
    task = get_task(task_spec, example)
    memory: MaxBatchResult | None = None
    if chosen is None and max_batch is None:
        memory = _max_batch_result(
            task_spec,
            example,
            device=device,
            device_memory=device_memory,
            margin=margin,
            max_batch=None,
            mode="auto",
            seed=seed,
        )
        max_batch = memory.max_micro_batch
    try:
        with stderr().status("timing training steps…"):
            curve = measure_throughput(
                task,
                batches=chosen,
                max_batch=max_batch,
                device=resolve_device(device),
                warmup_steps=warmup,
                timed_steps=steps,
                seed=seed,
                knee_fraction=knee_percent / 100,
            )
        plan = None
        if global_batch is not None:
            fits = (
                memory.max_micro_batch if memory is not None else max(p.batch for p in curve.points)
            )
            plan = plan_accumulation(
                global_batch, max_micro_batch=fits, curve=curve, world_size=world_size
            )
    except BadInputError as exc:
        raise _as_option(exc) from exc
    data: dict[str, Any] = curve.to_dict()
    if memory is not None:
        data["memory"] = memory.to_dict()
    if plan is not None:
        data["accumulation"] = plan.to_dict()
    if out is not None:
        from batchpilot.plots import save_figure
        from batchpilot.plots.memory import plot_memory_and_throughput

        figure = plot_memory_and_throughput(memory, curve)
        data["plot"] = str(save_figure(figure, out / "throughput.png"))
    emit(fmt, data, lambda console: _render_throughput(console, curve, plan, data))


def _render_throughput(
    console: Console, curve: ThroughputCurve, plan: AccumulationPlan | None, data: dict[str, Any]
) -> None:
    table = Table(
        title=f"throughput on {curve.device} (median of {curve.timed_steps} steps after "
        f"{curve.warmup_steps} warm-up)"
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
