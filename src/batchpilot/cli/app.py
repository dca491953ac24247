"""The Typer application, the options every command shares, and output helpers.

Commands live one per module in this package and only translate options into calls of the core
functions and results into tables or JSON. JSON goes to stdout and nothing else does in that mode;
progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from batchpilot.devices import DEVICE_CHOICES
from batchpilot.errors import BadInputError
from batchpilot.examples import EXAMPLES
from batchpilot.jsonio import to_json
from batchpilot.loading import load_task
from batchpilot.task import Task

app = typer.Typer(
    name="batchpilot",
    help=(
        "Measure which batch size and learning rate to train with, on your own model, "
        "and keep them right when the run changes."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
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
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback when something fails.")
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Folder for the plot (PNG); none written if not given.")
]


def get_task(task_spec: str | None, example: str | None) -> Task:
    """The task named on the command line (a TASK argument or --example)."""
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


def require(condition: bool, message: str) -> None:
    """Raise a one-line bad-input error unless ``condition`` holds."""
    if not condition:
        raise BadInputError(message)
