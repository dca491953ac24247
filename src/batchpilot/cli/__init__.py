"""The ``batchpilot`` command line: a thin adapter over the library.

:func:`main` runs the Typer app and turns every failure into one line on stderr and an exit code:
2 for bad input, 1 for a failure inside the user's code (or an unexpected error), 0 on success.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import typer

try:  # Typer ≥ 0.22 vendors Click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from batchpilot.cli import demo, lr_find, memory, noise, scale, sweep, tasks, tune  # noqa: F401  (registers the commands)
from batchpilot.cli.app import app
from batchpilot.errors import BatchpilotError


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args
    command = typer.main.get_command(app)
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
        commands = getattr(command, "commands", None)
        if not isinstance(commands, dict):
            break
        # A group with a default subcommand: ``sweep TASK`` is ``sweep run TASK``.
        command = commands.get(arg, commands.get("run"))
        if command is None:
            return None
    if isinstance(getattr(command, "commands", None), dict):
        return None
    return {
        opt
        for param in getattr(command, "params", ())
        for opt in getattr(param, "opts", ())
        if opt.startswith("--")
    }


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"batchpilot: error: {first}", file=sys.stderr)
    sys.exit(code)


__all__ = ["app", "main"]
