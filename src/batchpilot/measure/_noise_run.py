"""The ``noise`` command's run: the noise scale at a batch and lr, and goodput per global batch.

:func:`run_noise` runs these phases, each named in :attr:`NoiseRun.phases` with its size, so
nothing runs that the output does not say:

1. **the lr** — the one given; else one range test (:func:`~batchpilot.measure.find_lr`,
   ``lr_repeats`` × ``lr_steps`` steps at the batch); else, when that finds no descent, the
   task's reference lr;
2. **the noise scale** — :func:`~batchpilot.measure.measure_noise_scale` for ``steps`` steps at
   the batch and that lr;
3. **throughput**, only with ``throughput=True`` — :func:`~batchpilot.measure.measure_throughput`
   on :func:`goodput_micro_batches` (powers of two from batch / 16 to 16 × batch, below
   ``max_batch`` and the training set) within ``throughput_seconds``; then the goodput of each
   global batch (:func:`~batchpilot.plan.plan_goodput`), the pure plan over the two
   measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.measure._lr_range import find_lr
from batchpilot.measure._noise import NoiseScaleResult, check_split, measure_noise_scale
from batchpilot.measure._throughput import measure_throughput
from batchpilot.plan._goodput import plan_goodput
from batchpilot.progress import NoProgress, PhaseProgress

if TYPE_CHECKING:
    import torch

    from batchpilot.measure._lr_range import LRFinderResult
    from batchpilot.measure._throughput import ThroughputCurve
    from batchpilot.plan._goodput import GoodputPlan
    from batchpilot.task import Task

LrSource = Literal["given", "range test", "reference lr"]

# The range test when no lr is given: find_lr's defaults, named so that the output can say them.
NOISE_LR_STEPS = 100
NOISE_LR_REPEATS = 3
# The micro-batches timed for the goodput table span this factor each way around the batch.
GOODPUT_SPAN = 16
# Wall-clock bound of the throughput phase (the ladder stops growing, the rounds stop).
NOISE_THROUGHPUT_SECONDS = 15.0


@dataclass(frozen=True)
class NoiseRun:
    """What :func:`run_noise` measured, the goodput plan made from it, and what ran.

    ``range_test`` is the range test the lr came from (``None`` with a given lr);
    ``throughput`` and ``goodput`` are ``None`` without the throughput phase (and ``goodput``
    also when no step gave a usable estimate). ``phases`` says, one sentence each, what ran and
    how large it was; ``notes`` what the numbers mean or why a phase gave nothing.
    """

    noise: NoiseScaleResult
    lr_source: LrSource
    range_test: LRFinderResult | None
    throughput: ThroughputCurve | None
    goodput: GoodputPlan | None
    phases: tuple[str, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The noise measurement's fields at the top level, then the plan and what ran."""
        noise = self.noise.to_dict()
        plan = self.goodput
        return {
            **noise,
            "lr_source": self.lr_source,
            "efficiency": [] if plan is None else [_goodput_row(p) for p in plan.points],
            "recommended_batch": None if plan is None else plan.recommended_batch,
            "recommended": None if plan is None else plan.to_dict()["recommended"],
            "throughput_source": None if self.throughput is None else "measure_throughput",
            "throughput": []
            if self.throughput is None
            else [
                {"batch": point.batch, "samples_per_second": point.samples_per_second}
                for point in self.throughput.points
            ],
            "range_test": None if self.range_test is None else _range_summary(self.range_test),
            "phases": list(self.phases),
            "notes": list(self.notes),
        }


def _goodput_row(point: Any) -> dict[str, Any]:
    return {
        "batch": point.global_batch,
        "micro_batch": point.micro_batch,
        "accumulation_steps": point.accumulation_steps,
        "samples_per_second": point.samples_per_second,
        "efficiency": point.efficiency,
        "steps_ratio": point.steps_ratio,
        "goodput": point.goodput,
    }


def _range_summary(found: LRFinderResult) -> dict[str, Any]:
    return {
        "suggestion": found.suggestion,
        "method": found.method,
        "steps": found.steps,
        "repeats": len(found.runs),
        "micro_batch": found.micro_batch,
        "message": found.message,
    }


def default_micro_batches(batch: int) -> int:
    """Micro-batches a step of ``batch`` is split into for the estimate: 4, or 3 or 2 when 4
    does not divide it.

    >>> default_micro_batches(64), default_micro_batches(30), default_micro_batches(7)
    (4, 3, 4)
    """
    return next((k for k in (4, 3, 2) if batch % k == 0), 4)


def goodput_micro_batches(batch: int, largest: int) -> list[int]:
    """Powers of two from ``batch`` / 16 to 16 × ``batch`` (at most ``largest``), and ``batch``.

    >>> goodput_micro_batches(32, 250)
    [2, 4, 8, 16, 32, 64, 128]
    >>> goodput_micro_batches(10, 16)
    [1, 2, 4, 8, 10, 16]
    """
    low, high = max(1, batch // GOODPUT_SPAN), min(largest, GOODPUT_SPAN * batch)
    ladder = {min(batch, high)}
    power = 1
    while power <= high:
        if power >= low:
            ladder.add(power)
        power *= 2
    return sorted(ladder)


def run_noise(
    task: Task,
    *,
    batch: int | None = None,
    steps: int = 200,
    lr: float | None = None,
    micro_batch: int | None = None,
    micro_batches: int | None = None,
    max_batch: int | None = None,
    world_size: int = 1,
    throughput: bool = True,
    throughput_seconds: float | None = NOISE_THROUGHPUT_SECONDS,
    lr_steps: int = NOISE_LR_STEPS,
    lr_repeats: int = NOISE_LR_REPEATS,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: PhaseProgress | None = None,
) -> NoiseRun:
    """Measure the noise scale of ``task`` at global ``batch`` and ``lr``, and plan goodput.

    Args:
        batch: the global batch of the run (default: the task's reference batch).
        micro_batch, micro_batches: how each step is split for the estimate — the micro-batch,
            or the number of micro-batches (default: :func:`default_micro_batches`).
        lr: the learning rate; ``None`` runs the range test first (``lr_repeats`` ×
            ``lr_steps`` steps at ``batch``).
        max_batch: the largest global batch of the goodput table (default: the training set).
        throughput: time the micro-batches of the goodput table and plan goodput; without it
            only the noise scale is measured.
        throughput_seconds: wall-clock bound of the throughput phase (``None``: none).

    Every argument is checked before anything is measured.
    """
    batch = task.reference_batch if batch is None else batch
    if batch is None:
        raise BadInputError("batch: the task has no reference batch; give a batch")
    check_positive_int("batch", batch)
    if micro_batch is not None:
        check_positive_int("micro_batch", micro_batch)
        if micro_batches is not None:
            raise BadInputError(
                "micro_batch: give either the micro-batch or the number of micro-batches"
            )
        if batch % micro_batch:
            raise BadInputError(f"micro_batch: {micro_batch} does not divide batch {batch}")
        micro_batches = batch // micro_batch
    if micro_batches is None:
        micro_batches = default_micro_batches(batch)
    micro = check_split(task, batch=batch, micro_batches=micro_batches)
    check_positive_int("steps", steps)
    check_positive_int("world_size", world_size)
    if lr is not None:
        check_positive_float("lr", lr)
    if max_batch is not None:
        check_positive_int("max_batch", max_batch)
    if throughput_seconds is not None:
        check_positive_float("throughput_seconds", throughput_seconds)
    check_positive_int("lr_steps", lr_steps)
    check_positive_int("lr_repeats", lr_repeats)
    bars = progress or NoProgress()
    phases: list[str] = []
    notes: list[str] = []

    range_test: LRFinderResult | None = None
    source: LrSource = "given"
    if lr is None:
        phases.append(
            f"lr range test: {lr_repeats} × {lr_steps} steps at batch {batch} (no lr given)"
        )
        bars.start("lr range test", lr_repeats * lr_steps)
        range_test = find_lr(
            task,
            micro_batch=batch,
            steps=lr_steps,
            repeats=lr_repeats,
            device=device,
            seed=seed,
            on_step=lambda done, total: bars.update("lr range test", done),
        )
        bars.finish("lr range test")
        if range_test.suggestion is not None:
            lr, source = float(range_test.suggestion), "range test"
            notes.append(f"lr {lr:.3g} from the LR range test at batch {batch}")
        else:
            if task.reference_lr is None:
                raise BadInputError(
                    "lr: the range test found no lr "
                    f"({range_test.message or 'no descent'}) and the task has no reference lr"
                )
            lr, source = task.reference_lr, "reference lr"
            notes.append(
                f"the LR range test gave no suggestion ({range_test.message or 'no descent'}); "
                f"using the task's reference lr {lr:g}"
            )

    phases.append(
        f"noise scale: {steps} steps at batch {batch} = {micro_batches} × {micro}, lr {lr:.3g}"
    )
    bars.start("noise scale", steps)
    noise = measure_noise_scale(
        task,
        batch=batch,
        steps=steps,
        lr=lr,
        micro_batches=micro_batches,
        device=device,
        seed=seed,
        on_step=lambda step, loss: bars.update("noise scale", step + 1),
    )
    bars.finish("noise scale")
    if noise.diverged:
        notes.append(
            f"the loss became non-finite after {noise.steps} steps at lr {lr:.3g}: "
            "the estimate covers the steps before; try a smaller lr"
        )

    curve: ThroughputCurve | None = None
    plan: GoodputPlan | None = None
    largest = task.train_size if max_batch is None else min(task.train_size, max_batch)
    if throughput:
        ladder = goodput_micro_batches(batch, largest)
        bound = "" if throughput_seconds is None else f" within {throughput_seconds:g} s"
        phases.append(
            f"throughput for the goodput table: micro-batches {_listing(ladder)} "
            f"(batch / {GOODPUT_SPAN} to {GOODPUT_SPAN} × batch, at most {largest}){bound}"
        )
        bars.start("throughput", 1)
        curve = measure_throughput(
            task,
            batches=ladder,
            device=device,
            seed=seed,
            time_budget_seconds=throughput_seconds,
        )
        bars.finish("throughput")
        if noise.steps and not math.isnan(noise.noise_scale):
            plan = plan_goodput(
                curve,
                noise_scale=noise.noise_scale,
                base_batch=batch,
                max_batch=largest,
                world_size=world_size,
            )
            if math.isinf(noise.noise_scale):
                notes.append(
                    "the gradient's signal was not measurable above its noise (infinite noise "
                    "scale): efficiency is 1 at every batch and the plan follows throughput alone"
                )
        else:
            notes.append("no step gave a usable estimate, so there is no goodput plan")
    return NoiseRun(
        noise=noise,
        lr_source=source,
        range_test=range_test,
        throughput=curve,
        goodput=plan,
        phases=tuple(phases),
        notes=tuple(notes),
    )


def _listing(batches: list[int]) -> str:
    if len(batches) <= 4:
        return ", ".join(map(str, batches))
    return f"{batches[0]}, {batches[1]}, …, {batches[-1]}"


__all__ = [
    "GOODPUT_SPAN",
    "NOISE_LR_REPEATS",
    "NOISE_LR_STEPS",
    "NOISE_THROUGHPUT_SECONDS",
    "NoiseRun",
    "default_micro_batches",
    "goodput_micro_batches",
    "run_noise",
]
