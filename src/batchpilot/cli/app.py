"""The options every command shares, the batch vocabulary, and output helpers.

Commands live one per module in this package, each on its own :func:`command_app`, and only
translate options into calls of the core functions and results into tables or JSON. The root
group in :mod:`batchpilot.cli` imports a module only when one of its commands runs or shows its
help, so this module and the light commands import no torch. JSON goes to stdout and nothing
else does in that mode; progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from batchpilot.checks import check_positive_int, check_precision
from batchpilot.devices import DEVICE_CHOICES
from batchpilot.errors import BadInputError
from batchpilot.examples import EXAMPLES
from batchpilot.jsonio import to_json

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from batchpilot.task import Task

HELP_OPTION_NAMES = ("-h", "--help")


def command_app(**settings: Any) -> typer.Typer:
    """The Typer a command module registers its commands on (``settings`` go to ``typer.Typer``)."""
    return typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": list(HELP_OPTION_NAMES)},
        **settings,
    )


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


TaskArg = Annotated[
    str | None,
    typer.Argument(
        metavar="TASK",
        help="Your task: path/to/file.py:factory or package.module:factory (returns a batchpilot.Task).",
        show_default=False,
    ),
]
ExampleOpt = Annotated[
    str | None,
    typer.Option("--example", help=f"Use a built-in example task instead: {', '.join(EXAMPLES)}."),
]
FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", help="table for people; json for programs (stdout holds only JSON)."),
]
# Seeds are offset per repeat and per epoch; below 2**63 they stay in torch's range.
MAX_SEED = 2**63 - 1


def _check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"--seed: expected an integer in [0, 2**63 - 1], got {seed}")
    return seed


SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed of model initialisation and data order.", callback=_check_seed
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help=f"Where to measure: {DEVICE_CHOICES}.")]


def _check_precision(precision: str | None) -> str | None:
    return None if precision is None else check_precision(precision, "--precision")


PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="Measure and train in 32, bf16-mixed or 16-mixed (autocast; a GradScaler for "
        "16-mixed) [default: the task's precision, else 32].",
        callback=_check_precision,
    ),
]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback when something fails.")
]
# The batch vocabulary, the same in every command: --batch is the global batch (samples per
# optimizer step, over all devices), --micro-batch the samples of one forward pass on one device.
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch",
        help="Global batch: samples per optimizer step [default: the task's reference batch].",
    ),
]
MicroBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--micro-batch",
        help="Samples per forward pass [default: --batch / --accumulation].",
    ),
]
AccumulationOpt = Annotated[
    int | None,
    typer.Option(
        "--accumulation",
        help="Micro-batches per optimizer step [default: --batch / --micro-batch, else 1].",
    ),
]
MaxMicroBatchOpt = Annotated[
    int | None,
    typer.Option("--max-micro-batch", help="Largest micro-batch to consider."),
]
# The old name of --max-micro-batch in memory, throughput and tune (where it meant the largest
# micro-batch); --max-batch is the largest global batch.
OldMaxBatchOpt = Annotated[int | None, typer.Option("--max-batch", hidden=True)]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Folder for the plot (PNG); none written if not given.")
]


# What a user who wrote ``--verify yes`` left as the TASK: a flag takes no value.
_FLAG_VALUES = {"yes", "no", "true", "false", "on", "off", "y", "n", "1", "0"}


def get_task(task_spec: str | None, example: str | None) -> Task:
    """The task named on the command line (a TASK argument or --example)."""
    from batchpilot.loading import load_task

    if task_spec is not None and task_spec.lower() in _FLAG_VALUES:
        raise BadInputError(
            f"TASK: {task_spec!r} is not a task; a flag takes no value "
            f"(write --verify, not --verify {task_spec})"
        )
    return load_task(task_spec, example=example)


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def emit(fmt: OutputFormat, data: dict[str, Any], table: Callable[[Console], None]) -> None:
    """Print ``data`` as JSON on stdout, or call ``table`` to render it for a person."""
    if fmt is OutputFormat.json:
        print(to_json(data, indent=2))
    else:
        table(stdout())


@contextmanager
def progress() -> Iterator[Progress]:
    """A rich progress display on stderr (silent when stderr is not a terminal); erased when the
    body fails, so that the error stays the one line on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = stderr()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        try:
            yield bar
        except BaseException:
            bar.live.transient = True
            raise


class PhaseBars:
    """One rich progress bar per phase of a run (``tune``, ``noise``), on stderr."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.ids: dict[str, TaskID] = {}

    def start(self, phase: str, total: int) -> None:
        self.ids[phase] = self.bar.add_task(phase, total=max(total, 1))

    def update(self, phase: str, completed: int) -> None:
        self.bar.update(self.ids[phase], completed=completed)

    def finish(self, phase: str, note: str = "") -> None:
        task = self.bar.tasks[self.ids[phase]]
        description = f"{phase}: {note}" if note else phase
        self.bar.update(self.ids[phase], completed=task.total, description=description)


def check_out_folder(out: Path | None, option: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before anything is measured.

    The folder is created and a file written in it, then whatever this check created is removed
    again: only trying tells a writable folder (permissions, read-only mounts, ``/proc``).
    """
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{option}: {str(out)!r} is a file, expected a folder")
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]
    for folder in missing:
        if folder.parent.exists() and not folder.parent.is_dir():
            raise BadInputError(
                f"{option}: cannot create folder {str(out)!r}: {str(folder.parent)!r} is a file"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise BadInputError(
            f"{option}: cannot write to folder {str(out)!r}: {exc.strerror or exc}"
        ) from exc
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextmanager
def option_names(**options: str) -> Iterator[None]:
    """Say the command's option where the library's message names its argument.

    ``with option_names(micro_batch="--batch"):`` turns ``micro_batch: 64 is larger…`` into
    ``--batch: 64 is larger…``, so that an error names an option the command really has.
    """
    try:
        yield
    except BadInputError as exc:
        message = str(exc)
        name, sep, rest = message.partition(": ")
        if sep and name in options:
            raise BadInputError(f"{options[name]}: {rest}") from exc
        raise


def renamed(old: str, new: str, old_value: Any, value: Any) -> Any:
    """The value of an option given under its old, hidden name ``old`` (kept so that old scripts
    run), with a one-line note on stderr; else ``value``, that of ``new``."""
    if old_value is None:
        return value
    if value is not None:
        raise BadInputError(f"{old}: give {new} only ({old} is its old name)")
    print(f"batchpilot: note: {old} is now {new}; the old name will be removed", file=sys.stderr)
    return old_value


def check_batch_options(
    batch: int | None, micro_batch: int | None, accumulation: int | None
) -> None:
    """Refuse a batch option that is not a positive integer (before any task is loaded)."""
    for option, value in (
        ("--batch", batch),
        ("--micro-batch", micro_batch),
        ("--accumulation", accumulation),
    ):
        if value is not None:
            check_positive_int(option, value)


def split_options(
    batch: int | None,
    micro_batch: int | None,
    accumulation: int | None,
    *,
    default_batch: int | None,
) -> tuple[int, int]:
    """``(micro-batch, accumulation steps)`` from the options every command spells the same way.

    ``--batch`` is the global batch (samples per optimizer step), ``--micro-batch`` the samples
    per forward pass and ``--accumulation`` the micro-batches per step; any two give the third,
    and ``--batch`` alone trains without accumulation. Without either batch option the global batch
    is ``default_batch`` (the task's reference batch).

    >>> split_options(64, None, 2, default_batch=None)
    (32, 2)
    >>> split_options(None, 16, 4, default_batch=None)
    (16, 4)
    >>> split_options(None, None, None, default_batch=10)
    (10, 1)
    """
    from batchpilot.plan._split import split_batch

    check_batch_options(batch, micro_batch, accumulation)
    if batch is None and micro_batch is not None:
        return micro_batch, accumulation or 1
    if batch is None:
        if default_batch is None:
            raise BadInputError("--batch: the task has no reference batch; give --batch")
        batch = default_batch
    if micro_batch is not None:
        with option_names(batch="--batch", micro_batch="--micro-batch"):
            steps = split_batch(batch, micro_batch=micro_batch).accumulation_steps
        if accumulation is not None and accumulation != steps:
            raise BadInputError(
                f"--accumulation: {accumulation} is not --batch / --micro-batch = "
                f"{batch} / {micro_batch} = {steps}; give two of the three"
            )
        return micro_batch, steps
    steps = accumulation or 1
    if batch % steps:
        raise BadInputError(
            f"--accumulation: {steps} does not divide --batch {batch} into equal micro-batches"
        )
    return batch // steps, steps
