"""Stairs: full-batch gradient descent on 4-input XOR against mini-batch SGD.

The seed's author fit 4-input XOR (all 16 patterns, a sigmoid network) with full-batch gradient
descent and watched the loss fall in stairs: long flat stretches broken by sudden drops, 22,000
iterations to fit. The seed credits stochastic (mini-batch) gradients with escaping such plateaus.
This demo trains the ``xor4`` example twice from the same initialisation with the same lr, at the
full batch (16) and at the task's reference mini-batch (4), for the same number of iterations,
records the loss on all 16 samples along the way, and finds the plateaus in each curve.

A plateau is a stretch of at least ``min_iterations`` over which the best loss so far falls by
less than ``tolerance`` per ``min_iterations / 2``, above the loss that counts as fitted. The best
loss so far is used, not the raw loss, so a noisy mini-batch curve that wanders without getting
lower counts as stalled, as it should.

>>> curve = (0.25,) * 6 + (0.06,) * 6 + (0.001,) * 4
>>> [(p.start_iteration, p.end_iteration) for p in find_plateaus(
...     tuple(range(0, 1600, 100)), curve, min_iterations=300)]
[(0, 400), (700, 1000)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.demos.findings import Finding, demo_dict, first_reaching, verdict
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.training._loop import TrainResult, train

NAME = "xor"
SOURCE = "a practitioners' guide (Zhihu: how to choose the batch size), the 4-input XOR homework"
CLAIM = (
    "Full-batch gradient descent on 4-input XOR descends in stairs: the loss sits on plateaus "
    "and needs about 22,000 iterations to fit; stochastic mini-batch gradients escape such "
    "plateaus instead of stalling on them."
)
FULL_ITERATIONS = 22_000  # the seed's figure
QUICK_ITERATIONS = 4_000
# Plateaus are judged in iterations, not as a share of the run, so quick and full runs agree.
MIN_PLATEAU_ITERATIONS = 500
FIT_LOSS = 0.01  # mean squared error on 0/1 targets: every output within ~0.1 of its target


@dataclass(frozen=True)
class Plateau:
    """A stretch of the curve where the best loss so far barely fell."""

    start_iteration: int
    end_iteration: int
    loss: float

    @property
    def iterations(self) -> int:
        return self.end_iteration - self.start_iteration


@dataclass(frozen=True)
class XorRun:
    """One training run: its full-data loss curve and what was found in it."""

    batch: int
    lr: float
    iterations: int
    epochs: float
    curve_iterations: tuple[int, ...]
    curve_losses: tuple[float, ...]
    plateaus: tuple[Plateau, ...]
    iterations_to_fit: int | None
    final_loss: float
    final_accuracy: float
    seconds: float

    @property
    def plateau_iterations(self) -> int:
        return sum(plateau.iterations for plateau in self.plateaus)

    @property
    def epochs_to_fit(self) -> float | None:
        if self.iterations_to_fit is None:
            return None
        return self.iterations_to_fit * self.batch / 16

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve_iterations"] = list(self.curve_iterations)
        data["curve_losses"] = list(self.curve_losses)
        data["plateaus"] = [{**asdict(p), "iterations": p.iterations} for p in self.plateaus]
        data["plateau_iterations"] = self.plateau_iterations
        data["epochs_to_fit"] = self.epochs_to_fit
        return data


@dataclass(frozen=True)
class XorResult:
    """Full batch against mini-batch on 4-input XOR, and whether the claim held."""

    full_batch: XorRun
    mini_batch: XorRun
    min_plateau_iterations: int
    tolerance: float
    seed: int
    quick: bool
    findings: tuple[Finding, ...]
    name: str = NAME
    source: str = SOURCE
    claim: str = CLAIM
    fit_loss: float = FIT_LOSS

    @property
    def runs(self) -> tuple[XorRun, XorRun]:
        return (self.full_batch, self.mini_batch)

    @property
    def verdict(self) -> str:
        return verdict(self.findings)

    @property
    def seconds(self) -> float:
        return self.full_batch.seconds + self.mini_batch.seconds

    def rows(self) -> list[tuple[str, ...]]:
        """The short table: one row per run."""
        header = ("batch", "lr", "iterations", "plateaus", "on plateaus", "fit at", "final loss")
        body = [
            (
                f"{run.batch}" + (" (full)" if run is self.full_batch else ""),
                f"{run.lr:g}",
                f"{run.iterations}",
                f"{len(run.plateaus)}",
                f"{run.plateau_iterations} it",
                "—"
                if run.iterations_to_fit is None
                else f"{run.iterations_to_fit} it ({run.epochs_to_fit:g} ep)",
                f"{run.final_loss:.4f}",
            )
            for run in self.runs
        ]
        return [header, *body]

    def to_dict(self) -> dict[str, Any]:
        return demo_dict(
            self,
            seconds=self.seconds,
            full_batch=self.full_batch.to_dict(),
            mini_batch=self.mini_batch.to_dict(),
        )


def find_plateaus(
    iterations: tuple[int, ...],
    losses: tuple[float, ...],
    *,
    min_iterations: int,
    tolerance: float = 0.1,
    floor: float = FIT_LOSS,
) -> tuple[Plateau, ...]:
    """Plateaus of a loss curve sampled at ``iterations``.

    A point is flat when the best loss so far falls by less than the fraction ``tolerance``
    across a window of ``min_iterations / 2`` centred on it; a plateau is a run of flat points
    spanning at least ``min_iterations``, and its ``loss`` is the best loss reached on it. Points at
    or below ``floor`` (fitted) never belong to a plateau.
    """
    check_positive_int("min_iterations", min_iterations)
    check_positive_float("tolerance", tolerance)
    if len(iterations) != len(losses):
        raise BadInputError(
            f"losses: expected {len(iterations)} values (one per iteration), got {len(losses)}"
        )
    best: list[float] = []
    for loss in losses:
        value = loss if math.isfinite(loss) else math.inf
        best.append(min(value, best[-1]) if best else value)
    half = min_iterations / 4
    flat: list[bool] = []
    for k, at in enumerate(iterations):
        # At least one neighbour each side, so a drop between two samples is never flat.
        lo = min(_index_at_or_after(iterations, at - half, upper=k), max(k - 1, 0))
        hi = max(_index_at_or_before(iterations, at + half, lower=k), min(k + 1, len(best) - 1))
        fell = best[lo] / best[hi] if best[hi] > 0 else math.inf
        flat.append(best[k] > floor and fell < 1.0 + tolerance)
    plateaus: list[Plateau] = []
    k = 0
    while k < len(flat):
        if not flat[k]:
            k += 1
            continue
        end = k
        while end + 1 < len(flat) and flat[end + 1]:
            end += 1
        if iterations[end] - iterations[k] >= min_iterations:
            plateaus.append(Plateau(iterations[k], iterations[end], best[end]))
        k = end + 1
    return tuple(plateaus)


def _index_at_or_after(points: tuple[int, ...], value: float, *, upper: int) -> int:
    k = upper
    while k > 0 and points[k - 1] >= value:
        k -= 1
    return k


def _index_at_or_before(points: tuple[int, ...], value: float, *, lower: int) -> int:
    k = lower
    while k + 1 < len(points) and points[k + 1] <= value:
        k += 1
    return k


def run_xor(
    *,
    seed: int = 0,
    quick: bool = False,
    iterations: int | None = None,
    lr: float | None = None,
    mini_batch: int | None = None,
    eval_every: int | None = None,
    min_plateau_iterations: int = MIN_PLATEAU_ITERATIONS,
    tolerance: float = 0.1,
    device: torch.device | str = "cpu",
) -> XorResult:
    """Train ``xor4`` at the full batch and at ``mini_batch`` for ``iterations`` each.

    Defaults: 22,000 iterations (4,000 when ``quick``), the task's reference lr (10) and
    mini-batch (4) for both runs, the loss on all 16 samples every ``iterations / 250`` steps,
    plateaus of at least 500 iterations over which the best loss falls by less than 10 %.
    """
    task = load_task(example="xor4")
    iterations = check_positive_int(
        "iterations", iterations or (QUICK_ITERATIONS if quick else FULL_ITERATIONS)
    )
    lr = check_positive_float("lr", lr if lr is not None else task.reference_lr or 10.0)
    mini_batch = check_positive_int("mini_batch", mini_batch or task.reference_batch or 4)
    if mini_batch >= task.train_size:
        raise BadInputError(
            f"mini_batch: expected fewer than {task.train_size} samples, got {mini_batch}"
        )
    eval_every = check_positive_int("eval_every", eval_every or max(1, iterations // 250))

    def one_run(batch: int) -> XorRun:
        result = train(
            task,
            micro_batch=batch,
            lr=lr,
            steps=iterations,
            seed=seed,
            eval_every=eval_every,
            device=device,
        )
        return _xor_run(result, min_iterations=min_plateau_iterations, tolerance=tolerance)

    full, mini = one_run(task.train_size), one_run(mini_batch)
    return XorResult(
        full_batch=full,
        mini_batch=mini,
        min_plateau_iterations=min_plateau_iterations,
        tolerance=tolerance,
        seed=seed,
        quick=quick,
        findings=_findings(full, mini),
    )


def _xor_run(result: TrainResult, *, min_iterations: int, tolerance: float) -> XorRun:
    points = tuple(step for step, _ in result.evaluations)
    losses = tuple(evaluation.loss for _, evaluation in result.evaluations)
    final = result.evaluations[-1][1]
    fit = first_reaching(tuple(float(p) for p in points), losses, FIT_LOSS, above=False)
    return XorRun(
        batch=result.global_batch,
        lr=result.lr,
        iterations=result.steps,
        epochs=result.epochs,
        curve_iterations=points,
        curve_losses=losses,
        plateaus=find_plateaus(points, losses, min_iterations=min_iterations, tolerance=tolerance),
        iterations_to_fit=None if fit is None else int(fit),
        final_loss=final.loss,
        final_accuracy=float(final.metric or 0.0),
        seconds=result.seconds,
    )


def _fit_words(run: XorRun) -> str:
    if run.iterations_to_fit is None:
        return f"not fitted in {run.iterations} iterations (loss {run.final_loss:.3g})"
    return f"fitted at iteration {run.iterations_to_fit} (epoch {run.epochs_to_fit:g})"


def _findings(full: XorRun, mini: XorRun) -> tuple[Finding, ...]:
    stairs = Finding(
        claim="full-batch GD descends in stairs (two or more plateaus)",
        measured=(
            f"batch {full.batch}: {len(full.plateaus)} plateau(s) at loss "
            f"{', '.join(f'{p.loss:.3g}' for p in full.plateaus) or '—'}, "
            f"{full.plateau_iterations} of {full.iterations} iterations on them; "
            + _fit_words(full)
        ),
        holds=len(full.plateaus) >= 2,
    )
    fewer = Finding(
        claim="mini-batch SGD stalls less",
        measured=(
            f"batch {mini.batch}: {len(mini.plateaus)} plateau(s), {mini.plateau_iterations} "
            f"iterations on them against {full.plateau_iterations} at the full batch"
        ),
        holds=mini.plateau_iterations < full.plateau_iterations,
    )
    mini_fit = mini.iterations_to_fit if mini.iterations_to_fit is not None else math.inf
    full_fit = full.iterations_to_fit if full.iterations_to_fit is not None else math.inf
    sooner = Finding(
        claim="mini-batch SGD fits in fewer iterations",
        measured=f"batch {mini.batch}: {_fit_words(mini)}; batch {full.batch}: {_fit_words(full)}",
        holds=mini_fit < full_fit,
    )
    # The seed also counts the cost of a full-batch step: compare samples seen, i.e. epochs.
    mini_epochs = mini.epochs_to_fit if mini.epochs_to_fit is not None else math.inf
    full_epochs = full.epochs_to_fit if full.epochs_to_fit is not None else math.inf
    cheaper = Finding(
        claim="mini-batch SGD fits with fewer samples (epochs)",
        measured=(
            f"epochs to fit: batch {mini.batch} {_epochs_words(mini)}, "
            f"batch {full.batch} {_epochs_words(full)}"
        ),
        holds=mini_epochs < full_epochs,
    )
    return (stairs, fewer, sooner, cheaper)


def _epochs_words(run: XorRun) -> str:
    if run.epochs_to_fit is None:
        return f"not within {run.epochs:g}"
    return f"{run.epochs_to_fit:g}"


__all__ = ["CLAIM", "Plateau", "XorResult", "XorRun", "find_plateaus", "run_xor"]
