"""The ``batchpilot`` command line: a thin adapter over the library.

:func:`main` runs the Typer app and turns every failure into one line on stderr and an exit code:
2 for bad input, 1 for a failure inside the user's code (or an unexpected error), 0 on success.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

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
        _fail(exc.format_message(), 2)
    except typer.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BatchpilotError as exc:
        if debug:
            raise
        _fail(_as_option(str(exc)), exc.exit_code)
    except Exception as exc:  # an error in batchpilot itself
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


# Library argument names whose command-line option is not simply the kebab-cased name.
_OPTION_NAMES = {"accumulation_steps": "--accumulation", "global_batch": "--batch"}


def _as_option(message: str) -> str:
    """Name the command-line option (``--max-micro-batch``) where the library names its argument."""
    match = re.match(r"([a-z][a-z0-9_]*): ", message)
    if not match:
        return message
    name = match.group(1)
    option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    return option + message[len(name) :]


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"batchpilot: error: {first}", file=sys.stderr)
    sys.exit(code)


__all__ = ["app", "main"]
