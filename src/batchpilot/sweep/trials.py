"""One trial of a sweep: train a fresh model at one (batch, lr) for the budget and record its curve.

A :class:`TrialSpec` is plain data (it crosses process and machine boundaries, so the task travels
as its spec string); :func:`run_trial` trains with :func:`batchpilot.training._loop.train` and returns a
:class:`TrialResult`. Failures that belong to the trial (out of memory, the user's code raising, a
batch the task cannot take) become a failed result instead of ending the sweep.

>>> from batchpilot.loading import load_task
>>> spec = TrialSpec(key="b8-lr1", batch=8, micro_batch=8, accumulation_steps=1, lr_rule="none",
...                  lr_factor=1.0, ref_batch=4, ref_lr=10.0, steps=6, eval_every=2)
>>> result = run_trial(load_task(example="xor4"), spec)
>>> result.status, result.lr, [point.step for point in result.curve]
('done', 10.0, [0, 2, 4, 6])
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import statistics
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from batchpilot.devices import release_memory, resolve_device
from batchpilot.errors import BadInputError, BatchpilotError
from batchpilot.measure._lr_check import with_adam_scaling
from batchpilot.measure._lr_range import find_lr
from batchpilot.oom import is_out_of_memory
from batchpilot.state import preserved_rng
from batchpilot.sweep.budgets import first_crossing, interpolate
from batchpilot.sweep.lrs import LrPlan
from batchpilot.task import Task
from batchpilot.training._loop import Evaluation, TrainResult, evaluate, train

Status = Literal["done", "failed"]


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial (JSON-safe, picklable)."""

    key: str
    batch: int
    micro_batch: int
    accumulation_steps: int
    lr_rule: str
    lr_factor: float
    ref_batch: int | None
    ref_lr: float | None
    steps: int
    eval_every: int
    warmup_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    task: str | None = None
    target_loss: float | None = None
    target_metric: float | None = None
    metric_mode: Literal["min", "max"] = "max"


@dataclass(frozen=True)
class CurvePoint:
    """One validation point of a trial.

    ``seconds`` is training time only: the validation passes are left out, so that wall time to a
    target compares batch sizes and not how often they were validated. ``train_loss`` is the mean
    mini-batch training loss since the previous point. Step 0 is the initial model (its
    ``train_loss`` is NaN), so a target is interpolated from the start.
    """

    step: int
    samples: int
    seconds: float
    train_loss: float
    val_loss: float
    val_metric: float | None


@dataclass(frozen=True)
class TrialResult:
    """What one trial did. ``val_*`` and ``train_loss`` are read at its last validation point;
    ``generalization_gap`` is validation loss minus training loss there."""

    key: str
    batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float | None
    lr_rule: str
    lr_factor: float
    seed: int
    status: Status
    error: str | None
    diverged: bool
    steps: int
    samples: int
    epochs: float
    seconds: float
    wall_seconds: float
    val_loss: float | None
    val_metric: float | None
    train_loss: float | None
    generalization_gap: float | None
    steps_to_target: float | None
    samples_to_target: float | None
    seconds_to_target: float | None
    curve: tuple[CurvePoint, ...]
    device: str
    worker: str

    @property
    def ok(self) -> bool:
        """Finished, did not diverge, and was validated at least once."""
        return self.status == "done" and not self.diverged and self.val_loss is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve"] = [asdict(point) for point in self.curve]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        curve = tuple(CurvePoint(**point) for point in data.get("curve", ()))
        return cls(**{**data, "curve": curve})


def run_trial(task: Task, spec: TrialSpec) -> TrialResult:
    """Train ``task`` as ``spec`` says; trial-level failures come back as a failed result."""
    started = time.perf_counter()
    lr: float | None = None
    device = torch.device("cpu")
    try:
        device = resolve_device(spec.device)
        lr = trial_lr(task, spec, device=device)
        start = initial_evaluation(task, seed=spec.seed, device=device)
        result, stamps = _timed_train(_with_adam_scaling(task, spec), spec, lr, device)
    except BatchpilotError as exc:
        return failed_trial(spec, str(exc), lr=lr, wall_seconds=time.perf_counter() - started)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        release_memory(device)
        return failed_trial(
            spec,
            f"out of memory at batch {spec.batch}: {exc}",
            lr=lr,
            wall_seconds=time.perf_counter() - started,
        )
    # The trial's model is gone with train's frame; on a GPU, hand its cached blocks back too
    # (on the CPU a full gc pass costs more than a small trial and frees nothing more).
    if device.type == "cuda":
        release_memory(device)
    return _summarize(spec, start, result, stamps, device)


def trial_lr(task: Task, spec: TrialSpec, *, device: torch.device) -> float:
    """The trial's lr: the plan's base lr at its batch times its factor."""
    if spec.lr_rule == "range-test":
        return _range_test_lr(task, spec, device) * spec.lr_factor
    plan = LrPlan(rule=spec.lr_rule, ref_batch=spec.ref_batch, ref_lr=spec.ref_lr)  # type: ignore[arg-type]
    return plan.base_lr(spec.batch, reduction=task.reduction) * spec.lr_factor


# Range tests are deterministic given (task, batch, seed, device): a grid of factors around the
# suggestion needs only one per batch in each worker. The last RANGE_TEST_CACHE of them are kept
# (a worker runs one sweep at a time; a ladder has about ten batches), keyed by id(task) and
# checked by a weak reference so that a new task reusing a dead one's id never reads its results.
RANGE_TEST_CACHE = 32
_RANGE_TESTS: OrderedDict[tuple[int, int, int, int, str], tuple[weakref.ref[Task], float]] = (
    OrderedDict()
)


def _range_test_lr(task: Task, spec: TrialSpec, device: torch.device) -> float:
    key = (id(task), spec.micro_batch, spec.accumulation_steps, spec.seed, str(device))
    cached = _RANGE_TESTS.get(key)
    if cached is not None and cached[0]() is task:
        _RANGE_TESTS.move_to_end(key)
        return cached[1]
    found = find_lr(
        task,
        micro_batch=spec.micro_batch,
        accumulation_steps=spec.accumulation_steps,
        seed=spec.seed,
        device=device,
    )
    suggestion = found.suggestion
    if suggestion is None or not math.isfinite(suggestion) or suggestion <= 0:
        raise BadInputError(
            f"lr_rule: the lr range test gave no usable suggestion at batch {spec.batch} "
            f"(got {suggestion!r})"
        )
    _RANGE_TESTS[key] = (weakref.ref(task), float(suggestion))
    while len(_RANGE_TESTS) > RANGE_TEST_CACHE:
        _RANGE_TESTS.popitem(last=False)
    return float(suggestion)


def _with_adam_scaling(task: Task, spec: TrialSpec) -> Task:
    """Under the adam rule, also rescale the optimizer's betas and eps (Malladi et al.) from the
    values its factory sets at the reference batch."""
    if spec.lr_rule != "adam" or spec.ref_batch is None:
        return task
    return with_adam_scaling(task, ref_batch=spec.ref_batch, batch=spec.batch)


def initial_evaluation(task: Task, *, seed: int, device: torch.device) -> Evaluation:
    """Validation of the model a trial starts from: :func:`~batchpilot.training._loop.train` draws it
    first from ``seed``, so drawing it the same way gives the same weights."""
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        evaluation = evaluate(task, model, device=device)
    del model
    return evaluation


def _timed_train(
    task: Task, spec: TrialSpec, lr: float, device: torch.device
) -> tuple[TrainResult, list[float]]:
    stamps: list[float] = []
    warmup = spec.warmup_steps
    stamps.append(time.perf_counter())
    result = train(
        task,
        micro_batch=spec.micro_batch,
        accumulation_steps=spec.accumulation_steps,
        lr=lr,
        steps=spec.steps,
        device=device,
        seed=spec.seed,
        eval_every=spec.eval_every,
        lr_schedule=(lambda step: min(1.0, (step + 1) / warmup)) if warmup > 0 else None,
        on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )
    return result, stamps


def _training_seconds(stamps: list[float], evaluated_steps: set[int]) -> list[float]:
    """Cumulative training time after each step, with validation passes taken out.

    ``stamps[0]`` is the start and ``stamps[s]`` the end of step ``s`` (1-based). The interval
    that follows a validation at step ``s`` also holds that pass, and the first one holds building
    the model and the process's first-call costs; they are replaced by the median of the others.
    """
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    # Interval s is step s + 1; it follows the validation at step s, if there was one.
    dirty = {0} | {s for s in evaluated_steps if s < len(intervals)}
    clean = [d for index, d in enumerate(intervals) if index not in dirty]
    typical = statistics.median(clean) if clean else None
    cumulative, total = [], 0.0
    for index, interval in enumerate(intervals):
        total += typical if index in dirty and typical is not None else interval
        cumulative.append(total)
    return cumulative


def _summarize(
    spec: TrialSpec,
    start: Evaluation,
    result: TrainResult,
    stamps: list[float],
    device: torch.device,
) -> TrialResult:
    evaluated = {step for step, _ in result.evaluations}
    seconds = _training_seconds(stamps, evaluated)
    first = CurvePoint(0, 0, 0.0, math.nan, start.loss, start.metric)
    curve: list[CurvePoint] = [first]
    previous = 0
    for step, evaluation in result.evaluations:
        window = result.train_losses[previous:step]
        curve.append(
            CurvePoint(
                step=step,
                samples=step * result.global_batch,
                seconds=seconds[step - 1] if step - 1 < len(seconds) else result.seconds,
                train_loss=sum(window) / len(window) if window else math.nan,
                val_loss=evaluation.loss,
                val_metric=evaluation.metric,
            )
        )
        previous = step
    last = curve[-1] if len(curve) > 1 else None
    to_target = _to_target(spec, curve)
    return TrialResult(
        key=spec.key,
        batch=spec.batch,
        micro_batch=spec.micro_batch,
        accumulation_steps=spec.accumulation_steps,
        lr=result.lr,
        lr_rule=spec.lr_rule,
        lr_factor=spec.lr_factor,
        seed=spec.seed,
        status="done",
        error=None,
        diverged=result.diverged,
        steps=result.steps,
        samples=result.samples,
        epochs=result.epochs,
        seconds=seconds[-1] if seconds else 0.0,
        wall_seconds=result.seconds,
        val_loss=None if last is None else last.val_loss,
        val_metric=None if last is None else last.val_metric,
        train_loss=None if last is None else last.train_loss,
        generalization_gap=None if last is None else last.val_loss - last.train_loss,
        steps_to_target=to_target[0],
        samples_to_target=to_target[1],
        seconds_to_target=to_target[2],
        curve=tuple(curve),
        device=str(device),
        worker=_worker(),
    )


def _to_target(
    spec: TrialSpec, curve: list[CurvePoint]
) -> tuple[float | None, float | None, float | None]:
    if spec.target_loss is not None:
        values: list[float | None] = [point.val_loss for point in curve]
        position = first_crossing(values, spec.target_loss, mode="min")
    elif spec.target_metric is not None:
        values = [point.val_metric for point in curve]
        position = first_crossing(values, spec.target_metric, mode=spec.metric_mode)
    else:
        return None, None, None
    if position is None:
        return None, None, None
    return (
        interpolate(position, [point.step for point in curve]),
        interpolate(position, [point.samples for point in curve]),
        interpolate(position, [point.seconds for point in curve]),
    )


def failed_trial(
    spec: TrialSpec, error: str, *, lr: float | None = None, wall_seconds: float = 0.0
) -> TrialResult:
    """The result of a trial that could not finish, with the first line of ``error``."""
    return TrialResult(
        key=spec.key,
        batch=spec.batch,
        micro_batch=spec.micro_batch,
        accumulation_steps=spec.accumulation_steps,
        lr=lr,
        lr_rule=spec.lr_rule,
        lr_factor=spec.lr_factor,
        seed=spec.seed,
        status="failed",
        error=error.strip().splitlines()[0] if error.strip() else "failed",
        diverged=False,
        steps=0,
        samples=0,
        epochs=0.0,
        seconds=0.0,
        wall_seconds=wall_seconds,
        val_loss=None,
        val_metric=None,
        train_loss=None,
        generalization_gap=None,
        steps_to_target=None,
        samples_to_target=None,
        seconds_to_target=None,
        curve=(),
        device=spec.device,
        worker=_worker(),
    )


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
