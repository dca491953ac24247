"""Gradient accumulation plans: a global batch larger than what fits, at the best speed.

A global batch ``B`` runs as ``micro_batch × accumulation_steps × world_size``: each device does
``accumulation_steps`` forward/backward passes of ``micro_batch`` samples before one optimizer
step. The largest micro-batch that fits is not always the fastest (past the throughput knee a
bigger micro-batch gains nothing, and a batch just under the memory limit can be slower), so the
plan picks, among the splits that reach ``B``, the micro-batch that trains the most samples per
second on the measured curve, preferring fewer accumulation steps when speeds are within 2 %
(the rule is :func:`batchpilot.plan.split_batch`'s, shared by every part of batchpilot).

>>> plan = plan_accumulation(1024, max_micro_batch=48)
>>> plan.micro_batch, plan.accumulation_steps, plan.global_batch
(32, 32, 1024)
>>> plan_accumulation(1000, max_micro_batch=64, exact=False).global_batch
992
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.jsonio import fields_dict
from batchpilot.plan._split import SupportsThroughput, split_batch


@dataclass(frozen=True)
class AccumulationPlan:
    """``micro_batch × accumulation_steps × world_size = global_batch`` (close to the target).

    ``samples_per_second`` is the expected speed of all devices together, read from the curve at
    the micro-batch (each micro-batch timed with its own optimizer step, so accumulation, which
    steps the optimizer less often, is a little faster) and scaled by the world size as if data
    parallelism were free; ``None`` without a curve.
    """

    target_global_batch: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    max_micro_batch: int
    samples_per_second: float | None
    largest_micro_batch_samples_per_second: float | None
    reason: str

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps * self.world_size

    @property
    def exact(self) -> bool:
        return self.global_batch == self.target_global_batch

    @property
    def seconds_per_optimizer_step(self) -> float | None:
        if self.samples_per_second is None:
            return None
        return self.global_batch / self.samples_per_second

    def to_dict(self) -> dict[str, Any]:
        return {
            **fields_dict(self),
            "global_batch": self.global_batch,
            "exact": self.exact,
            "seconds_per_optimizer_step": self.seconds_per_optimizer_step,
        }


def plan_accumulation(
    global_batch: int,
    *,
    max_micro_batch: int,
    curve: SupportsThroughput | None = None,
    world_size: int = 1,
    exact: bool = True,
) -> AccumulationPlan:
    """The micro-batch and accumulation steps that reach ``global_batch`` fastest.

    Args:
        global_batch: the target samples per optimizer step, over all devices.
        max_micro_batch: the largest micro-batch that fits on one device.
        curve: measured speed per micro-batch (a
            :class:`~batchpilot.measure._throughput.ThroughputCurve`); without it, the largest micro-batch
            that splits the target is taken.
        world_size: data-parallel devices.
        exact: only splits whose product is exactly ``global_batch``; otherwise the fewest
            accumulation steps with the micro-batch rounded down (never above the target).

    >>> plan_accumulation(96, max_micro_batch=64, world_size=2).to_dict()["micro_batch"]
    48
    """
    check_positive_int("global_batch", global_batch)
    check_positive_int("max_micro_batch", max_micro_batch)
    check_positive_int("world_size", world_size)
    if exact and global_batch % world_size:
        raise BadInputError(
            f"global_batch: {global_batch} is not a multiple of world_size {world_size} "
            f"(nearest: {global_batch // world_size * world_size} or "
            f"{-(-global_batch // world_size) * world_size}); or allow an inexact split"
        )
    split = split_batch(
        global_batch,
        max_micro_batch=max_micro_batch,
        world_size=world_size,
        exact=exact,
        speed=curve if exact else None,
    )
    micro, steps = split.micro_batch, split.accumulation_steps
    largest = split_batch(
        global_batch, max_micro_batch=max_micro_batch, world_size=world_size, exact=exact
    ).micro_batch

    def speed(micro: int) -> float:
        value = float(curve.samples_per_second_at(micro)) if curve is not None else float(micro)
        if not value > 0:
            raise BadInputError(f"curve: samples_per_second_at({micro}) gave {value!r}")
        return value

    expected = speed(micro) * world_size if curve is not None else None
    largest_speed = speed(largest) * world_size if curve is not None else None
    if curve is None:
        reason = (
            f"no throughput curve: the largest micro-batch (≤ {max_micro_batch}) that splits it"
        )
    elif micro == largest:
        reason = "the largest micro-batch that splits it is also the fastest"
    else:
        gain = speed(micro) / speed(largest) - 1
        reason = (
            f"micro-batch {micro} trains {gain:+.0%} samples/s against {largest}, the largest "
            "that splits it, on the measured curve"
        )
    return AccumulationPlan(
        target_global_batch=global_batch,
        micro_batch=micro,
        accumulation_steps=steps,
        world_size=world_size,
        max_micro_batch=max_micro_batch,
        samples_per_second=expected,
        largest_micro_batch_samples_per_second=largest_speed,
        reason=reason,
    )


__all__ = ["AccumulationPlan", "plan_accumulation"]
