"""Short, reproducible training runs on a task: the loop every measurement and check builds on.

A run draws its model initialisation, data order and dropout from ``seed`` inside
:func:`~batchpilot.state.preserved_rng`, so it is repeatable and leaves the caller's RNG alone.
One optimizer step takes ``accumulation_steps`` micro-batches; a mean-reduced micro-loss is divided
by the accumulation steps (a sum-reduced one is not: the sum over the global batch is the sum of
the micro-sums), so the step equals one step at the global batch.

>>> from batchpilot.loading import load_task
>>> result = train(load_task(example="xor4"), micro_batch=16, lr=2.0, steps=5, seed=0)
>>> len(result.train_losses)
5
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from batchpilot.checks import (
    MAX_RUN_STEPS,
    check_positive_float,
    check_positive_int,
    check_run_steps,
    check_trainable,
)
from batchpilot.data import batch_size, to_device
from batchpilot.errors import BadInputError
from batchpilot.precision import backward, make_scaler, optimizer_step
from batchpilot.state import preserved_rng
from batchpilot.task import Task

# The progress signal a run can follow (``train(..., progress=True)``): the loss on the first
# PROGRESS_SAMPLES validation samples (the mean training loss since the point before, without
# validation data), after every step up to step 20, then every PROGRESS_SPACING of the steps so
# far (~24 points per decade of steps: steps-to-target resolved to ~10 %, interpolated between).
PROGRESS_SAMPLES = 512
PROGRESS_SPACING = 0.1
# The fewest steps to a loss that rank or scale anything: below 1 / PROGRESS_SPACING steps one
# step is more than the progress points' relative spacing, so a count there is the first updates'
# granularity (Adam's first steps move every weight by about the lr), not a training speed.
RESOLVED_STEPS = 1 / PROGRESS_SPACING


@dataclass(frozen=True)
class Evaluation:
    """Sample-weighted mean loss (and metric) over a dataset split."""

    loss: float
    metric: float | None
    samples: int


@dataclass(frozen=True)
class TrainResult:
    """What one training run did, step by step."""

    micro_batch: int
    accumulation_steps: int
    global_batch: int
    lr: float
    steps: int
    samples: int
    epochs: float
    seconds: float
    train_losses: tuple[float, ...]
    evaluations: tuple[tuple[int, Evaluation], ...]
    diverged: bool
    precision: str = "32"
    progress: tuple[tuple[int, float], ...] = ()
    target_loss: float | None = None

    @property
    def steps_to_target(self) -> float:
        """Steps until the progress signal first reached ``target_loss`` (interpolated between
        the points either side, :func:`steps_to`); infinite when it never did (or no target)."""
        if self.target_loss is None:
            return math.inf
        return steps_to(self.progress, self.target_loss)

    @property
    def final(self) -> Evaluation | None:
        return self.evaluations[-1][1] if self.evaluations else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["train_losses"] = list(self.train_losses)
        data["evaluations"] = [{"step": step, **asdict(ev)} for step, ev in self.evaluations]
        data["progress"] = [list(point) for point in self.progress]
        data["steps_to_target"] = self.steps_to_target
        return data


def steps_to(progress: Sequence[tuple[int, float]], target: float) -> float:
    """The step at which a progress signal (``(step, loss)`` points in order) first reached
    ``target``: interpolated between the last point above it and the first at or below it
    (in log-loss when both are positive, as a loss falls roughly exponentially between close
    points); the first point's step when it was already there; infinite when it never got there.

    >>> steps_to([(1, 1.0), (2, 0.5), (4, 0.25)], 0.3)
    3.47
    """
    previous: tuple[int, float] | None = None
    for step, loss in progress:
        if math.isfinite(loss) and loss <= target:
            if previous is None:
                return float(step)
            (before, above) = previous
            if above > 0 and loss > 0 and target > 0:
                share = math.log(above / target) / math.log(above / loss)
            else:
                share = (above - target) / (above - loss)
            return round(before + share * (step - before), 2)
        if math.isfinite(loss):
            previous = (step, loss)
    return math.inf


def micro_batches(task: Task, micro_batch: int, *, seed: int) -> Iterator[Any]:
    """Shuffled micro-batches of the training set, epoch after epoch, the last partial one dropped.

    Epoch ``e`` is shuffled by ``seed + e``, so the order is reproducible and independent of the
    global RNG.
    """
    check_positive_int("micro_batch", micro_batch)
    if micro_batch > task.train_size:
        raise BadInputError(
            f"micro_batch: {micro_batch} is larger than the training set ({task.train_size} samples)"
        )
    epoch = 0
    while True:
        yield from task.loader(micro_batch, shuffle=True, seed=seed + epoch, drop_last=True)
        epoch += 1


def accumulate_gradients(
    task: Task,
    model: nn.Module,
    batches: list[Any],
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Forward and backward over ``batches`` (one optimizer step's micro-batches).

    The forward runs under the task's autocast (:meth:`Task.compute_loss`); with a ``scaler``
    (``"16-mixed"``) the backward is the scaled loss's. Returns the step's training loss (not
    scaled) as a per-sample mean, whatever the task's reduction.
    """
    total, samples = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        loss = task.compute_loss(model, batch)
        n = batch_size(batch)
        scaled = loss / len(batches) if task.reduction == "mean" else loss
        backward(scaled, scaler)
        value = float(loss.detach())
        total += value * n if task.reduction == "mean" else value
        samples += n
    return total / max(samples, 1)


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    *,
    device: torch.device | str = "cpu",
    split: str = "val",
    batch_size_limit: int = 512,
    max_samples: int | None = None,
) -> Evaluation:
    """Mean loss and metric of ``model`` over the validation (or training) set, in eval mode.

    ``max_samples``: only the set's first that many samples (in order), for a cheap, repeatable
    progress signal during a measurement.
    """
    device = torch.device(device)
    was_training = {name: m.training for name, m in model.named_modules()}
    model.eval()
    total_loss, total_metric, samples = 0.0, 0.0, 0
    try:
        loader = task.loader(
            min(batch_size_limit, max_samples or batch_size_limit),
            split="val" if split == "val" else "train",
            shuffle=False,
        )
        for batch in loader:
            if max_samples is not None and samples >= max_samples:
                break
            batch = to_device(batch, device)
            n = batch_size(batch)
            loss = float(task.compute_loss(model, batch))
            total_loss += loss * n if task.reduction == "mean" else loss
            if task.metric is not None:
                total_metric += task.compute_metric(model, batch) * n
            samples += n
    finally:
        for name, m in model.named_modules():
            m.training = was_training[name]
    metric = total_metric / samples if task.metric is not None else None
    return Evaluation(loss=total_loss / samples, metric=metric, samples=samples)


def progress_evaluations(steps: int) -> int:
    """How many times a run of ``steps`` steps that follows the progress signal evaluates it:
    after every step up to step 20, then every ``PROGRESS_SPACING`` of the steps so far (the
    schedule of :func:`train`), so a run's cost can be planned before it runs.

    >>> progress_evaluations(10), progress_evaluations(100)
    (10, 38)
    """
    points, step = 0, 1
    while step <= steps:
        points += 1
        step = next_progress_point(step)
    return points


def next_progress_point(step: int) -> int:
    """The step of the progress point after the one at ``step`` (steps counted from 1): one
    step later up to step 20, then ``PROGRESS_SPACING`` of the steps so far later."""
    return step + max(1, int(PROGRESS_SPACING * step))


def evaluation_seconds(task: Task, *, device: torch.device | str = "cpu") -> float:
    """Seconds one evaluation of the progress signal takes on a fresh model of ``task`` (its
    ``PROGRESS_SAMPLES`` validation samples; 0 without validation data): what each progress
    point adds to a run's steps. The faster of two timings; the RNG is left as it was."""
    if task.val_data is None:
        return 0.0
    with preserved_rng():
        model = task.make_model(torch.device(device))
        timings = []
        for _ in range(2):
            begin = time.perf_counter()
            evaluate(task, model, device=device, max_samples=PROGRESS_SAMPLES)
            timings.append(time.perf_counter() - begin)
    return min(timings)


def train(
    task: Task,
    *,
    micro_batch: int,
    lr: float,
    steps: int | None = None,
    epochs: float | None = None,
    accumulation_steps: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    eval_every: int | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = False,
    target_loss: float | None = None,
) -> TrainResult:
    """Train a fresh model from ``task`` for ``steps`` optimizer steps (or ``epochs`` epochs).

    ``lr_schedule(step)`` multiplies ``lr`` at each step (e.g. a warm-up); ``eval_every`` adds a
    validation point every that many steps (the final step is always evaluated when the task has
    validation data). A non-finite training loss stops the run and marks it ``diverged``.
    ``progress`` follows the progress signal (``PROGRESS_SAMPLES``, ``PROGRESS_SPACING``) into
    ``TrainResult.progress``; a ``target_loss`` (which implies it) ends the run, evaluated, at the
    first point at or below it (``TrainResult.steps_to_target``).
    The loss runs under the task's precision; for ``"16-mixed"`` a ``GradScaler`` scales it and
    unscales the gradients before each optimizer step (skipping a step that overflowed).
    """
    check_positive_int("micro_batch", micro_batch)
    check_positive_int("accumulation_steps", accumulation_steps)
    lr = check_positive_float("lr", lr)
    global_batch = micro_batch * accumulation_steps
    if (steps is None) == (epochs is None):
        raise BadInputError("steps: give either steps or epochs")
    if steps is None:
        assert epochs is not None
        check_positive_float("epochs", epochs)
        planned = epochs * task.train_size / global_batch
        if planned > MAX_RUN_STEPS:
            raise BadInputError(
                f"epochs: {epochs:g} epochs are {planned:.3g} optimizer steps at global batch "
                f"{global_batch}, more than the {MAX_RUN_STEPS:,} a run may take"
            )
        steps = max(1, math.ceil(planned))
    check_run_steps("steps", steps)
    device = torch.device(device)

    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        check_trainable(model)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), lr)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        scaler = make_scaler(task.precision, device)
        source = micro_batches(task, micro_batch, seed=seed)
        losses: list[float] = []
        evaluations: list[tuple[int, Evaluation]] = []
        diverged = False
        follow = progress or target_loss is not None
        points: list[tuple[int, float]] = []
        since: list[float] = []
        next_point = 1
        start = time.perf_counter()
        for step in range(steps):
            if lr_schedule is not None:
                factor = lr_schedule(step)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
            optimizer.zero_grad(set_to_none=True)
            batches = [next(source) for _ in range(accumulation_steps)]
            loss = accumulate_gradients(task, model, batches, device=device, scaler=scaler)
            if not math.isfinite(loss):
                diverged = True
                break
            optimizer_step(optimizer, scaler)
            losses.append(loss)
            if on_step is not None:
                on_step(step, loss)
            last = step == steps - 1
            since.append(loss)
            if follow and step + 1 >= next_point:
                next_point = next_progress_point(step + 1)
                signal = (
                    evaluate(task, model, device=device, max_samples=PROGRESS_SAMPLES).loss
                    if task.val_data is not None
                    else sum(since) / len(since)
                )
                since = []
                points.append((step + 1, signal))
                if target_loss is not None and math.isfinite(signal) and signal <= target_loss:
                    last = True
            if task.val_data is not None and (
                last or (eval_every is not None and (step + 1) % eval_every == 0)
            ):
                evaluations.append((step + 1, evaluate(task, model, device=device)))
            if last:
                break
        seconds = time.perf_counter() - start
    done = len(losses)
    return TrainResult(
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        global_batch=global_batch,
        lr=lr,
        steps=done,
        samples=done * global_batch,
        epochs=done * global_batch / task.train_size,
        seconds=seconds,
        train_losses=tuple(losses),
        evaluations=tuple(evaluations),
        diverged=diverged,
        precision=task.precision,
        progress=tuple(points),
        target_loss=target_loss,
    )


__all__ = [
    "Evaluation",
    "TrainResult",
    "accumulate_gradients",
    "evaluate",
    "evaluation_seconds",
    "micro_batches",
    "next_progress_point",
    "progress_evaluations",
    "steps_to",
    "train",
]
