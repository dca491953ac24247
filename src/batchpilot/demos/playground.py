"""The TensorFlow Playground spiral: batch 1 against batch 30 at the same lr, over epochs.

The seed shows two Playground screenshots: at batch 30 the fit "gets stuck in some shape" after
300 epochs; at batch 1 it fits within 150 epochs, with a loss curve that wobbles up and down more.
This demo trains the ``spiral`` example (250 training points, 250 held out) with plain SGD at the
Playground's default lr of 0.03 for both batches, evaluates the held-out half after every epoch,
and counts the epochs until ``target_accuracy`` of the held-out points are classified right.

>>> run = _run_from_curve(1, 0.03, 3, 250, (1.0, 2.0, 3.0), (0.7, 0.6, 0.65), (0.5, 0.96, 0.9),
...                       target_accuracy=0.95, seconds=0.0)
>>> run.epochs_to_fit, round(run.loss_rise_per_epoch, 4)
(2.0, 0.0167)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.demos.findings import Finding, demo_dict, first_reaching, verdict
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.training._loop import train

NAME = "playground"
SOURCE = "a practitioners' guide (Zhihu: how to choose the batch size), the TensorFlow Playground screenshots"
CLAIM = (
    "On the Playground's spiral, batch 30 gets stuck in one shape after 300 epochs, while batch 1 "
    "fits within 150 epochs; batch 1's loss curve wobbles up and down more."
)
PLAYGROUND_LR = 0.03  # the Playground's default learning rate; the seed changed only the batch
SMALL_BATCH, LARGE_BATCH = 1, 30
SMALL_EPOCHS, LARGE_EPOCHS = 150, 300  # the seed's screenshots
QUICK_EPOCHS = 30


@dataclass(frozen=True)
class PlaygroundRun:
    """One batch size's run: held-out loss and accuracy after every epoch."""

    batch: int
    lr: float
    epochs: int
    steps_per_epoch: int
    curve_epochs: tuple[float, ...]
    curve_losses: tuple[float, ...]
    curve_accuracies: tuple[float, ...]
    epochs_to_fit: float | None
    best_accuracy: float
    final_loss: float
    final_accuracy: float
    loss_rise_per_epoch: float
    seconds: float

    def best_accuracy_by(self, epoch: float) -> float:
        """The best held-out accuracy reached within the first ``epoch`` epochs."""
        pairs = zip(self.curve_epochs, self.curve_accuracies, strict=True)
        return max((a for e, a in pairs if e <= epoch + 1e-9), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("curve_epochs", "curve_losses", "curve_accuracies"):
            data[key] = list(data[key])
        return data


@dataclass(frozen=True)
class PlaygroundResult:
    """Batch 1 against batch 30 on the spiral, and whether the claim held."""

    small: PlaygroundRun
    large: PlaygroundRun
    target_accuracy: float
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
        return self.small.seconds + self.large.seconds

    @property
    def runs(self) -> tuple[PlaygroundRun, PlaygroundRun]:
        return (self.small, self.large)

    def rows(self) -> list[tuple[str, ...]]:
        """The short table: one row per batch size."""
        header = (
            "batch",
            "lr",
            "epochs",
            "steps/epoch",
            f"fit (≥{self.target_accuracy:.0%}) at",
            "best acc.",
            "final loss",
            "loss rise/epoch",
        )
        body = [
            (
                str(run.batch),
                f"{run.lr:g}",
                str(run.epochs),
                str(run.steps_per_epoch),
                "—" if run.epochs_to_fit is None else f"epoch {run.epochs_to_fit:g}",
                f"{run.best_accuracy:.1%}",
                f"{run.final_loss:.3f}",
                f"{run.loss_rise_per_epoch:.4f}",
            )
            for run in self.runs
        ]
        return [header, *body]

    def to_dict(self) -> dict[str, Any]:
        return demo_dict(
            self, seconds=self.seconds, small=self.small.to_dict(), large=self.large.to_dict()
        )


def run_playground(
    *,
    seed: int = 0,
    quick: bool = False,
    lr: float = PLAYGROUND_LR,
    small_batch: int = SMALL_BATCH,
    large_batch: int = LARGE_BATCH,
    small_epochs: int | None = None,
    large_epochs: int | None = None,
    target_accuracy: float = 0.95,
    device: torch.device | str = "cpu",
) -> PlaygroundResult:
    """Train the spiral at ``small_batch`` for 150 epochs and ``large_batch`` for 300 (both
    ``QUICK_EPOCHS`` when ``quick``), same lr and initialisation, evaluating after every epoch."""
    task = load_task(example="spiral")
    lr = check_positive_float("lr", lr)
    for name, batch in (("small_batch", small_batch), ("large_batch", large_batch)):
        check_positive_int(name, batch)
        if batch > task.train_size:
            raise BadInputError(f"{name}: expected at most {task.train_size} samples, got {batch}")
    small_epochs = check_positive_int(
        "small_epochs", small_epochs or (QUICK_EPOCHS if quick else SMALL_EPOCHS)
    )
    large_epochs = check_positive_int(
        "large_epochs", large_epochs or (QUICK_EPOCHS if quick else LARGE_EPOCHS)
    )
    if not 0.0 < target_accuracy <= 1.0:
        raise BadInputError(
            f"target_accuracy: expected a fraction in (0, 1], got {target_accuracy}"
        )

    def one_run(batch: int, epochs: int) -> PlaygroundRun:
        steps_per_epoch = task.train_size // batch  # the loader drops the last partial batch
        result = train(
            task,
            micro_batch=batch,
            lr=lr,
            steps=epochs * steps_per_epoch,
            seed=seed,
            eval_every=steps_per_epoch,
            device=device,
        )
        points = tuple(step / steps_per_epoch for step, _ in result.evaluations)
        losses = tuple(evaluation.loss for _, evaluation in result.evaluations)
        accuracies = tuple(float(evaluation.metric or 0.0) for _, evaluation in result.evaluations)
        return _run_from_curve(
            batch,
            lr,
            epochs,
            steps_per_epoch,
            points,
            losses,
            accuracies,
            target_accuracy=target_accuracy,
            seconds=result.seconds,
        )

    small = one_run(small_batch, small_epochs)
    large = one_run(large_batch, large_epochs)
    return PlaygroundResult(
        small=small,
        large=large,
        target_accuracy=target_accuracy,
        seed=seed,
        quick=quick,
        findings=_findings(small, large, target_accuracy),
    )


def _run_from_curve(
    batch: int,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    points: tuple[float, ...],
    losses: tuple[float, ...],
    accuracies: tuple[float, ...],
    *,
    target_accuracy: float,
    seconds: float,
) -> PlaygroundRun:
    # The wobble the seed points at: how far the held-out loss climbs back, per epoch.
    rises = sum(max(0.0, b - a) for a, b in itertools.pairwise(losses))
    return PlaygroundRun(
        batch=batch,
        lr=lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        curve_epochs=points,
        curve_losses=losses,
        curve_accuracies=accuracies,
        epochs_to_fit=first_reaching(points, accuracies, target_accuracy, above=True),
        best_accuracy=max(accuracies, default=0.0),
        final_loss=losses[-1] if losses else math.nan,
        final_accuracy=accuracies[-1] if accuracies else math.nan,
        loss_rise_per_epoch=rises / max(points[-1] if points else 1.0, 1.0),
        seconds=seconds,
    )


def _findings(small: PlaygroundRun, large: PlaygroundRun, target: float) -> tuple[Finding, ...]:
    common = float(min(small.epochs, large.epochs))
    small_by, large_by = small.best_accuracy_by(common), large.best_accuracy_by(common)
    return (
        Finding(
            claim=f"batch {large.batch} is stuck after {large.epochs} epochs",
            measured=(
                f"batch {large.batch}: best held-out accuracy {large.best_accuracy:.1%} in "
                f"{large.epochs} epochs"
                + (
                    f", {target:.0%} first reached at epoch {large.epochs_to_fit:g}"
                    if large.epochs_to_fit is not None
                    else f", never {target:.0%}"
                )
            ),
            holds=large.epochs_to_fit is None,
        ),
        Finding(
            claim=f"batch {small.batch} fits within {small.epochs} epochs",
            measured=(
                f"batch {small.batch}: best held-out accuracy {small.best_accuracy:.1%}"
                + (
                    f", {target:.0%} first reached at epoch {small.epochs_to_fit:g}"
                    if small.epochs_to_fit is not None
                    else f", {target:.0%} not reached in {small.epochs} epochs"
                )
            ),
            holds=small.epochs_to_fit is not None,
        ),
        Finding(
            claim=f"batch {small.batch} gets further than batch {large.batch} in the same epochs",
            measured=(
                f"best held-out accuracy within {common:g} epochs: batch {small.batch} "
                f"{small_by:.1%}, batch {large.batch} {large_by:.1%}"
            ),
            holds=small_by > large_by,
        ),
        Finding(
            claim=f"batch {small.batch}'s loss curve wobbles more",
            measured=(
                f"held-out loss climbs back {small.loss_rise_per_epoch:.4f} per epoch at batch "
                f"{small.batch}, {large.loss_rise_per_epoch:.4f} at batch {large.batch}"
            ),
            holds=small.loss_rise_per_epoch > large.loss_rise_per_epoch,
        ),
    )


__all__ = ["CLAIM", "PlaygroundResult", "PlaygroundRun", "run_playground"]
