"""``batchpilot noise``: the gradient noise scale during a short training run, and the goodput plan.

The learning rate comes from ``--lr``, else from the range test (:mod:`batchpilot.measure._lr_range`), else
the task's reference lr. The throughput curve comes from :mod:`batchpilot.measure._throughput` when that
module is installed, else from timing a few training steps per micro-batch here.
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from batchpilot.checks import check_positive_int
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
    progress,
    stderr,
)
from batchpilot.data import to_device
from batchpilot.devices import release_memory, resolve_device, synchronize
from batchpilot.errors import BadInputError
from batchpilot.measure._noise import NoiseScaleResult, check_split, measure_noise_scale
from batchpilot.oom import is_out_of_memory
from batchpilot.plan._goodput import GoodputPlan, Throughput, plan_goodput
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, micro_batches


@app.command(
    "noise",
    help=(
        "Measure the gradient noise scale (the critical batch) during a short training run, and "
        "recommend the global batch with the best goodput = throughput × statistical efficiency. "
        "Example: batchpilot noise --example digits --batch 64 --steps 200"
    ),
)
def noise_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch", help="Global batch of the run [default: the task's reference batch]."
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps of the run.")] = 200,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate [default: from the LR range test at --batch]."),
    ] = None,
    micro_batches_per_step: Annotated[
        int | None,
        typer.Option(
            "--micro-batches",
            help="Micro-batches each batch is split into (the small batch of the estimate) "
            "[default: 4, or 3 or 2 when 4 does not divide --batch].",
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            help="Largest global batch to consider [default: the training set size].",
        ),
    ] = None,
    world_size: Annotated[
        int, typer.Option("--world-size", help="Data-parallel devices to plan the batch for.")
    ] = 1,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    debug: DebugOpt = False,
) -> None:
    check_out_folder(out)
    task = get_task(task_spec, example)
    batch = batch if batch is not None else task.reference_batch
    if batch is None:
        raise BadInputError("--batch: the task has no reference batch; give --batch")
    if micro_batches_per_step is None:
        micro_batches_per_step = next((k for k in (4, 3, 2) if batch % k == 0), 4)
    check_split(task, batch=batch, micro_batches=micro_batches_per_step)  # before the range test
    check_positive_int("steps", steps)
    check_positive_int("world_size", world_size)
    if max_batch is not None:
        check_positive_int("max_batch", max_batch)
    target_device = resolve_device(device)
    notes: list[str] = []

    lr, lr_source = _learning_rate(task, lr, batch, target_device, seed, notes)
    with progress() as bar:
        job = bar.add_task("noise scale", total=steps)
        result = measure_noise_scale(
            task,
            batch=batch,
            steps=steps,
            lr=lr,
            micro_batches=micro_batches_per_step,
            device=target_device,
            seed=seed,
            on_step=lambda step, loss: bar.update(job, completed=step + 1),
        )
    if result.diverged:
        notes.append(
            f"the loss became non-finite after {result.steps} steps at lr {lr:.3g}: "
            "the estimate covers the steps before; try a smaller --lr"
        )

    largest = min(task.train_size, max_batch) if max_batch is not None else task.train_size
    ladder = _throughput_ladder(batch, largest)
    throughput, throughput_source = _throughput(task, ladder, lr, target_device, seed, notes)
    plan: GoodputPlan | None = None
    if result.steps and not math.isnan(result.noise_scale):
        plan = plan_goodput(
            throughput,
            noise_scale=result.noise_scale,
            base_batch=batch,
            max_batch=largest,
            world_size=world_size,
        )
        if math.isinf(result.noise_scale):
            notes.append(
                "the gradient's signal was not measurable above its noise (infinite noise "
                "scale): efficiency is 1 at every batch and the plan follows throughput alone"
            )
    else:
        notes.append("no step gave a usable estimate, so there is no goodput plan")

    data = _as_dict(result, plan, lr_source, throughput_source, throughput, notes)
    if out is not None:
        data["plot"] = str(_save_plot(result, plan, out))
    emit(fmt, data, lambda console: _render(console, result, plan, data))


def _learning_rate(
    task: Task,
    lr: float | None,
    batch: int,
    device: torch.device,
    seed: int,
    notes: list[str],
) -> tuple[float, str]:
    if lr is not None:
        return lr, "given"
    lr_finder = _optional("batchpilot.measure._lr_range")
    if lr_finder is not None:
        with progress() as bar:
            job = bar.add_task("LR range test", total=None)
            found = lr_finder.find_lr(
                task,
                micro_batch=batch,
                device=device,
                seed=seed,
                on_step=lambda done, total: bar.update(job, completed=done, total=total),
            )
        if found.suggestion is not None:
            notes.append(f"lr {found.suggestion:.3g} from the LR range test at batch {batch}")
            return float(found.suggestion), "range test"
        notes.append(f"the LR range test gave no suggestion ({found.message or 'no descent'})")
    else:
        notes.append("the LR range test is not available in this installation")
    if task.reference_lr is None:
        raise BadInputError("--lr: no lr from the range test and the task has no reference lr")
    notes.append(f"using the task's reference lr {task.reference_lr:g}")
    return task.reference_lr, "reference lr"


def _optional(name: str) -> Any:
    """A sibling measurement module, or None where this installation lacks it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _throughput_ladder(batch: int, largest: int) -> list[int]:
    """Powers of two from batch/16 to 16·batch (capped by ``largest``), and ``batch`` itself."""
    low, high = max(1, batch // 16), min(largest, 16 * batch)
    ladder = {min(batch, high)}
    power = 1
    while power <= high:
        if power >= low:
            ladder.add(power)
        power *= 2
    return sorted(ladder)


def _throughput(
    task: Task,
    ladder: list[int],
    lr: float,
    device: torch.device,
    seed: int,
    notes: list[str],
) -> tuple[Throughput, str]:
    throughput_module = _optional("batchpilot.measure._throughput")
    if throughput_module is not None:
        with progress() as bar:
            bar.add_task("throughput", total=None)
            curve = throughput_module.measure_throughput(task, batches=ladder, device=device)
        return curve, "measure_throughput"
    notes.append(
        "throughput timed here (median of 5 training steps per micro-batch after 2 warm-up steps)"
    )
    with progress() as bar:
        job = bar.add_task("throughput", total=len(ladder))
        pairs = _time_training_steps(
            task, ladder, lr, device, seed, on_batch=lambda: bar.advance(job)
        )
    if not pairs:
        raise BadInputError("--batch: no micro-batch of the throughput ladder could be trained")
    return pairs, "timed here"


def _time_training_steps(
    task: Task,
    ladder: list[int],
    lr: float,
    device: torch.device,
    seed: int,
    *,
    on_batch: Any = None,
    warmup: int = 2,
    repeats: int = 5,
) -> list[tuple[int, float]]:
    """Samples per second of a full training step at each micro-batch (stops at the first OOM)."""
    pairs: list[tuple[int, float]] = []
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), lr)
        try:
            for micro in ladder:
                source = micro_batches(task, micro, seed=seed)
                batches = [to_device(next(source), device) for _ in range(warmup + repeats)]
                seconds = []
                try:
                    for index, part in enumerate(batches):
                        synchronize(device)
                        start = time.perf_counter()
                        optimizer.zero_grad(set_to_none=True)
                        accumulate_gradients(task, model, [part], device=device)
                        optimizer.step()
                        synchronize(device)
                        if index >= warmup:
                            seconds.append(time.perf_counter() - start)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    break
                finally:
                    del batches
                pairs.append((micro, micro / statistics.median(seconds)))
                if on_batch is not None:
                    on_batch()
        finally:
            del model, optimizer
            release_memory(device)
    return pairs


def _throughput_points(throughput: Throughput) -> list[dict[str, float]]:
    points: Any = getattr(throughput, "points", throughput)
    rows = []
    for point in points:
        batch = getattr(point, "batch", None)
        speed = getattr(point, "samples_per_second", None)
        if batch is None or speed is None:
            batch, speed = point[0], point[1]
        rows.append({"batch": int(batch), "samples_per_second": float(speed)})
    return rows


def _as_dict(
    result: NoiseScaleResult,
    plan: GoodputPlan | None,
    lr_source: str,
    throughput_source: str,
    throughput: Throughput,
    notes: list[str],
) -> dict[str, Any]:
    measured = result.to_dict()
    data: dict[str, Any] = {
        "task": result.task,
        "noise_scale": result.noise_scale,
        "noise_scale_interval": list(result.noise_scale_interval),
        "critical_batch": result.critical_batch,
        "batch": result.batch,
        "micro_batch": result.micro_batch,
        "micro_batches": result.micro_batches,
        "lr": result.lr,
        "lr_source": lr_source,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "gradient_sq_norm": result.gradient_sq_norm,
        "trace_covariance": result.trace_covariance,
        "history": measured["history"],
        "efficiency": [],
        "recommended_batch": None,
        "recommended": None,
        "throughput_source": throughput_source,
        "throughput": _throughput_points(throughput),
        "seconds": result.seconds,
        "diverged": result.diverged,
        "warnings": list(result.warnings),
        "notes": notes,
    }
    if plan is not None:
        data["efficiency"] = [
            {
                "batch": point.global_batch,
                "micro_batch": point.micro_batch,
                "accumulation_steps": point.accumulation_steps,
                "samples_per_second": point.samples_per_second,
                "efficiency": point.efficiency,
                "steps_ratio": point.steps_ratio,
                "goodput": point.goodput,
            }
            for point in plan.points
        ]
        data["recommended_batch"] = plan.recommended_batch
        recommended = plan.to_dict()["recommended"]
        data["recommended"] = recommended
    return data


def _save_plot(result: NoiseScaleResult, plan: GoodputPlan | None, out: Any) -> Any:
    import matplotlib.pyplot as plt

    from batchpilot.plots import save_figure
    from batchpilot.plots.noise import plot_goodput, plot_noise_history

    figure, axes = plt.subplots(1, 2 if plan is not None else 1, figsize=(12, 4), squeeze=False)
    plot_noise_history(result, ax=axes[0][0])
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


def _render(
    console: Console, result: NoiseScaleResult, plan: GoodputPlan | None, data: dict[str, Any]
) -> None:
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
        goodput = Table(title=f"goodput per global batch (throughput {data['throughput_source']})")
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
