"""``batchpilot lr-find``: the learning-rate range test, its suggestions and how sure they are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
    check_out_folder,
    command_app,
    emit,
    get_task,
    progress,
    split_options,
)
from batchpilot.devices import resolve_device
from batchpilot.errors import BadInputError
from batchpilot.jsonio import to_json
from batchpilot.measure._lr_range import (
    DEFAULT_METHOD,
    MODES,
    VERIFY_FINAL_SEEDS,
    VERIFY_SEEDS,
    LRFinderResult,
    Verification,
    find_lr,
)
from batchpilot.measure._lr_suggest import METHODS

DEFAULT_OUT = Path("batchpilot-lr-find")


commands = command_app()


@commands.command(
    "lr-find",
    help=(
        "LR range test at your batch: the lr grows from --min-lr to --max-lr over --steps "
        "optimizer steps, repeated --repeats times; prints the suggested lr of each rule with its "
        "spread over the repeats and writes a plot. "
        "Example: batchpilot lr-find --example digits --batch 64 (or --micro-batch 32 --accumulation 2)"
    ),
)
def lr_find_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    batch: BatchOpt = None,
    micro_batch: MicroBatchOpt = None,
    accumulation: AccumulationOpt = None,
    min_lr: Annotated[float, typer.Option("--min-lr", help="First lr of the test.")] = 1e-6,
    max_lr: Annotated[float, typer.Option("--max-lr", help="Last lr of the test.")] = 10.0,
    steps: Annotated[
        int, typer.Option("--steps", help="Optimizer steps per test (one point each).")
    ] = 100,
    repeats: Annotated[
        int,
        typer.Option("--repeats", help="Tests with different seeds (model init and data order)."),
    ] = 3,
    mode: Annotated[
        str, typer.Option("--mode", help=f"lr schedule: {' or '.join(MODES)}.")
    ] = "exponential",
    method: Annotated[
        str,
        typer.Option("--method", help=f"Rule behind the suggestion: {', '.join(METHODS)}."),
    ] = DEFAULT_METHOD,
    divergence_factor: Annotated[
        float,
        typer.Option(
            "--divergence-factor",
            help="Stop when the smoothed loss exceeds this × its best value.",
        ),
    ] = 4.0,
    verify_steps: Annotated[
        int | None,
        typer.Option(
            "--verify-steps",
            help=(
                "Also train a fresh model this many steps (ideally the length of your run) at "
                "each suggestion and on a ladder below the divergence point; the lowest loss "
                "becomes the suggestion."
            ),
        ),
    ] = None,
    verify_seeds: Annotated[
        int,
        typer.Option(
            "--verify-seeds",
            help="Seeds for the best verification candidates (scored by their median loss).",
        ),
    ] = VERIFY_SEEDS,
    verify_final_seeds: Annotated[
        int,
        typer.Option(
            "--verify-final-seeds",
            help=(
                "Seeds for the leader and the rivals within reach of it in the tie-break round "
                "(at most --verify-seeds: no tie-break)."
            ),
        ),
    ] = VERIFY_FINAL_SEEDS,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for the plot (lr-find.png) and the result (lr-find.json)."
        ),
    ] = DEFAULT_OUT,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="Write the plot and the JSON file to --out.")
    ] = True,
    precision: PrecisionOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    if plot:
        check_out_folder(out)
    task = get_task(task_spec, example).with_precision(precision)
    micro, steps_per_batch = split_options(
        batch, micro_batch, accumulation, default_batch=task.reference_batch
    )
    if micro > task.train_size:
        option = "--micro-batch" if micro_batch is not None else "--batch"
        raise BadInputError(
            f"{option}: {micro} is larger than the training set ({task.train_size} samples)"
        )
    with progress() as bar:
        job = bar.add_task("range test", total=repeats * steps)
        result = find_lr(
            task,
            micro_batch=micro,
            accumulation_steps=steps_per_batch,
            min_lr=min_lr,
            max_lr=max_lr,
            steps=steps,
            mode=mode,
            repeats=repeats,
            seed=seed,
            device=resolve_device(device),
            divergence_factor=divergence_factor,
            method=method,
            verify_steps=verify_steps,
            verify_seeds=verify_seeds,
            verify_final_seeds=verify_final_seeds,
            on_step=lambda done, total: bar.update(job, completed=done, total=total),
        )
    files: dict[str, str | None] = {"plot": None, "json": None}
    if plot:
        files = write_outputs(result, out)
    data = {**result.to_dict(), **files}
    emit(fmt, data, lambda console: _render(console, result, task.name, files))


def write_outputs(result: LRFinderResult, folder: Path) -> dict[str, str | None]:
    """Write ``lr-find.png`` and ``lr-find.json`` into ``folder``; returns their paths."""
    # matplotlib is imported only when a plot is wanted: it is slow to import.
    import matplotlib.pyplot as plt

    from batchpilot.plots import save_figure
    from batchpilot.plots.lr_find import plot_lr_find

    ax = plot_lr_find(result)
    png = save_figure(ax.figure, folder / "lr-find.png")  # type: ignore[arg-type]
    plt.close(ax.figure)  # type: ignore[arg-type]
    path = folder / "lr-find.json"
    path.write_text(to_json(result.to_dict(), indent=2))
    return {"plot": str(png), "json": str(path)}


def _render(
    console: Console, result: LRFinderResult, name: str, files: dict[str, str | None]
) -> None:
    split = (
        f" ({result.micro_batch} × {result.accumulation_steps})"
        if result.accumulation_steps > 1
        else ""
    )
    table = Table(
        title=(
            f"lr range test on {plain(name)}: batch {result.global_batch}{split}, {result.steps} steps "
            f"from {result.min_lr:g} to {result.max_lr:g} ({result.mode}), {len(result.runs)} "
            f"repeats, {result.seconds:.1f} s"
        )
    )
    checks = {}
    if result.verification is not None:
        for check in result.verification.candidates:
            for names in check.methods:
                for method in names.split(" & "):  # names of one grid point
                    checks[method] = check
    table.add_column("rule")
    table.add_column("suggested lr", justify="right")
    table.add_column("median over repeats", justify="right")
    table.add_column("IQR over repeats", justify="right")
    if checks and result.verification is not None:
        # The loss at the grid point the rule's lr was rounded to.
        table.add_column(f"loss after {result.verification.steps} steps", justify="right")
    for method, lr in result.suggestions.items():
        spread = result.spread[method]
        label = f"{method} (default)" if method == result.method else method
        row = [
            label,
            "—" if lr is None else f"{lr:.3g}",
            "—" if spread["median"] is None else f"{spread['median']:.3g}",
            "—"
            if spread["q1"] is None or spread["q3"] is None
            else f"{spread['q1']:.3g} – {spread['q3']:.3g}",
        ]
        if checks:
            found = checks.get(method)
            row.append(
                "—" if found is None else ("diverged" if found.diverged else f"{found.loss:.4f}")
            )
        table.add_row(*row)
    console.print(table)
    verification = result.verification
    if verification is not None:
        runs = Table(
            title=(
                f"verification: {verification.runs} training runs of {verification.steps} "
                f"steps; the lowest median {verification.split} loss over {_seeds(verification)} "
                "seeds wins"
            )
        )
        runs.add_column("lr", justify="right")
        runs.add_column("candidate")
        runs.add_column("seeds", justify="right")
        runs.add_column(f"median {verification.split} loss", justify="right")
        runs.add_column("mean", justify="right")
        for check in sorted(verification.candidates, key=lambda c: c.lr):
            mark = " ←" if check.lr == verification.best_lr else ""
            runs.add_row(
                f"{check.lr:.3g}{mark}",
                ", ".join(check.methods),
                str(len(check.losses)),
                "diverged" if check.diverged else f"{check.loss:.4f}",
                "diverged" if check.diverged else f"{check.mean_loss:.4f}",
            )
        console.print(runs)
    if result.suggestion is not None and verification is not None:
        console.print(
            f"suggested lr: [bold]{result.suggestion:.3g}[/bold] (verified: "
            f"{', '.join(verification.best_methods)}; the lowest median {verification.split} "
            f"loss after {verification.steps} steps over {_seeds(verification)} seeds)"
        )
    elif result.suggestion is not None:
        console.print(f"suggested lr: [bold]{result.suggestion:.3g}[/bold] ({result.method})")
    if result.message:
        console.print(f"[yellow]{plain(result.message)}[/yellow]")
    if result.diverged_at is not None:
        console.print(
            f"the loss diverged at lr {result.diverged_at:.3g} (points from there on dropped)"
        )
    for note in result.notes:
        console.print(f"• {plain(note)}")
    if files.get("plot"):
        console.print(f"plot: {plain(files['plot'])}  data: {plain(files['json'])}")


def _seeds(verification: Verification) -> int:
    """Seeds behind the winner (those of the tie-break round, when there was one)."""
    for check in verification.candidates:
        if check.lr == verification.best_lr:
            return len(check.losses)
    return verification.final_seeds or verification.seeds
