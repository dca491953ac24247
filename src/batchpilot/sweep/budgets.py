"""What every trial of a sweep is given (its budget) and what it is judged by (the objectives).

The controlled experiment design of batch-size studies (Shallue et al. 2019): the same model and data for every batch size and a fixed budget,
either in epochs (every trial sees the data the same number of times) or in samples; a target
validation loss (or metric) adds the "how fast does it get there" objectives. Every trial runs to
its budget, which for a target is the cap, so all curves are complete and comparable; the
to-target numbers are read off the validation curve at its first crossing.

>>> budget = Budget.equal_epochs(3, evals=10)
>>> budget.samples_for(train_size=1000), budget.steps_for(256, train_size=1000)
(3000, 12)
>>> first_crossing([1.0, 0.8, 0.4], 0.6, mode="min")
1.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError

Objective = Literal[
    "val_metric", "val_loss", "steps_to_target", "samples_to_target", "seconds_to_target"
]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
TARGET_OBJECTIVES: tuple[str, ...] = ("steps_to_target", "samples_to_target", "seconds_to_target")
Mode = Literal["min", "max"]

# Ten epochs is where practitioners' small examples have long converged on small tasks.
DEFAULT_MAX_EPOCHS = 10.0
# Equal epochs when no budget is given: enough to rank batch sizes on the small examples.
DEFAULT_EPOCHS = 3.0


@dataclass(frozen=True)
class Budget:
    """How much training every trial gets, how often it is validated, and an optional target.

    Exactly one of ``epochs`` and ``samples`` is set; at most one of ``target_loss`` (validation
    loss to reach, lower is better) and ``target_metric`` (validation metric to reach, in the
    task's ``metric_mode``). ``evals`` validation points are spread evenly over the samples.
    """

    epochs: float | None = None
    samples: int | None = None
    target_loss: float | None = None
    target_metric: float | None = None
    evals: int = 20

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.samples is None):
            raise BadInputError("epochs: give exactly one of epochs and samples")
        if self.epochs is not None:
            check_positive_float("budget_epochs", self.epochs)
        if self.samples is not None:
            check_positive_int("budget_samples", self.samples)
        if self.target_loss is not None and self.target_metric is not None:
            raise BadInputError("target_loss: give either a target loss or a target metric")
        for name in ("target_loss", "target_metric"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise BadInputError(f"{name}: expected a number, got {value!r}")
            if value is not None and not math.isfinite(value):
                raise BadInputError(f"{name}: expected a finite number, got {value!r}")
        check_positive_int("evals", self.evals)

    @classmethod
    def of(
        cls,
        *,
        epochs: float | None = None,
        samples: int | None = None,
        target_loss: float | None = None,
        target_metric: float | None = None,
        max_epochs: float | None = None,
        evals: int = 20,
    ) -> Budget:
        """The budget from what was given, with the defaults of ``batchpilot sweep``.

        ``epochs`` or ``samples`` (not both) is the budget; a target without either trains up
        to ``max_epochs`` (default :data:`DEFAULT_MAX_EPOCHS`), which only caps a target; with
        nothing given, :data:`DEFAULT_EPOCHS` equal epochs.

        >>> Budget.of().epochs, Budget.of(target_loss=0.1).epochs, Budget.of(samples=64).kind
        (3.0, 10.0, 'samples')
        """
        if epochs is not None and samples is not None:
            raise BadInputError("budget_epochs: give either an epochs or a samples budget")
        if max_epochs is not None and (epochs is not None or samples is not None):
            raise BadInputError(
                "max_epochs: caps a run towards a target loss or metric; an epochs or samples "
                "budget is its own cap"
            )
        has_target = target_loss is not None or target_metric is not None
        if samples is not None:
            return cls(
                samples=samples, evals=evals, target_loss=target_loss, target_metric=target_metric
            )
        if epochs is None:
            epochs = (max_epochs or DEFAULT_MAX_EPOCHS) if has_target else DEFAULT_EPOCHS
        return cls(epochs=epochs, evals=evals, target_loss=target_loss, target_metric=target_metric)

    @classmethod
    def equal_epochs(
        cls,
        epochs: float,
        *,
        evals: int = 20,
        target_loss: float | None = None,
        target_metric: float | None = None,
    ) -> Budget:
        """Every trial trains ``epochs`` passes over the training set."""
        return cls(epochs=epochs, evals=evals, target_loss=target_loss, target_metric=target_metric)

    @classmethod
    def equal_samples(
        cls,
        samples: int,
        *,
        evals: int = 20,
        target_loss: float | None = None,
        target_metric: float | None = None,
    ) -> Budget:
        """Every trial trains on ``samples`` samples (steps = samples / batch)."""
        return cls(
            samples=samples, evals=evals, target_loss=target_loss, target_metric=target_metric
        )

    @classmethod
    def until_target(
        cls,
        *,
        loss: float | None = None,
        metric: float | None = None,
        max_epochs: float = DEFAULT_MAX_EPOCHS,
        evals: int = 20,
    ) -> Budget:
        """Train towards a target validation loss (or metric), at most ``max_epochs`` epochs."""
        if loss is None and metric is None:
            raise BadInputError("target_loss: give a target loss or a target metric")
        return cls(epochs=max_epochs, evals=evals, target_loss=loss, target_metric=metric)

    @property
    def kind(self) -> Literal["epochs", "samples", "target"]:
        if self.has_target:
            return "target"
        return "epochs" if self.epochs is not None else "samples"

    @property
    def has_target(self) -> bool:
        return self.target_loss is not None or self.target_metric is not None

    def samples_for(self, *, train_size: int) -> int:
        """Samples each trial trains on, for a training set of ``train_size`` samples."""
        if self.samples is not None:
            return self.samples
        assert self.epochs is not None
        return max(1, round(self.epochs * check_positive_int("train_size", train_size)))

    def steps_for(self, global_batch: int, *, train_size: int) -> int:
        """Optimizer steps at ``global_batch`` that cover the budget's samples (rounded up)."""
        check_positive_int("global_batch", global_batch)
        return max(1, -(-self.samples_for(train_size=train_size) // global_batch))

    def eval_every(self, steps: int) -> int:
        """Steps between validation points so that a run of ``steps`` has about ``evals`` of them."""
        return max(1, round(check_positive_int("steps", steps) / self.evals))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        fields = ("epochs", "samples", "target_loss", "target_metric", "evals")
        return cls(**{name: data[name] for name in fields if name in data})


def check_objective(objective: str) -> Objective:
    if objective not in OBJECTIVES:
        raise BadInputError(
            f"objective: unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    return objective  # type: ignore[return-value]


def objective_mode(objective: str, *, metric_mode: Mode) -> Mode:
    """Whether a smaller (``"min"``) or larger (``"max"``) value of ``objective`` is better.

    >>> objective_mode("val_metric", metric_mode="max"), objective_mode("steps_to_target", metric_mode="max")
    ('max', 'min')
    """
    return metric_mode if check_objective(objective) == "val_metric" else "min"


def reached(value: float, target: float, *, mode: Mode) -> bool:
    """Whether ``value`` is at or beyond ``target`` in the better direction of ``mode``."""
    return value <= target if mode == "min" else value >= target


def first_crossing(values: Sequence[float | None], target: float, *, mode: Mode) -> float | None:
    """Fractional index at which ``values`` first reach ``target``, interpolated linearly.

    ``None`` if never reached. The first point has nothing before it, so reaching the target
    there reads as index 0.

    >>> first_crossing([0.5, 1.0], 0.75, mode="max"), first_crossing([0.5, 0.4], 0.1, mode="min")
    (0.5, None)
    """
    previous: float | None = None
    for index, value in enumerate(values):
        if value is None or not math.isfinite(value):
            previous = None
            continue
        if reached(value, target, mode=mode):
            if previous is None or value == previous:
                return float(index)
            fraction = (target - previous) / (value - previous)
            return index - 1 + min(1.0, max(0.0, fraction))
        previous = value
    return None


def interpolate(position: float, xs: Sequence[float]) -> float:
    """``xs`` read at a fractional index (as returned by :func:`first_crossing`).

    >>> interpolate(1.5, [10, 20, 40])
    30.0
    """
    low = math.floor(position)
    if low >= len(xs) - 1:
        return float(xs[-1])
    fraction = position - low
    return float(xs[low] + fraction * (xs[low + 1] - xs[low]))
