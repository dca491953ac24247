"""The Typer application, the options every command shares, and output helpers.

Commands live one per module in this package and only translate options into calls of the core
functions and results into tables or JSON. JSON goes to stdout and nothing else does in that mode;
progress and logs go to stderr.
"""

from __future__ import annotations

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
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of model initialisation and data order.")
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
    """A rich progress display on stderr (silent when stderr is not a terminal)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr(),
        transient=False,
    ) as bar:
        yield bar


def require(condition: bool, message: str) -> None:
    """Raise a one-line bad-input error unless ``condition`` holds."""
    if not condition:
        raise BadInputError(message)
