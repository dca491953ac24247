"""The two kinds of failure batchpilot tells apart, and the exit codes the CLI gives them.

A :class:`BadInputError` means the arguments or the task definition are wrong (exit code 2); a
:class:`UserCodeError` means the user's own code (model factory, loss, optimizer) raised while
batchpilot ran it (exit code 1). Both carry a one-line message meant to be shown as is.
"""

from __future__ import annotations


class BatchpilotError(Exception):
    """Base of the errors batchpilot reports in one line."""

    exit_code = 1


class BadInputError(BatchpilotError, ValueError):
    """An argument or a task definition is invalid; the message names it and its value."""

    exit_code = 2


class UserCodeError(BatchpilotError):
    """The user's code raised; the message says where, and carries the original message."""

    exit_code = 1

    @classmethod
    def wrap(cls, where: str, exc: BaseException) -> UserCodeError:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{where} raised {type(exc).__name__}"
        return cls(f"{text}: {message}" if message else text)
