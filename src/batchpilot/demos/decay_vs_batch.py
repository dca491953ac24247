""" "Decaying the lr ≈ increasing the batch" (Smith et al. 2018, arXiv 1711.00489).

SGD's noise scale is g ≈ lr · N / (B (1 − m)): dividing the lr by k at a milestone or multiplying
the batch by k there lowers the noise alike, so both schedules should reach the same loss — the
second with fewer parameter updates, since every update then covers k times more samples. This
demo trains the ``digits`` example three ways from the same initialisation, for the same epochs:

* **decay lr** — batch ``B0`` throughout, lr divided by ``factor`` at each milestone;
* **increase batch** — lr constant, batch multiplied by ``factor`` at the same milestones;
* **constant** — neither, the control that shows the schedules matter at all.

Epochs count samples seen (samples / training-set size), so every schedule sees the same data.

>>> phases = schedule_phases(epochs=12, milestones=(6, 9), lr=0.05, batch=32, factor=4,
...                          kind="increase batch")
>>> [(p.epochs, p.batch, p.lr) for p in phases]
[(6.0, 32, 0.05), (3.0, 128, 0.05), (3.0, 512, 0.05)]
>>> [round(noise_scale(p, dataset_size=1437, momentum=0.9)) for p in phases]
[22, 6, 1]
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.demos.findings import Finding, verdict
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, evaluate, micro_batches

NAME = "decay-vs-batch"
SOURCE = "a practitioners' guide (CSDN: batch size and learning rate), after Smith et al. 2018 (arXiv 1711.00489)"
CLAIM = (
    "Decaying the learning rate can be replaced by increasing the batch size: both reach the same "
    "loss, and increasing the batch needs fewer parameter updates."
)
ScheduleKind = Literal["decay lr", "increase batch", "constant"]
KINDS: tuple[ScheduleKind, ...] = ("decay lr", "increase batch", "constant")
EPOCHS, MILESTONES = 12, (6, 9)
QUICK_EPOCHS, QUICK_MILESTONES = 4, (2, 3)
FACTOR = 4
SAME_LOSS_TOLERANCE = 0.2  # "the same loss": final training losses within 20 % of each other


@dataclass(frozen=True)
class Phase:
    """A stretch of training at one batch and one lr."""

    epochs: float
    batch: int
    lr: float


@dataclass(frozen=True)
class ScheduleRun:
    """One schedule's run: losses after every epoch and how many updates it took."""

    kind: ScheduleKind
    phases: tuple[Phase, ...]
    updates: int
    curve_epochs: tuple[float, ...]
    curve_updates: tuple[int, ...]
    train_losses: tuple[float, ...]
    val_losses: tuple[float, ...]
    val_accuracies: tuple[float, ...]
    final_train_loss: float
    final_val_accuracy: float
    diverged: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("curve_epochs", "curve_updates", "train_losses", "val_losses"):
            data[key] = list(data[key])
        data["val_accuracies"] = list(self.val_accuracies)
        data["phases"] = [asdict(phase) for phase in self.phases]
        return data


@dataclass(frozen=True)
class DecayVsBatchResult:
    """The three schedules on ``digits``, and whether the claim held."""

    decay: ScheduleRun
    increase: ScheduleRun
    constant: ScheduleRun
    factor: int
    milestones: tuple[float, ...]
    momentum: float
    dataset_size: int
    seed: int
    quick: bool
    findings: tuple[Finding, ...]
    name: str = NAME
    source: str = SOURCE
    claim: str = CLAIM

    @property
    def verdict(self) -> str:
        return verdict(self.findings)

    @property
    def seconds(self) -> float:
        return sum(run.seconds for run in self.runs)

    @property
    def runs(self) -> tuple[ScheduleRun, ScheduleRun, ScheduleRun]:
        return (self.decay, self.increase, self.constant)

    def rows(self) -> list[tuple[str, ...]]:
        """The short table: one row per schedule."""
        header = ("schedule", "batch", "lr", "noise scale g", "updates", "train loss", "val acc.")
        body = [
            (
                run.kind,
                " → ".join(str(p.batch) for p in run.phases),
                " → ".join(f"{p.lr:.3g}" for p in run.phases),
                " → ".join(
                    f"{noise_scale(p, dataset_size=self.dataset_size, momentum=self.momentum):.3g}"
                    for p in run.phases
                ),
                str(run.updates),
                f"{run.final_train_loss:.4f}",
                f"{run.final_val_accuracy:.1%}",
            )
            for run in self.runs
        ]
        return [header, *body]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "claim": self.claim,
            "verdict": self.verdict,
            "reproduced": all(f.holds for f in self.findings),
            "findings": [f.to_dict() for f in self.findings],
            "seed": self.seed,
            "quick": self.quick,
            "seconds": self.seconds,
            "factor": self.factor,
            "milestones": list(self.milestones),
            "momentum": self.momentum,
            "dataset_size": self.dataset_size,
            "same_loss_tolerance": SAME_LOSS_TOLERANCE,
            "runs": [run.to_dict() for run in self.runs],
        }


def noise_scale(phase: Phase, *, dataset_size: int, momentum: float = 0.0) -> float:
    """Smith et al.'s SGD noise scale g = lr · N / (B (1 − m)) during ``phase``."""
    return phase.lr * dataset_size / (phase.batch * (1.0 - momentum))


def schedule_phases(
    *,
    epochs: float,
    milestones: tuple[float, ...],
    lr: float,
    batch: int,
    factor: int,
    kind: ScheduleKind,
) -> tuple[Phase, ...]:
    """The phases of a schedule: at each milestone (in epochs) the lr is divided by ``factor``
    (``decay lr``) or the batch multiplied by it (``increase batch``); ``constant`` has one phase."""
    check_positive_float("epochs", epochs)
    check_positive_int("factor", factor)
    if kind not in KINDS:
        raise BadInputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    bounds = [0.0, *(float(m) for m in milestones), float(epochs)]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise BadInputError(
            f"milestones: expected increasing epochs inside (0, {epochs}), got {milestones}"
        )
    if kind == "constant":
        return (Phase(float(epochs), batch, lr),)
    return tuple(
        Phase(
            end - begin,
            batch * factor**k if kind == "increase batch" else batch,
            lr / factor**k if kind == "decay lr" else lr,
        )
        for k, (begin, end) in enumerate(itertools.pairwise(bounds))
    )


def train_schedule(
    task: Task,
    phases: tuple[Phase, ...],
    *,
    kind: ScheduleKind,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> ScheduleRun:
    """Train a fresh model through ``phases`` (the optimizer and its momentum carry over), with
    the training and validation loss after every epoch."""
    device = torch.device(device)
    n = task.train_size
    for phase in phases:
        if phase.batch > n:
            raise BadInputError(f"batch: {phase.batch} is larger than the training set ({n})")
    epochs: list[float] = []
    updates: list[int] = []
    train_losses: list[float] = []
    val_losses: list[float] = []
    accuracies: list[float] = []
    diverged = False
    began = time.perf_counter()
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), phases[0].lr)
        samples, steps, next_epoch = 0, 0, 1
        target = 0.0
        for index, phase in enumerate(phases):
            for group in optimizer.param_groups:
                group["lr"] = phase.lr
            source = micro_batches(task, phase.batch, seed=seed + 1000 * index)
            target += phase.epochs * n
            while samples + phase.batch / 2 < target and not diverged:
                optimizer.zero_grad(set_to_none=True)
                loss = accumulate_gradients(task, model, [next(source)], device=device)
                if not math.isfinite(loss):
                    diverged = True
                    break
                optimizer.step()
                samples += phase.batch
                steps += 1
                if samples >= next_epoch * n:
                    next_epoch = samples // n + 1
                    train_eval = evaluate(task, model, device=device, split="train")
                    val_eval = evaluate(task, model, device=device, split="val")
                    epochs.append(samples / n)
                    updates.append(steps)
                    train_losses.append(train_eval.loss)
                    val_losses.append(val_eval.loss)
                    accuracies.append(float(val_eval.metric or 0.0))
        if not epochs or updates[-1] != steps:
            train_eval = evaluate(task, model, device=device, split="train")
            val_eval = evaluate(task, model, device=device, split="val")
            epochs.append(samples / n)
            updates.append(steps)
            train_losses.append(train_eval.loss)
            val_losses.append(val_eval.loss)
            accuracies.append(float(val_eval.metric or 0.0))
        del model, optimizer
    return ScheduleRun(
        kind=kind,
        phases=phases,
        updates=steps,
        curve_epochs=tuple(epochs),
        curve_updates=tuple(updates),
        train_losses=tuple(train_losses),
        val_losses=tuple(val_losses),
        val_accuracies=tuple(accuracies),
        final_train_loss=train_losses[-1],
        final_val_accuracy=accuracies[-1],
        diverged=diverged,
        seconds=time.perf_counter() - began,
    )


def run_decay_vs_batch(
    *,
    seed: int = 0,
    quick: bool = False,
    batch: int | None = None,
    lr: float | None = None,
    factor: int = FACTOR,
    epochs: float | None = None,
    milestones: tuple[float, ...] | None = None,
    device: torch.device | str = "cpu",
) -> DecayVsBatchResult:
    """Train ``digits`` with the lr decayed, the batch increased, and neither (12 epochs with
    milestones at 6 and 9; 4 with 2 and 3 when ``quick``), from the same initialisation.

    ``batch`` and ``lr`` start at the task's reference pair (64, 0.05)."""
    task = load_task(example="digits")
    batch = check_positive_int("batch", batch or task.reference_batch or 64)
    lr = check_positive_float("lr", lr or task.reference_lr or 0.05)
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else EPOCHS
    if milestones is None:
        milestones = QUICK_MILESTONES if quick else MILESTONES
    runs = {
        kind: train_schedule(
            task,
            schedule_phases(
                epochs=epochs,
                milestones=milestones,
                lr=lr,
                batch=batch,
                factor=factor,
                kind=kind,
            ),
            kind=kind,
            seed=seed,
            device=device,
        )
        for kind in KINDS
    }
    decay, increase, constant = runs["decay lr"], runs["increase batch"], runs["constant"]
    return DecayVsBatchResult(
        decay=decay,
        increase=increase,
        constant=constant,
        factor=factor,
        milestones=tuple(float(m) for m in milestones),
        momentum=_momentum(task),
        dataset_size=task.train_size,
        seed=seed,
        quick=quick,
        findings=_findings(decay, increase, constant),
    )


def _momentum(task: Task) -> float:
    probe = task.make_optimizer([torch.nn.Parameter(torch.zeros(1))], 1.0)
    return float(probe.param_groups[0].get("momentum", 0.0))


def _findings(
    decay: ScheduleRun, increase: ScheduleRun, constant: ScheduleRun
) -> tuple[Finding, ...]:
    ratio = increase.final_train_loss / decay.final_train_loss
    increase_gap = abs(increase.final_train_loss - decay.final_train_loss)
    constant_gap = abs(constant.final_train_loss - decay.final_train_loss)
    return (
        Finding(
            claim="increasing the batch reaches the same loss as decaying the lr",
            measured=(
                f"final training loss {increase.final_train_loss:.4f} (increase batch) against "
                f"{decay.final_train_loss:.4f} (decay lr): ratio {ratio:.2f}, counted the same "
                f"within ±{SAME_LOSS_TOLERANCE:.0%}"
            ),
            holds=abs(ratio - 1.0) <= SAME_LOSS_TOLERANCE,
        ),
        Finding(
            # Without this the match could be empty: neither schedule changing anything.
            claim="increasing the batch has the lr decay's effect (closer to it than no schedule)",
            measured=(
                f"gap to decay lr: increase batch {increase_gap:.4f}, constant lr and batch "
                f"{constant_gap:.4f} (final training loss with neither: "
                f"{constant.final_train_loss:.4f})"
            ),
            holds=increase_gap < constant_gap,
        ),
        Finding(
            claim="increasing the batch needs fewer parameter updates",
            measured=(
                f"{increase.updates} updates (increase batch) against {decay.updates} "
                f"(decay lr): {increase.updates / decay.updates:.0%}"
            ),
            holds=increase.updates < decay.updates,
        ),
    )


__all__ = [
    "CLAIM",
    "DecayVsBatchResult",
    "Phase",
    "ScheduleRun",
    "noise_scale",
    "run_decay_vs_batch",
    "schedule_phases",
    "train_schedule",
]
