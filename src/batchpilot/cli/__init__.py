"""The ``batchpilot`` command line: a thin adapter over the library.

:func:`main` runs the Typer app and turns every failure into one line on stderr and an exit code:
2 for bad input, 1 for a failure inside the user's code (or an unexpected error), 0 on success.
``--debug`` shows the traceback instead.

The root group knows each command by name and by the module that defines it (:data:`COMMANDS`),
and imports that module only when the command runs or shows its help: ``batchpilot --help``,
``scale`` and ``examples`` import no torch.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

try:  # Typer ≥ 0.22 vendors Click; older releases use the click package
    from typer import _click as click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from batchpilot.cli.app import HELP_OPTION_NAMES
from batchpilot.errors import BatchpilotError


class Entry(NamedTuple):
    """Where a command is defined, and the line ``batchpilot --help`` shows for it."""

    module: str
    summary: str


# Every command, in the order ``batchpilot --help`` lists them.
COMMANDS: dict[str, Entry] = {
    "tune": Entry(
        "batchpilot.cli.tune",
        "The main job: measure memory, throughput, the lr range test and the noise scale, and "
        "recommend batch, accumulation, lr and warm-up, with an HTML report.",
    ),
    "scale": Entry(
        "batchpilot.cli.scale",
        "Arithmetic only: the lr, the micro-batch × accumulation × devices split, steps per epoch "
        "and warm-up for a new global batch.",
    ),
    "examples": Entry("batchpilot.cli.tasks", "List the built-in example tasks."),
    "check": Entry(
        "batchpilot.cli.tasks", "Load a task, build its model and evaluate its loss once."
    ),
    "train": Entry(
        "batchpilot.cli.tasks",
        "Train a fresh model at a batch and lr; report validation loss and metric.",
    ),
    "memory": Entry(
        "batchpilot.cli.memory", "The largest micro-batch whose training step fits in memory."
    ),
    "throughput": Entry(
        "batchpilot.cli.memory",
        "Samples/s against the micro-batch: the knee, the fastest, the cost of rounding.",
    ),
    "lr-find": Entry(
        "batchpilot.cli.lr_find",
        "The lr range test, repeated: each rule's suggestion, its spread, a plot.",
    ),
    "noise": Entry(
        "batchpilot.cli.noise",
        "The gradient noise scale (critical batch) of a short run, and goodput per global batch.",
    ),
    "sweep": Entry(
        "batchpilot.cli.sweep",
        "Train at several batch sizes on equal budgets (the ×0.5 / ×2 ladder or a grid); "
        "trials kept in SQLite.",
    ),
    "demo": Entry(
        "batchpilot.cli.demo",
        "Demonstrations of what practitioners' guides claim, measured (demo --list).",
    ),
}

# Built commands, by name: each module is imported and turned into click commands once.
_LOADED: dict[str, Any] = {}


class _LazyGroup(TyperGroup):
    """The root group: lists :data:`COMMANDS` from their summaries and loads one on first use."""

    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        if self._listing:  # the command table of `batchpilot --help`: no module imported
            return TyperCommand(cmd_name, help=entry.summary)
        return load_command(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    cls=_LazyGroup,
    name="batchpilot",
    help=(
        "Measure which batch size and learning rate to train with, on your own model, "
        "and keep them right when the run changes."
    ),
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": list(HELP_OPTION_NAMES)},
)


@app.callback()
def _root() -> None:
    pass


def load_command(name: str) -> Any:
    """The click command ``name`` (imports its module on first use)."""
    if name not in _LOADED:
        module = importlib.import_module(COMMANDS[name].module)
        built = typer.main.get_command(module.commands)
        # A module with several commands builds a group of them; `sweep` is a group itself.
        subcommands = getattr(built, "commands", {})
        command = subcommands.get(name, built)
        _conventions(command)
        _LOADED[name] = command
    return _LOADED[name]


def _conventions(command: Any) -> None:
    """What every command shares, applied once where it is built: ``--debug`` (read by
    :func:`main`, so no command receives it), flags shown without a value (``--verify``, not
    ``--verify <bool>``), and help text that is text, never rich markup (``[default: …]`` stays)."""
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        for subcommand in subcommands.values():
            _conventions(subcommand)
    else:
        command.params.append(_debug_option())
    if command.help:
        command.help = escape(command.help)
    context = click.Context(command, help_option_names=list(HELP_OPTION_NAMES))
    for param in [*command.params, command.get_help_option(context)]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        if getattr(param, "help", None):
            param.help = escape(param.help)


def _debug_option() -> Any:
    """``--debug``, built by Typer like every other option but passed to no command."""
    probe = typer.Typer()

    @probe.command()
    def _probe(
        debug: Annotated[
            bool,
            typer.Option(
                "--debug",
                help="Show the full traceback when something fails.",
                expose_value=False,
            ),
        ] = False,
    ) -> None:
        pass

    return typer.main.get_command(probe).params[0]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args
    command = typer.main.get_command(app)
    _conventions_of_root(command)
    try:
        code = command.main(args, prog_name="batchpilot", standalone_mode=False)
    except click_exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "batchpilot"
        _fail(exc.format_message().strip() or f"{where}: missing arguments (see {where} --help)", 2)
    except typer.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except SystemExit as exc:
        # No command of batchpilot exits from inside (Click returns its codes here): this is the
        # user's code (model, loss, optimizer) calling sys.exit mid-run, which is no success.
        if debug:
            raise
        _fail(f"your code called sys.exit({exc.code!r}) while batchpilot ran it", 1)
    except BatchpilotError as exc:
        if debug:
            raise
        _fail(_as_option(str(exc), _options_of(command, args)), exc.exit_code)
    except Exception as exc:  # an error in batchpilot itself
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _conventions_of_root(command: Any) -> None:
    context = click.Context(command, help_option_names=list(HELP_OPTION_NAMES))
    option = command.get_help_option(context)
    if option is not None:
        option.metavar = ""


# Library argument names whose command-line option is not simply the kebab-cased name.
_OPTION_NAMES = {"accumulation_steps": "--accumulation", "global_batch": "--batch"}


def _as_option(message: str, options: set[str] | None = None) -> str:
    """Name the command-line option (``--max-micro-batch``) where the library names its argument.

    With ``options`` (those of the command that ran), an argument the command has no option for
    keeps its library name: naming an option the command lacks would send the user looking for it.
    """
    match = re.match(r"([a-z][a-z0-9_]*): ", message)
    if not match:
        return message
    name = match.group(1)
    option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    if options is not None and option not in options:
        return message
    return option + message[len(name) :]


def _options_of(command: Any, args: list[str]) -> set[str] | None:
    """The options of the (sub)command ``args`` invoke, or ``None`` if that is unclear."""
    for arg in args:
        if isinstance(command, _LazyGroup):
            command = load_command(arg) if arg in COMMANDS else None
        elif isinstance(getattr(command, "commands", None), dict):
            # A group with a default subcommand: ``sweep TASK`` is ``sweep run TASK``.
            command = command.commands.get(arg, command.commands.get("run"))
        else:
            break
        if command is None:
            return None
    if isinstance(getattr(command, "commands", None), dict) or isinstance(command, _LazyGroup):
        return None
    return {
        opt
        for param in getattr(command, "params", ())
        if not getattr(param, "hidden", False)
        for opt in getattr(param, "opts", ())
        if opt.startswith("--")
    }


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"batchpilot: error: {first}", file=sys.stderr)
    sys.exit(code)


__all__ = ["COMMANDS", "app", "load_command", "main"]
