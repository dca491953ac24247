"""Measuring on a shared machine: a fixed intra-op thread count and a reading of the load.

On a CPU, PyTorch's intra-op threads meet at a barrier after every operator. When other programs
keep the cores busy, a thread that is descheduled holds up the others for a scheduler time slice,
and a small model's step — hundreds of tiny operators — can run 100× slower than on an idle
machine. So every measurement of one run uses the same thread count, chosen once at the start:
the threads torch would use, lowered to the cores that are free at that moment (read from
``/proc/stat`` over a short window, not the one-minute load average, which still counts the last
minute's work) less one, left for whatever starts during the run. The choice and the load are recorded next to every figure.

>>> with fixed_threads(1):
...     torch.get_num_threads()
1
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchpilot.checks import check_positive_int


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies over all CPUs, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def busy_cores(window_seconds: float = 0.25) -> float | None:
    """How many cores other programs keep busy right now (None where it cannot be read).

    >>> value = busy_cores(0.05)
    >>> value is None or 0.0 <= value <= (os.cpu_count() or 1)
    True
    """
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window_seconds)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, min(1.0, share)) * (os.cpu_count() or 1)


@dataclass(frozen=True)
class MeasurementConditions:
    """The thread count every measurement of a run used, and how busy the machine was."""

    device: str
    threads: int
    default_threads: int
    cores: int
    busy_cores: float | None
    load_1min: float
    reason: str

    @property
    def busy(self) -> bool:
        """Other programs held at least half a core when the run started, or the one-minute
        load average exceeded the cores."""
        return (self.busy_cores is not None and self.busy_cores >= 0.5) or (
            self.load_1min > self.cores
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "busy": self.busy}


def choose_threads(device: torch.device, *, threads: int | None = None) -> MeasurementConditions:
    """The intra-op thread count for this run's measurements: ``threads`` if given; on a CPU,
    torch's own count lowered to the cores free right now (at least 1); elsewhere torch's."""
    default = torch.get_num_threads()
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = math.nan
    busy = busy_cores() if device.type == "cpu" else None
    if threads is not None:
        chosen, reason = check_positive_int("threads", threads), "as asked (--threads)"
    elif device.type != "cpu" or busy is None:
        chosen, reason = default, "torch's default"
    else:
        free = max(1, math.floor(cores - busy + 0.5))
        # one free core is left to everything else, so that load arriving mid-run finds a core
        # of its own instead of descheduling one of ours
        chosen = max(1, min(default, free - 1))
        reason = (
            f"{busy:.1f} of {cores} cores busy with other programs; {chosen} of torch's {default} "
            "thread(s), leaving one free core, so that no thread waits on a descheduled one"
        )
    return MeasurementConditions(str(device), chosen, default, cores, busy, load, reason)


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(check_positive_int("threads", threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (from ``/proc``; 0 where there is none), so a
    command's time budget can include its own start-up: importing torch takes seconds on a
    busy machine.

    >>> 0.0 <= seconds_since_process_start() < 86400 * 365
    True
    """
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
        return max(0.0, now - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


__all__ = [
    "MeasurementConditions",
    "busy_cores",
    "choose_threads",
    "fixed_threads",
    "seconds_since_process_start",
]
