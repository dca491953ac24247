"""Adapters for where users already train: PyTorch Lightning and the Hugging Face ``Trainer``.

Each lives in its own module and imports its framework only when that module is imported, so
``import batchpilot`` never pays for (or needs) Lightning or transformers::

    from batchpilot.integrations.lightning import BatchpilotCallback        # pip install lightning
    from batchpilot.integrations.huggingface import BatchpilotTrainerCallback  # pip install transformers

For a recommendation without writing a ``Task``, each has a one-liner::

    from batchpilot.integrations.lightning import apply, tune    # tune(module, datamodule)
    from batchpilot.integrations.huggingface import tune         # tune(trainer)

The callbacks are also reachable here, imported on first access. Plain ``torchrun`` / DDP loops use
:mod:`batchpilot.training._runtime`, :mod:`batchpilot.training._sampler` and :mod:`batchpilot.measure._noise` directly.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BatchpilotCallback": "batchpilot.integrations.lightning",
    "BatchpilotTrainerCallback": "batchpilot.integrations.huggingface",
}


def missing_extra(module: str, package: str, extra: str) -> ImportError:
    """The error an integration raises when its framework is not installed."""
    return ImportError(
        f"{module} needs {package}, which is not installed: pip install 'batchpilot[{extra}]' "
        f"(or pip install {package})"
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchpilot.integrations' has no attribute {name!r}")


__all__ = ["BatchpilotCallback", "BatchpilotTrainerCallback", "missing_extra"]
