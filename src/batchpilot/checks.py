"""Argument checks and the vocabulary they check against, in one place.

Every public function validates what enters it here, so that a bad value gives one line naming
the argument and the value (``BadInputError``, exit code 2 on the command line).

>>> check_positive_int("micro_batch", 32)
32
>>> check_reduction("sum")
'sum'
>>> check_positive_float("lr", -1.0)
Traceback (most recent call last):
...
batchpilot.errors.BadInputError: lr: expected a positive number, got -1.0
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from batchpilot.errors import BadInputError

Reduction = Literal["mean", "sum"]

# Every step of a run keeps a number or two (a loss, a norm): a run longer than this would not fit
# in memory, nor finish; a longer --steps or --epochs is a typo, refused before it starts.
MAX_RUN_STEPS = 100_000_000
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

# Mixed precision, in Lightning's names (what each means: batchpilot.precision).
Precision = Literal["32", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_positive_int(name: str, value: int) -> int:
    """Return ``value`` if it is a positive integer, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInputError(f"{name}: expected a positive integer, got {value!r}")
    return value


def check_positive_float(name: str, value: float) -> float:
    """Return ``value`` as a float if it is positive and finite, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInputError(f"{name}: expected a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def check_run_steps(name: str, steps: int) -> int:
    """Return ``steps`` if it is a positive integer no larger than :data:`MAX_RUN_STEPS`."""
    check_positive_int(name, steps)
    if steps > MAX_RUN_STEPS:
        raise BadInputError(
            f"{name}: expected at most {MAX_RUN_STEPS:,} optimizer steps, got {steps}"
        )
    return steps


def check_fraction(name: str, value: float, *, closed: bool = False) -> float:
    """Return ``value`` if it lies in [0, 1) (or [0, 1] with ``closed``), else raise."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        return float(value)
    interval = "[0, 1]" if closed else "[0, 1)"
    raise BadInputError(f"{name}: expected a fraction in {interval}, got {value!r}")


def check_trainable(model: Any) -> None:
    """Refuse a model (a ``torch.nn.Module``) none of whose parameters would be trained."""
    params = list(model.parameters())
    if not params:
        raise BadInputError("Task.model(): the model has no parameters to train")
    if not any(p.requires_grad for p in params):
        raise BadInputError(
            f"Task.model(): all {sum(p.numel() for p in params)} parameters are frozen "
            "(requires_grad=False): there is nothing to train"
        )


def check_reduction(reduction: str) -> Reduction:
    """The loss reduction, ``"mean"`` or ``"sum"``."""
    if reduction not in REDUCTIONS:
        raise BadInputError(
            f"reduction: unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}"
        )
    return reduction  # type: ignore[return-value]


def check_precision(precision: object, name: str = "precision") -> Precision:
    """``precision`` if it is one of :data:`PRECISIONS`, else one line naming ``name``.

    >>> check_precision("bf16-mixed")
    'bf16-mixed'
    >>> check_precision("fp8", "--precision")
    Traceback (most recent call last):
    ...
    batchpilot.errors.BadInputError: --precision: expected one of 32, bf16-mixed, 16-mixed, got 'fp8'
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise BadInputError(f"{name}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


__all__ = [
    "MAX_RUN_STEPS",
    "REDUCTIONS",
    "Reduction",
    "check_fraction",
    "check_positive_float",
    "check_positive_int",
    "check_reduction",
    "check_run_steps",
    "check_trainable",
]
