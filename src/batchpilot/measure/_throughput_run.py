"""The ``throughput`` command's run: the memory limit when needed, the speed ladder, and the
accumulation plan for a global batch.

:func:`run_throughput` times the micro-batches given, or a doubling ladder up to
``max_micro_batch``; with neither, the ladder's top is first found by
:func:`~batchpilot.measure.find_max_batch` (under ``budget_bytes`` and ``margin``), and that
result is kept. With ``global_batch`` the fastest split of it is planned from the measured curve
(:func:`~batchpilot.plan.plan_accumulation`, a pure function of the two measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchpilot.checks import check_positive_int
from batchpilot.measure._memory_search import MaxBatchResult, find_max_batch
from batchpilot.measure._throughput import ThroughputCurve, measure_throughput
from batchpilot.plan._accumulation import AccumulationPlan, plan_accumulation

if TYPE_CHECKING:
    import torch

    from batchpilot.task import Task


@dataclass(frozen=True)
class ThroughputRun:
    """The speed curve, the memory search it was bounded by (``None`` when the micro-batches
    or their top were given) and the accumulation plan (``None`` without a global batch)."""

    curve: ThroughputCurve
    memory: MaxBatchResult | None
    accumulation: AccumulationPlan | None

    def to_dict(self) -> dict[str, Any]:
        """The curve's fields at the top level; ``memory`` and ``accumulation`` when present."""
        data = self.curve.to_dict()
        if self.memory is not None:
            data["memory"] = self.memory.to_dict()
        if self.accumulation is not None:
            data["accumulation"] = self.accumulation.to_dict()
        return data


def run_throughput(
    task: Task,
    *,
    micro_batches: Sequence[int] | None = None,
    max_micro_batch: int | None = None,
    global_batch: int | None = None,
    world_size: int = 1,
    budget_bytes: int | None = None,
    margin: float = 0.05,
    device: torch.device | str = "cpu",
    warmup_steps: int = 2,
    timed_steps: int = 3,
    knee_fraction: float = 0.9,
    seed: int = 0,
) -> ThroughputRun:
    """Samples per second of ``task`` against the micro-batch and, with ``global_batch``, the
    fastest micro-batch × accumulation × ``world_size`` that makes it.

    ``budget_bytes`` and ``margin`` bound the memory search that sets the ladder's top when
    neither ``micro_batches`` nor ``max_micro_batch`` is given; the accumulation plan keeps the
    micro-batch within what fits (the memory search's answer, else the largest batch timed).
    """
    check_positive_int("world_size", world_size)
    if global_batch is not None:
        check_positive_int("global_batch", global_batch)
    memory: MaxBatchResult | None = None
    if micro_batches is None and max_micro_batch is None:
        memory = find_max_batch(
            task, device=device, budget_bytes=budget_bytes, margin=margin, seed=seed
        )
        max_micro_batch = memory.max_micro_batch
    curve = measure_throughput(
        task,
        batches=micro_batches,
        max_batch=max_micro_batch,
        device=device,
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        seed=seed,
        knee_fraction=knee_fraction,
    )
    plan = None
    if global_batch is not None:
        fits = (
            memory.max_micro_batch
            if memory is not None
            else max(point.batch for point in curve.points)
        )
        plan = plan_accumulation(
            global_batch, max_micro_batch=fits, curve=curve, world_size=world_size
        )
    return ThroughputRun(curve=curve, memory=memory, accumulation=plan)


__all__ = ["ThroughputRun", "run_throughput"]
