"""``tune``: from a task to one recommendation, running every measurement in order.

memory limit → throughput curve → LR range test at a reference batch → noise scale during a short
training at that lr → goodput → recommendation → (optional) verification runs at ×0.5, ×1 and ×2 of
the recommended batch, the procedure of seed 003. Each phase's own result is kept, so the report can
show the evidence behind every number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.measure._lr_range import LRFinderResult, find_lr
from batchpilot.measure._memory_search import MaxBatchResult, find_max_batch
from batchpilot.measure._noise import NoiseScaleResult, measure_noise_scale
from batchpilot.measure._throughput import ThroughputCurve, measure_throughput
from batchpilot.plan._lr_rule import lr_for_batch
from batchpilot.plan._recommend import Recommendation, recommend
from batchpilot.plan._split import split_batch
from batchpilot.summary import TaskSummary, summarize_task
from batchpilot.task import Task
from batchpilot.training._loop import train

PHASES = ("memory", "throughput", "lr range test", "noise scale", "recommendation", "verify")


class TuneProgress(Protocol):
    """Where ``tune`` reports progress: one bar per phase (the CLI draws them on stderr)."""

    def start(self, phase: str, total: int) -> None: ...

    def update(self, phase: str, completed: int) -> None: ...

    def finish(self, phase: str, note: str = "") -> None: ...


@dataclass(frozen=True)
class TuneOptions:
    """Budgets and settings of every phase; defaults finish the built-in examples in a minute."""

    device: str = "cpu"
    seed: int = 0
    world_size: int = 1
    reference_batch: int | None = None
    lr: float | None = None
    budget_bytes: int | None = None
    margin: float = 0.05
    max_batch: int | None = None
    memory_mode: str = "auto"
    throughput_steps: int = 5
    lr_steps: int = 100
    lr_repeats: int = 3
    min_lr: float = 1e-6
    max_lr: float = 10.0
    noise_steps: int = 200
    noise_micro_batches: int = 4
    verify: bool = False
    verify_epochs: float = 5.0
    time_budget_seconds: float | None = None

    def __post_init__(self) -> None:
        check_positive_int("world_size", self.world_size)
        check_positive_int("throughput_steps", self.throughput_steps)
        check_positive_int("lr_steps", self.lr_steps)
        check_positive_int("lr_repeats", self.lr_repeats)
        check_positive_int("noise_steps", self.noise_steps)
        check_positive_float("verify_epochs", self.verify_epochs)
        if self.noise_micro_batches < 2:
            raise BadInputError(
                f"noise_micro_batches: expected at least 2 (two batch sizes are compared), "
                f"got {self.noise_micro_batches}"
            )
        if self.reference_batch is not None:
            check_positive_int("reference_batch", self.reference_batch)
        if self.lr is not None:
            check_positive_float("lr", self.lr)
        if self.time_budget_seconds is not None:
            check_positive_float("time_budget", self.time_budget_seconds)


@dataclass(frozen=True)
class VerifyRun:
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    lr: float
    steps: int
    val_loss: float | None
    train_loss: float | None
    metric: float | None
    seconds: float
    diverged: bool

    @property
    def score(self) -> float | None:
        """Validation loss, or the final training loss when the task has no validation data."""
        return self.val_loss if self.val_loss is not None else self.train_loss


@dataclass(frozen=True)
class Verification:
    runs: tuple[VerifyRun, ...]
    best_batch: int
    epochs: float
    agrees: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [asdict(run) for run in self.runs],
            "best_batch": self.best_batch,
            "epochs": self.epochs,
            "agrees": self.agrees,
        }


@dataclass(frozen=True)
class TuneResult:
    task: TaskSummary
    options: TuneOptions
    memory: MaxBatchResult
    throughput: ThroughputCurve
    lr_find: LRFinderResult
    noise: NoiseScaleResult | None
    recommendation: Recommendation
    verification: Verification | None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommendation": self.recommendation.to_dict(),
            "task": self.task.to_dict(),
            "options": asdict(self.options),
            "memory": self.memory.to_dict(),
            "throughput": self.throughput.to_dict(),
            "lr_find": self.lr_find.to_dict(),
            "noise": None if self.noise is None else self.noise.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "phase_seconds": dict(self.phase_seconds),
            "notes": list(self.notes),
        }


class _Quiet:
    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, phase: str, completed: int) -> None:
        pass

    def finish(self, phase: str, note: str = "") -> None:
        pass


def _optimizer_defaults(task: Task) -> tuple[tuple[float, float], float]:
    """The betas and eps the task's optimizer factory uses (Adam's defaults otherwise)."""
    model = torch.nn.Linear(1, 1)
    optimizer = task.make_optimizer(model.parameters(), 1e-3)
    group = optimizer.param_groups[0]
    betas = tuple(group.get("betas", (0.9, 0.999)))
    return (float(betas[0]), float(betas[1])), float(group.get("eps", 1e-8))


def tune(
    task: Task, options: TuneOptions | None = None, *, progress: TuneProgress | None = None
) -> TuneResult:
    """Run every phase on ``task`` and return the recommendation with each phase's evidence."""
    options = options or TuneOptions()
    bar: TuneProgress = progress or _Quiet()
    device = torch.device(options.device)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    summary = summarize_task(task, device=device, seed=options.seed)

    def timed(phase: str, run: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        value = run()
        seconds[phase] = time.perf_counter() - begin
        return value

    bar.start("memory", 1)
    memory: MaxBatchResult = timed(
        "memory",
        lambda: find_max_batch(
            task,
            device=device,
            budget_bytes=options.budget_bytes,
            margin=options.margin,
            max_batch=options.max_batch,
            mode=options.memory_mode,
            seed=options.seed,
        ),
    )
    bar.finish("memory", f"max micro-batch {memory.max_micro_batch}")
    max_micro = memory.max_micro_batch

    bar.start("throughput", 1)
    throughput: ThroughputCurve = timed(
        "throughput",
        lambda: measure_throughput(
            task,
            max_batch=max_micro,
            device=device,
            timed_steps=options.throughput_steps,
            seed=options.seed,
        ),
    )
    bar.finish("throughput", f"knee at micro-batch {throughput.knee_batch}")

    reference_batch = options.reference_batch or task.reference_batch or 32
    reference_batch = max(2, min(reference_batch, max_micro, task.train_size // 2))
    lr_steps, lr_repeats, noise_steps, verify_epochs = _fit_budget(
        options,
        throughput,
        reference_batch,
        task.train_size,
        spent=time.perf_counter() - started,
        notes=notes,
    )

    bar.start("lr range test", lr_steps * lr_repeats)
    lr_find_result: LRFinderResult = timed(
        "lr range test",
        lambda: find_lr(
            task,
            micro_batch=reference_batch,
            min_lr=options.min_lr,
            max_lr=options.max_lr,
            steps=lr_steps,
            repeats=lr_repeats,
            seed=options.seed,
            device=device,
            on_step=lambda done, total: bar.update("lr range test", done),
        ),
    )
    good_lr = options.lr or lr_find_result.suggestion or task.reference_lr
    if good_lr is None:
        raise BadInputError(
            "lr: the range test found no descent and the task has no reference lr; give --lr "
            f"({lr_find_result.message})"
        )
    if options.lr is None and lr_find_result.suggestion is None:
        notes.append(
            f"The range test found no descent ({lr_find_result.message}); the task's reference lr "
            f"{good_lr:g} was used."
        )
    bar.finish("lr range test", f"lr {good_lr:.3g} at batch {reference_batch}")

    micro_batches = options.noise_micro_batches
    while micro_batches > 2 and reference_batch % micro_batches:
        micro_batches -= 1
    noise: NoiseScaleResult | None = None
    bar.start("noise scale", noise_steps)
    if reference_batch % micro_batches == 0:
        noise = timed(
            "noise scale",
            lambda: measure_noise_scale(
                task,
                batch=reference_batch,
                steps=noise_steps,
                lr=good_lr,
                micro_batches=micro_batches,
                device=device,
                seed=options.seed,
                on_step=lambda step, loss: bar.update("noise scale", step + 1),
            ),
        )
    else:
        notes.append(f"Batch {reference_batch} cannot be split in micro-batches: no noise scale.")
    noise_scale = None
    if noise is not None and math.isfinite(noise.noise_scale) and noise.noise_scale > 0:
        noise_scale = noise.noise_scale
    bar.finish("noise scale", f"B_noise ≈ {noise_scale:.0f}" if noise_scale else "not measured")

    bar.start("recommendation", 1)
    betas, eps = _optimizer_defaults(task)
    recommendation = recommend(
        train_size=task.train_size,
        max_micro_batch=max_micro,
        reference_batch=reference_batch,
        reference_lr=good_lr,
        optimizer_name=summary.optimizer,
        reduction=task.reduction,
        world_size=options.world_size,
        noise_scale=noise_scale,
        throughput=throughput,
        knee_batch=throughput.knee_batch,
        betas=betas,
        eps=eps,
        has_batchnorm=summary.has_batchnorm,
        noise_lr=None if noise is None else noise.lr,
        max_global_batch=options.max_batch * options.world_size if options.max_batch else None,
    )
    bar.finish("recommendation", f"batch {recommendation.global_batch}, lr {recommendation.lr:.3g}")

    verification = None
    if options.verify:
        verification = timed(
            "verify",
            lambda: _verify(
                task,
                recommendation,
                summary,
                options,
                max_micro,
                throughput,
                betas,
                eps,
                verify_epochs,
                bar,
            ),
        )
    seconds["total"] = time.perf_counter() - started
    return TuneResult(
        task=summary,
        options=options,
        memory=memory,
        throughput=throughput,
        lr_find=lr_find_result,
        noise=noise,
        recommendation=recommendation,
        verification=verification,
        phase_seconds=seconds,
        notes=tuple(notes),
    )


def _fit_budget(
    options: TuneOptions,
    throughput: ThroughputCurve,
    batch: int,
    train_size: int,
    *,
    spent: float,
    notes: list[str],
) -> tuple[int, int, int, float]:
    """Shrink the later phases' step counts to fit ``--time-budget``, from measured step times."""
    lr_steps, repeats, noise_steps = options.lr_steps, options.lr_repeats, options.noise_steps
    verify_epochs = options.verify_epochs
    if options.time_budget_seconds is None:
        return lr_steps, repeats, noise_steps, verify_epochs
    step_seconds = batch / max(throughput.samples_per_second_at(batch), 1e-9)
    left = max(options.time_budget_seconds - spent, 0.0)
    shares = (0.4, 0.3, 0.3) if options.verify else (0.55, 0.45, 0.0)
    lr_budget = int(shares[0] * left / step_seconds)
    while repeats > 1 and lr_steps * repeats > lr_budget:
        repeats -= 1
    lr_steps = max(20, min(lr_steps, lr_budget // repeats))
    noise_steps = max(20, min(noise_steps, int(shares[1] * left / step_seconds)))
    if options.verify:
        # three runs of equal epochs at ×0.5, ×1, ×2 the batch: ~3 × epochs × train_size samples
        affordable = shares[2] * left / (3 * step_seconds * train_size / batch)
        verify_epochs = max(0.5, min(verify_epochs, affordable))
    if (lr_steps, repeats, noise_steps, verify_epochs) != (
        options.lr_steps,
        options.lr_repeats,
        options.noise_steps,
        options.verify_epochs,
    ):
        notes.append(
            f"--time-budget {options.time_budget_seconds:g} s: range test {lr_steps} steps × "
            f"{repeats}, noise scale {noise_steps} steps"
            + (f", verification {verify_epochs:.2g} epochs" if options.verify else "")
            + f" (a step at batch {batch} takes {step_seconds * 1e3:.1f} ms)."
        )
    return lr_steps, repeats, noise_steps, verify_epochs


def _verify(
    task: Task,
    recommendation: Recommendation,
    summary: TaskSummary,
    options: TuneOptions,
    max_micro: int,
    throughput: ThroughputCurve,
    betas: tuple[float, float],
    eps: float,
    epochs: float,
    bar: TuneProgress,
) -> Verification:
    """Seed 003's check: train at ×0.5, ×1 and ×2 the batch for equal epochs, keep the best."""
    batch = recommendation.global_batch
    ladder = [b for b in (batch // 2, batch, batch * 2) if 1 <= b <= task.train_size]
    bar.start("verify", len(ladder))
    runs = []
    for done, global_batch in enumerate(ladder):
        # one device stands in for world_size devices: the same global batch by accumulation
        split = split_batch(global_batch, max_micro_batch=max_micro, speed=throughput)
        lr = lr_for_batch(
            recommendation.reference_lr,
            ref_batch=recommendation.reference_batch,
            batch=global_batch,
            optimizer=summary.optimizer,
            reduction=task.reduction,
            noise_scale=recommendation.noise_scale,
            betas=betas,
            eps=eps,
        ).lr
        result = train(
            task,
            micro_batch=split.micro_batch,
            accumulation_steps=split.accumulation_steps,
            lr=lr,
            epochs=epochs,
            device=options.device,
            seed=options.seed,
        )
        final = result.final
        tail = result.train_losses[-10:]
        runs.append(
            VerifyRun(
                global_batch=global_batch,
                micro_batch=split.micro_batch,
                accumulation_steps=split.accumulation_steps,
                lr=lr,
                steps=result.steps,
                val_loss=None if final is None else final.loss,
                train_loss=sum(tail) / len(tail) if tail else None,
                metric=None if final is None else final.metric,
                seconds=result.seconds,
                diverged=result.diverged,
            )
        )
        bar.update("verify", done + 1)
    scored = [r for r in runs if r.score is not None and not r.diverged]
    best = min(scored, key=lambda r: r.score or math.inf).global_batch if scored else batch
    bar.finish("verify", f"best batch {best}")
    return Verification(runs=tuple(runs), best_batch=best, epochs=epochs, agrees=best == batch)
