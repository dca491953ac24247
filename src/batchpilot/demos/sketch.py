"""The batch as a drawing stroke: six 1-D points fitted at batch 1, 2, 3 and 6, the batch as a drawing stroke.

The seed explains why the batch changes the learned function with six training points (1–6) and two
test points (a, b): full-batch gradient descent pulls every step toward the same shape through all
six points, batch 1 toward a shape through one point, batch 3 toward one through three (1, 2, 3
this step, 1, 5, 6 the next), "like strokes in a sketch"; with the full batch every stroke is the
same, "only thickening the line", and it can fail to draw the wanted shape — one that also passes
the test points nobody trained on.

This demo trains one small tanh network from the same initialisation, same lr and same number of
epochs at each batch size, and measures: how far a batch's gradient points from the full-batch
gradient at the start (mean cosine over every possible batch of that size), the function each
batch size draws, and its error on the six training and two test points.

>>> task = sketch_task()
>>> task.train_size, task.val_size
(6, 2)
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.demos.findings import Finding, demo_dict, verdict
from batchpilot.errors import BadInputError
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import accumulate_gradients, evaluate, micro_batches

NAME = "sketch"
SOURCE = "a practitioners' guide (Zhihu: how to choose the batch size), the six-point sketch"
CLAIM = (
    "With six training points, every full-batch step pulls the function toward the same shape "
    "while batches of 1, 2 or 3 pull toward different shapes step after step, so the batch size "
    "changes the function that training draws; the full batch can fail to draw the wanted shape, "
    "and the randomness of small batches helps the shape pass the test points as well."
)
BATCHES = (1, 2, 3, 6)
TRAIN_X = (-2.5, -1.6, -0.5, 0.4, 1.5, 2.6)
TEST_X = (-1.1, 2.0)  # the seed's a and b: between training points, never trained on
LR = 0.1
EPOCHS, QUICK_EPOCHS = 600, 150
GRID = tuple(-3.0 + 6.0 * i / 120 for i in range(121))


def _target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(1.3 * x) + 0.3 * x


def sketch_task() -> Task:
    """The six training points (with a fixed small jitter) and the two test points."""
    jitter = torch.tensor([0.15, -0.1, 0.05, -0.15, 0.1, -0.05])
    x_train = torch.tensor(TRAIN_X).unsqueeze(1)
    x_test = torch.tensor(TEST_X).unsqueeze(1)
    return Task(
        name="sketch",
        model=lambda: nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)),
        train_data=TensorDataset(x_train, _target(x_train) + jitter.unsqueeze(1)),
        val_data=TensorDataset(x_test, _target(x_test)),
        loss=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
    )


@dataclass(frozen=True)
class SketchRun:
    """The function one batch size drew, and how its strokes pointed."""

    batch: int
    steps: int
    mean_cosine_to_full: float
    min_cosine_to_full: float
    distinct_batches: int
    train_loss: float
    test_loss: float
    curve: tuple[float, ...]
    max_gap_to_full: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve"] = list(self.curve)
        return data


@dataclass(frozen=True)
class SketchResult:
    """The four batch sizes on the six points, and whether the sketch held."""

    runs: tuple[SketchRun, ...]
    train_x: tuple[float, ...]
    train_y: tuple[float, ...]
    test_x: tuple[float, ...]
    test_y: tuple[float, ...]
    grid: tuple[float, ...]
    lr: float
    epochs: int
    seed: int
    quick: bool
    findings: tuple[Finding, ...]
    seconds: float
    name: str = NAME
    source: str = SOURCE
    claim: str = CLAIM

    @property
    def verdict(self) -> str:
        return verdict(self.findings)

    def rows(self) -> list[tuple[str, ...]]:
        """The short table: one row per batch size."""
        header = (
            "batch",
            "steps",
            "cos(batch grad, full grad)",
            "train MSE",
            "test MSE (a, b)",
            "max |f − f_full|",
        )
        body = [
            (
                str(run.batch),
                str(run.steps),
                f"{run.mean_cosine_to_full:.3f} (min {run.min_cosine_to_full:.3f})",
                f"{run.train_loss:.4f}",
                f"{run.test_loss:.4f}",
                f"{run.max_gap_to_full:.3f}",
            )
            for run in self.runs
        ]
        return [header, *body]

    def to_dict(self) -> dict[str, Any]:
        return demo_dict(self, runs=[run.to_dict() for run in self.runs])


def gradient_cosines(task: Task, model: nn.Module, batch: int) -> list[float]:
    """Cosine between the full-batch gradient and the gradient of every batch of ``batch`` samples
    (all combinations), at the model's current parameters; gradients are left cleared."""
    inputs, targets = next(iter(task.loader(task.train_size, shuffle=False)))

    def gradient(index: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        task.compute_loss(model, (inputs[index], targets[index])).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return flat

    full = gradient(list(range(task.train_size)))
    return [
        float(F.cosine_similarity(gradient(list(index)), full, dim=0))
        for index in itertools.combinations(range(task.train_size), batch)
    ]


def run_sketch(
    *,
    seed: int = 0,
    quick: bool = False,
    batches: tuple[int, ...] = BATCHES,
    lr: float = LR,
    epochs: int | None = None,
) -> SketchResult:
    """Fit the six points at each of ``batches`` for the same epochs (600, or 150 when ``quick``)
    from the same initialisation; the last batch size is taken as the full batch."""
    task = sketch_task()
    lr = check_positive_float("lr", lr)
    epochs = check_positive_int("epochs", epochs or (QUICK_EPOCHS if quick else EPOCHS))
    if not batches or any(b <= 0 or task.train_size % b for b in batches):
        raise BadInputError(f"batches: expected divisors of {task.train_size}, got {batches}")
    grid = torch.tensor(GRID).unsqueeze(1)
    raw: list[tuple[int, int, list[float], float, float, tuple[float, ...]]] = []
    began = time.perf_counter()
    with preserved_rng():
        torch.manual_seed(seed)
        initial = task.make_model().state_dict()
        for batch in batches:
            model = task.make_model()
            model.load_state_dict(initial)
            cosines = gradient_cosines(task, model, batch)
            optimizer = task.make_optimizer(model.parameters(), lr)
            source = micro_batches(task, batch, seed=seed)
            steps = epochs * task.train_size // batch
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                accumulate_gradients(task, model, [next(source)], device=torch.device("cpu"))
                optimizer.step()
            train_loss = evaluate(task, model, split="train").loss
            test_loss = evaluate(task, model, split="val").loss
            with torch.no_grad():
                curve = tuple(float(v) for v in model(grid).squeeze(1))
            raw.append((batch, steps, cosines, train_loss, test_loss, curve))
            del model, optimizer
    seconds = time.perf_counter() - began
    full_curve = raw[-1][5]
    inside = [i for i, x in enumerate(GRID) if TRAIN_X[0] <= x <= TRAIN_X[-1]]
    runs = tuple(
        SketchRun(
            batch=batch,
            steps=steps,
            mean_cosine_to_full=sum(cosines) / len(cosines),
            min_cosine_to_full=min(cosines),
            distinct_batches=math.comb(task.train_size, batch),
            train_loss=train_loss,
            test_loss=test_loss,
            curve=curve,
            max_gap_to_full=max(abs(curve[i] - full_curve[i]) for i in inside),
        )
        for batch, steps, cosines, train_loss, test_loss, curve in raw
    )
    train_x, train_y = _columns(task.train_data)
    test_x, test_y = _columns(task.val_data)
    return SketchResult(
        runs=runs,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        grid=GRID,
        lr=lr,
        epochs=epochs,
        seed=seed,
        quick=quick,
        findings=_findings(runs),
        seconds=seconds,
    )


def _columns(data: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, y = data.tensors
    return tuple(float(v) for v in x.reshape(-1)), tuple(float(v) for v in y.reshape(-1))


GAP_THRESHOLD = 0.1  # in units of y, which spans about ±1.8 over the training range


def _findings(runs: tuple[SketchRun, ...]) -> tuple[Finding, ...]:
    full, smaller = runs[-1], runs[:-1]
    cosines = [run.mean_cosine_to_full for run in runs]
    ordered = all(a < b for a, b in itertools.pairwise(cosines)) and abs(cosines[-1] - 1) < 1e-5
    worst_train = max(runs, key=lambda run: run.train_loss)
    best_test = min(runs, key=lambda run: run.test_loss)
    return (
        Finding(
            claim="full-batch strokes all point the same way; smaller batches point elsewhere",
            measured="mean cosine to the full-batch gradient at the start: "
            + ", ".join(f"batch {run.batch} {run.mean_cosine_to_full:.3f}" for run in runs),
            holds=ordered,
        ),
        Finding(
            claim="the batch size changes the function drawn",
            measured="largest gap to the full-batch function between the training points: "
            + ", ".join(f"batch {run.batch} {run.max_gap_to_full:.3f}" for run in smaller)
            + f" (counted as different above {GAP_THRESHOLD})",
            holds=all(run.max_gap_to_full > GAP_THRESHOLD for run in smaller),
        ),
        Finding(
            claim="the full batch draws the six points worst (same epochs)",
            measured="training MSE: "
            + ", ".join(f"batch {run.batch} {run.train_loss:.4f}" for run in runs),
            holds=worst_train is full,
        ),
        Finding(
            # The seed: SGD's randomness also helps on test data; a and b are that test here.
            claim="a smaller batch passes closer to the test points a, b",
            measured="test MSE at a, b: "
            + ", ".join(f"batch {run.batch} {run.test_loss:.4f}" for run in runs)
            + f" (best: batch {best_test.batch})",
            holds=best_test is not full,
        ),
    )


__all__ = ["CLAIM", "SketchResult", "SketchRun", "gradient_cosines", "run_sketch", "sketch_task"]
