"""Choosing and checking the device a measurement runs on.

torch is imported by the functions, not by this module: the command line names
:data:`DEVICE_CHOICES` in its help without importing torch.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import gc
import re
from typing import TYPE_CHECKING

from batchpilot.errors import BadInputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; other names are checked to exist here."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            raise BadInputError(f"--device: {spec!r} asked for, but CUDA is not available here")
        index = int(match.group(1) or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise BadInputError(
                f"--device: {spec!r} asked for, but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
        return torch.device("cuda", index)
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise BadInputError("--device: 'mps' asked for, but MPS is not available here")
        return torch.device("mps")
    raise BadInputError(f"--device: unknown device {spec!r}; expected {DEVICE_CHOICES}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the work's real end."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory(device: torch.device, *, full: bool = True) -> None:
    """Collect garbage and hand cached device blocks back, so the next probe starts clean.

    ``full=False`` collects only the young generations: enough between probes (tensors are freed
    by reference counting) and far cheaper once torch has loaded its thousands of objects.
    """
    import torch

    gc.collect(2 if full else 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
