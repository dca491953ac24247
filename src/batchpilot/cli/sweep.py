"""``batchpilot sweep``: a batch-size sweep (the ×0.5 / ×2 ladder or a grid), and ``sweep show``.

``sweep`` is a command group whose default command is ``run``: ``batchpilot sweep TASK …`` and
``batchpilot sweep run TASK …`` are the same, and ``batchpilot sweep show STORE`` lists what a
store holds. Anything after ``sweep`` that is not ``run``, ``show`` or ``--help`` is taken as the
arguments of ``run``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from batchpilot.checks import check_positive_int
from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    DeviceOpt,
    ExampleOpt,
    FormatOpt,
    OutOpt,
    OutputFormat,
    SeedOpt,
    TaskArg,
    check_out_folder,
    command_app,
    emit,
    option_names,
    stderr,
)
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.examples import EXAMPLES
from batchpilot.sweep import (
    Budget,
    Grid,
    GridAround,
    Ladder,
    LrPlan,
    SweepResult,
    TrialResult,
    load_sweeps,
    run_sweep,
)
from batchpilot.sweep.budgets import DEFAULT_MAX_EPOCHS
from batchpilot.sweep.lrs import DEFAULT_GRID

DEFAULT_STORE = Path("batchpilot-sweeps.sqlite")


class _SweepGroup(TyperGroup):
    """A group whose first argument, unless it names a subcommand or asks for help, belongs to
    the default subcommand ``run``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # No arguments at all is `run` without a task too: one line saying what is missing.
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)


commands = command_app(
    cls=_SweepGroup,
    name="sweep",
    help=(
        "Train the task at several batch sizes on equal budgets and compare validation results "
        "(the practitioners' ×0.5 / ×2 ladder from 128, or a grid); every finished trial is committed to "
        "a SQLite store, and --resume continues an interrupted sweep. "
        "Example: batchpilot sweep --example digits --budget-epochs 3 --start 64; "
        "then: batchpilot sweep show batchpilot-sweeps.sqlite"
    ),
    no_args_is_help=False,
)


def _floats(option: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise BadInputError(
            f"{option}: expected numbers separated by commas, got {text!r}"
        ) from exc


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise BadInputError(
            f"{option}: expected whole numbers separated by commas, got {text!r}"
        ) from exc


def _task_spec(task_spec: str | None, example: str | None) -> str:
    """The task as a spec string (the pool and Ray executors load it in their workers)."""
    if (task_spec is None) == (example is None):
        raise BadInputError("TASK: give either a TASK (path/to/file.py:factory) or --example NAME")
    if example is not None:
        if example not in EXAMPLES:
            raise BadInputError(
                f"--example: unknown example {example!r}; choose one of {', '.join(EXAMPLES)}"
            )
        return EXAMPLES[example]
    assert task_spec is not None
    return task_spec


def _lr_plan(
    lr_rule: str,
    lr_grid: str | None,
    lr_center: str,
    ref_batch: int | None,
    ref_lr: float | None,
    warmup_epochs: float,
) -> LrPlan:
    factors = _floats("--lr-grid", lr_grid) if lr_grid else None
    if lr_rule == "grid":
        return LrPlan.grid(
            factors or DEFAULT_GRID,
            center=lr_center,  # type: ignore[arg-type]  # checked by LrPlan
            ref_batch=ref_batch,
            ref_lr=ref_lr,
            warmup_epochs=warmup_epochs,
        )
    return LrPlan(
        rule=lr_rule,  # type: ignore[arg-type]  # checked by LrPlan
        factors=factors or (1.0,),
        ref_batch=ref_batch,
        ref_lr=ref_lr,
        warmup_epochs=warmup_epochs,
    )


@commands.command(
    "run",
    help=(
        "Run (or with --resume, continue) a batch-size sweep. The default: the ×0.5 / ×2 ladder from "
        "--start 128 (×0.5 and ×2, then on in the better direction until the validation result "
        "stops improving), 3 epochs per trial, the lr rescaled linearly from the task's reference. "
        "Also callable as `batchpilot sweep TASK …`. "
        "Example: batchpilot sweep --example digits --start 64 --budget-epochs 2 --lr-rule sqrt"
    ),
)
def run_command(
    task_spec: TaskArg = None,
    example: ExampleOpt = None,
    strategy: Annotated[
        str, typer.Option("--strategy", help="ladder (×0.5 / ×2 from the start batch) or grid.")
    ] = "ladder",
    start: Annotated[int, typer.Option("--start", help="Ladder: the first batch size.")] = 128,
    factor: Annotated[
        float, typer.Option("--factor", help="Ladder: ratio between rungs (2 = ×0.5 and ×2).")
    ] = 2.0,
    direction: Annotated[
        str,
        typer.Option(
            "--direction",
            help="Ladder: both (try one rung each way, follow the better), down or up.",
        ),
    ] = "both",
    patience: Annotated[
        int,
        typer.Option("--patience", help="Ladder: stop after this many rungs without improvement."),
    ] = 1,
    min_batch: Annotated[
        int, typer.Option("--min-batch", help="Smallest batch the ladder may try.")
    ] = 1,
    max_batch: Annotated[
        int | None,
        typer.Option("--max-batch", help="Largest batch to try [default: the training set size]."),
    ] = None,
    batches: Annotated[
        str | None,
        typer.Option(
            "--batches",
            help="Grid: batch sizes, e.g. 16,32,64 [default: powers of two from start/8 to start×8].",
        ),
    ] = None,
    budget_epochs: Annotated[
        float | None,
        typer.Option(
            "--budget-epochs", help="Equal epochs: every trial trains this many [default: 3]."
        ),
    ] = None,
    budget_samples: Annotated[
        int | None,
        typer.Option("--budget-samples", help="Equal samples: every trial trains on this many."),
    ] = None,
    target_loss: Annotated[
        float | None,
        typer.Option(
            "--target-loss",
            help="Target validation loss: records steps / samples / seconds to reach it.",
        ),
    ] = None,
    target_metric: Annotated[
        float | None,
        typer.Option("--target-metric", help="Target validation metric, instead of a loss."),
    ] = None,
    max_epochs: Annotated[
        float | None,
        typer.Option(
            "--max-epochs",
            help=f"Cap of a target-only budget [default: {DEFAULT_MAX_EPOCHS:g} epochs].",
        ),
    ] = None,
    evals: Annotated[
        int, typer.Option("--evals", help="Validation points per trial, evenly spaced in samples.")
    ] = 20,
    objective: Annotated[
        str | None,
        typer.Option(
            "--objective",
            help="What the ladder compares: val_metric (default with a metric), val_loss, "
            "steps_to_target, samples_to_target or seconds_to_target.",
        ),
    ] = None,
    lr_rule: Annotated[
        str,
        typer.Option(
            "--lr-rule",
            help="lr per batch: linear, sqrt, adam, none (rescaled from the reference), "
            "range-test (re-found at each batch) or grid (--lr-grid factors around --lr-center).",
        ),
    ] = "linear",
    lr_grid: Annotated[
        str | None,
        typer.Option(
            "--lr-grid",
            help="Multipliers of each batch's base lr, one trial each "
            f"[default for grid: {','.join(f'{f:g}' for f in DEFAULT_GRID)}].",
        ),
    ] = None,
    lr_center: Annotated[
        str, typer.Option("--lr-center", help="The rule the grid is centred on.")
    ] = "sqrt",
    ref_batch: Annotated[
        int | None,
        typer.Option("--ref-batch", help="Reference batch [default: the task's reference]."),
    ] = None,
    ref_lr: Annotated[
        float | None, typer.Option("--ref-lr", help="Reference lr [default: the task's reference].")
    ] = None,
    warmup_epochs: Annotated[
        float, typer.Option("--warmup-epochs", help="Linear lr warm-up in each trial.")
    ] = 0.0,
    max_micro_batch: Annotated[
        int | None,
        typer.Option(
            "--max-micro-batch",
            help="Split larger batches into micro-batches × gradient accumulation.",
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="inprocess (one trial at a time here), pool (local processes) or ray.",
        ),
    ] = "inprocess",
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="pool: processes; local ray: CPUs [default: all cores]."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="Join this Ray cluster (e.g. auto) instead of a local Ray."
        ),
    ] = None,
    store: Annotated[
        Path,
        typer.Option(
            "--store", help="SQLite file every finished trial is committed to (created if new)."
        ),
    ] = DEFAULT_STORE,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Name of the sweep in the store [default: task, strategy, settings hash].",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the stored sweep with these settings; finished trials are kept.",
        ),
    ] = False,
    out: OutOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    spec = _task_spec(task_spec, example)
    if workers is not None:
        check_positive_int("--workers", workers)
    check_out_folder(out)
    budget = Budget.of(
        epochs=budget_epochs,
        samples=budget_samples,
        target_loss=target_loss,
        target_metric=target_metric,
        max_epochs=max_epochs,
        evals=evals,
    )
    plan = _lr_plan(lr_rule, lr_grid, lr_center, ref_batch, ref_lr, warmup_epochs)
    if strategy == "ladder":
        if batches is not None:
            raise BadInputError("--batches: only with --strategy grid")
        chosen: Ladder | Grid | GridAround = Ladder(
            start=start,
            factor=factor,
            direction=direction,  # type: ignore[arg-type]  # checked by Ladder
            patience=patience,
            min_batch=min_batch,
            max_batch=max_batch,
        )
    elif strategy == "grid":
        if batches is not None:
            chosen = Grid(_ints("--batches", batches))
        else:
            chosen = GridAround(start, min_batch=min_batch, max_batch=max_batch)
    else:
        raise BadInputError(f"--strategy: expected ladder or grid, got {strategy!r}")
    log = stderr()
    reported: list[str] = []

    def report(trial: TrialResult, reused: bool) -> None:
        if not reported:
            log.print(
                f"sweep trials are committed to {plain(store)} as they finish", soft_wrap=True
            )
        reported.append(trial.key)
        log.print(_trial_line(trial, reused), soft_wrap=True)

    budget_option = (
        "--budget-samples"
        if budget_samples is not None
        else "--max-epochs"
        if max_epochs is not None
        else "--budget-epochs"
    )
    try:
        with option_names(budget=budget_option):
            result = run_sweep(
                spec,
                budget=budget,
                strategy=chosen,
                lr=plan,
                objective=objective,
                executor=executor,
                store=store,
                name=name,
                resume=resume,
                seed=seed,
                device=device,
                max_micro_batch=max_micro_batch,
                workers=workers,
                ray_address=ray_address,
                on_trial=report,
            )
    except KeyboardInterrupt:
        log.print(
            f"interrupted: the finished trials are in {plain(store)}; run the same command "
            "with --resume to continue",
            soft_wrap=True,  # one line, however narrow the terminal: scripts grep for it
        )
        raise
    data = result.to_dict()
    if out is not None:
        from batchpilot.plots.sweep import save_sweep_plots

        data["plots"] = [str(path) for path in save_sweep_plots(result, out)]
    emit(fmt, data, lambda console: _render(console, result, data.get("plots", [])))
    if result.trials and all(trial.status == "failed" for trial in result.trials):
        first = result.trials[0]
        raise UserCodeError(
            f"every trial of the sweep failed ({len(result.trials)}); the first, batch "
            f"{first.batch}: {first.error}"
        )


@commands.command(
    "show",
    help=(
        "List the sweeps in a store with their trials, best batch per objective and fits. "
        "Example: batchpilot sweep show batchpilot-sweeps.sqlite --format json"
    ),
)
def show_command(
    store: Annotated[
        Path,
        typer.Argument(metavar="STORE", help="A sweep store (SQLite file).", show_default=False),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Show only this sweep [default: all].")
    ] = None,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    if store.is_dir():
        raise BadInputError(f"STORE: {str(store)!r} is a folder, expected a SQLite file")
    if not store.is_file():
        raise BadInputError(f"STORE: no such file {str(store)!r}")
    check_out_folder(out)
    results = load_sweeps(store)
    if name is not None:
        results = [r for r in results if r.name == name]
        if not results:
            raise BadInputError(f"--name: no sweep {name!r} in {str(store)!r}")
    sweeps = []
    plots: dict[str, list[str]] = {}
    for result in results:
        data = result.to_dict()
        if out is not None:
            from batchpilot.plots.sweep import save_sweep_plots

            folder = out if len(results) == 1 else out / result.name
            data["plots"] = plots[result.name] = [
                str(path) for path in save_sweep_plots(result, folder)
            ]
        sweeps.append(data)

    def render(console: Console) -> None:
        if not results:
            console.print(f"no sweeps in {plain(store)}")
        for result in results:
            _render(console, result, plots.get(result.name, []))

    emit(fmt, {"sweeps": sweeps}, render)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _trial_line(trial: TrialResult, reused: bool) -> str:
    source = "stored" if reused else "ran"
    lr = _number(trial.lr)
    if trial.status == "failed":
        return f"  batch {trial.batch}, lr {lr}: [red]failed[/red] ({plain(trial.error)})"
    if trial.diverged:
        return f"  batch {trial.batch} ({source}), lr {lr}: [red]diverged[/red]"
    parts = [f"val loss {_number(trial.val_loss)}"]
    if trial.val_metric is not None:
        parts.append(f"metric {_number(trial.val_metric)}")
    if trial.steps_to_target is not None:
        parts.append(f"{trial.steps_to_target:.1f} steps to target")
    parts.append(f"{trial.seconds:.1f} s")
    return f"  batch {trial.batch} ({source}), lr {lr}: {', '.join(parts)}"


def _render(console: Console, result: SweepResult, plots: list[str]) -> None:
    config = result.config
    metric = plain(config.get("metric_name") or "metric")
    strategy = config["strategy"]
    description = (
        f"ladder from {strategy['start']} (×{strategy['factor']:g})"
        if strategy["kind"] == "ladder"
        else f"grid {strategy['batches']}"
    )
    table = Table(
        title=f"sweep {plain(result.name)}: {plain(config['task_name'])}, {description}, "
        f"{len(result.trials)} trials",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    has_target = config["budget"].get("kind") == "target"
    # Only the columns that tell trials apart, so the table fits a terminal.
    split = any(trial.accumulation_steps > 1 for trial in result.trials)
    troubled = any(not trial.ok for trial in result.trials)
    columns = ["batch", *(["micro×acc"] if split else []), "lr", "steps", "val loss", metric]
    columns += ["gap", *(["steps→tgt", "s→tgt"] if has_target else []), "train s"]
    columns += ["status"] if troubled else []
    for column in columns:
        table.add_column(column, justify="right", min_width=len(column))
    for trial in result.trials:
        row = [str(trial.batch)]
        row += [f"{trial.micro_batch}×{trial.accumulation_steps}"] if split else []
        row += [_number(trial.lr, 3), str(trial.steps), _number(trial.val_loss)]
        row += [_number(trial.val_metric), _number(trial.generalization_gap, 2)]
        if has_target:
            row += [_number(trial.steps_to_target, 3), _number(trial.seconds_to_target, 2)]
        row += [f"{trial.seconds:.2f}"]
        if troubled:
            row += ["diverged" if trial.diverged else trial.status]
        table.add_row(*row)
    console.print(table)

    best = Table(title=f"best batch per objective (the sweep steered by {config['objective']})")
    for column in ("objective", "batch", "lr", "value"):
        best.add_column(column, justify="right")
    for objective, choice in result.analysis.best.items():
        label = objective.replace("val_metric", f"val {metric}")
        best.add_row(label, str(choice.batch), _number(choice.lr), _number(choice.value))
    console.print(best)

    fit = result.analysis.steps_fit
    if fit is not None:
        console.print(
            f"steps to target: S = S_min (1 + B_crit / B) with S_min = {fit.s_min:.4g}, "
            f"B_crit = {_number(fit.b_crit)} (rms log error {fit.rms_log_error:.3f})"
        )
    lr_fit = result.analysis.lr_fit
    if lr_fit is not None:
        meaning = (
            "1 = the linear rule held, 0.5 = the square-root rule"
            if lr_fit.tuned
            else "set by the lr rule, not measured: use --lr-rule grid or range-test to measure it"
        )
        console.print(f"best lr ∝ B^{lr_fit.exponent:.3f} ({meaning})")
    if result.ran or result.reused:
        console.print(
            f"{result.ran} trials run, {result.reused} read back from {plain(result.store)} "
            f"(batchpilot sweep show {plain(result.store)})"
        )
    for path in plots:
        console.print(f"plot: {plain(path)}")
