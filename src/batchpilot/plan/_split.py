"""How a global batch splits into micro-batch × accumulation steps × devices: the one rule.

Every caller (the scaling calculator, accumulation plans, goodput, batch-size schedules, the DDP
runtime, sweeps) splits a batch with :func:`split_batch`, so they cannot round differently.

The rule, in order:

1. ``micro_batch`` given: the accumulation steps follow by division (it must divide exactly).
2. ``exact`` (the default): only splits whose product is exactly ``global_batch``. Without a speed
   curve the largest micro-batch that divides the per-device batch wins (fewest accumulation
   steps); with one, the fastest on the curve, and among those within ``speed_tie`` of the
   fastest, the one with fewer accumulation steps.
3. not ``exact``: the fewest accumulation steps that keep the micro-batch ≤ ``max_micro_batch``,
   and the micro-batch rounded *down* (to a multiple of ``multiple`` when given): the product
   never exceeds ``global_batch`` (a batch-size schedule must not overshoot the noise scale it
   targets) and falls short by less than one accumulation step.

>>> split_batch(1024, max_micro_batch=48, world_size=4)
BatchSplit(micro_batch=32, accumulation_steps=8, world_size=4)
>>> split_batch(256, max_micro_batch=100)
BatchSplit(micro_batch=64, accumulation_steps=4, world_size=1)
>>> split_batch(1000, max_micro_batch=64, exact=False)
BatchSplit(micro_batch=62, accumulation_steps=16, world_size=1)
>>> split_batch(1000, max_micro_batch=64, exact=False, multiple=8).micro_batch
56
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError

# Speeds this close count as equal when no uncertainty is given: single timings on a CPU vary by
# about this much from run to run.
SPEED_TIE = 0.02


@runtime_checkable
class SupportsThroughput(Protocol):
    """Anything that says how many samples per second a micro-batch trains at (one device)."""

    def samples_per_second_at(self, batch: int) -> float: ...


@dataclass(frozen=True)
class BatchSplit:
    """A global batch as micro-batch × accumulation steps × world size."""

    micro_batch: int
    accumulation_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps * self.world_size


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def split_batch(
    global_batch: int,
    *,
    max_micro_batch: int | None = None,
    world_size: int = 1,
    exact: bool = True,
    micro_batch: int | None = None,
    multiple: int = 1,
    speed: SupportsThroughput | None = None,
    speed_tie: float = SPEED_TIE,
) -> BatchSplit:
    """Split ``global_batch`` over ``world_size`` devices by the rule in the module docstring.

    Args:
        max_micro_batch: the largest micro-batch that fits one device (default: no limit).
        exact: only splits whose product is ``global_batch`` (which must then be a multiple of
            the world size); otherwise the fewest accumulation steps, rounded down.
        micro_batch: a fixed micro-batch; the accumulation steps are derived from it.
        multiple: round an inexact micro-batch down to a multiple of this (e.g. 8).
        speed: a measured curve; an exact split then takes the fastest micro-batch.
        speed_tie: relative speed difference below which two micro-batches count as equally fast.
    """
    check_positive_int("global_batch", global_batch)
    check_positive_int("world_size", world_size)
    check_positive_int("multiple", multiple)
    if max_micro_batch is not None:
        check_positive_int("max_micro_batch", max_micro_batch)
    if micro_batch is not None:
        check_positive_int("micro_batch", micro_batch)
        per_step = micro_batch * world_size
        if global_batch % per_step:
            raise BadInputError(
                f"batch: {global_batch} is not a multiple of micro_batch × world_size = "
                f"{micro_batch} × {world_size} = {per_step}"
            )
        return BatchSplit(micro_batch, global_batch // per_step, world_size)
    if not exact:
        per_device = max(1, global_batch // world_size)
        limit = min(max_micro_batch or per_device, per_device)
        accumulation = -(-per_device // limit)
        micro = max(1, per_device // accumulation)
        if multiple > 1 and micro >= multiple:
            micro -= micro % multiple
        return BatchSplit(micro, accumulation, world_size)
    if global_batch % world_size:
        raise BadInputError(
            f"global_batch: {global_batch} is not a multiple of world_size {world_size} "
            f"(nearest: {global_batch // world_size * world_size} or "
            f"{-(-global_batch // world_size) * world_size})"
        )
    per_device = global_batch // world_size
    limit = min(max_micro_batch or per_device, per_device)
    candidates = [d for d in divisors(per_device) if d <= limit]
    if speed is None:
        micro = candidates[-1]
    else:
        speeds = {d: _speed(speed, d) for d in candidates}
        known = {d: s for d, s in speeds.items() if s is not None}
        if not known:
            raise BadInputError(
                f"speed: no micro-batch that divides {per_device} (≤ {limit}) has a known speed"
            )
        fastest = max(known.values())
        micro = max(d for d, s in known.items() if s >= (1 - speed_tie) * fastest)
    return BatchSplit(micro, per_device // micro, world_size)


def _speed(curve: SupportsThroughput, micro: int) -> float | None:
    try:
        value = float(curve.samples_per_second_at(micro))
    except (BadInputError, ValueError):
        return None  # outside what the curve knows
    return value if math.isfinite(value) and value > 0 else None


__all__ = ["SPEED_TIE", "BatchSplit", "SupportsThroughput", "divisors", "split_batch"]
