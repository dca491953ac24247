"""The learning rate of every trial: rescaled from a reference, re-found by a range test, or a grid.

Each trial's lr is ``base(batch) × factor``. The base is the reference lr rescaled to the trial's
batch by a rule of :mod:`batchpilot.plan._scaling` (``linear``, ``sqrt``, ``adam``, ``none``) or the
suggestion of the lr range test at that batch (``range-test``); the factors make a small grid
around it (one factor of 1 = no grid). A grid around the square-root rule lets the data decide
between the linear and square-root rules: the sweep fits the exponent of the best lr vs batch.

>>> plan = LrPlan(rule="linear", ref_batch=64, ref_lr=0.05)
>>> plan.base_lr(256)
0.2
>>> LrPlan.grid(factors=(0.5, 1, 2), ref_batch=64, ref_lr=0.05).factors
(0.5, 1.0, 2.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from batchpilot.checks import Reduction, check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.plan._lr_rule import Rule, scale_lr
from batchpilot.task import Task

LrRule = Literal["linear", "sqrt", "adam", "none", "range-test"]
LR_RULES: tuple[str, ...] = get_args(LrRule)
DEFAULT_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class LrPlan:
    """How each trial's lr is chosen.

    Attributes:
        rule: ``linear``, ``sqrt``, ``adam`` (Malladi et al.: lr·√κ, and betas/eps rescaled when
            the optimizer has them), ``none`` (the reference lr everywhere) or ``range-test``.
        factors: multipliers of the base lr, one trial each (a small lr grid).
        ref_batch, ref_lr: the (batch, lr) that worked; default to the task's reference.
        warmup_epochs: linear warm-up from 0 to the trial's lr over this many epochs (Goyal et al.).
    """

    rule: LrRule = "linear"
    factors: tuple[float, ...] = (1.0,)
    ref_batch: int | None = None
    ref_lr: float | None = None
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in LR_RULES:
            raise BadInputError(
                f"lr_rule: unknown rule {self.rule!r}; expected one of {', '.join(LR_RULES)}"
            )
        if not self.factors:
            raise BadInputError("lr_grid: expected at least one factor")
        factors = tuple(check_positive_float("lr_grid", factor) for factor in self.factors)
        if len(set(factors)) != len(factors):
            raise BadInputError(f"lr_grid: repeated factors in {list(factors)}")
        object.__setattr__(self, "factors", factors)
        if self.ref_batch is not None:
            check_positive_int("ref_batch", self.ref_batch)
        if self.ref_lr is not None:
            check_positive_float("ref_lr", self.ref_lr)
        if not self.warmup_epochs >= 0:
            raise BadInputError(f"warmup_epochs: expected a number ≥ 0, got {self.warmup_epochs!r}")

    @classmethod
    def grid(
        cls,
        factors: tuple[float, ...] = DEFAULT_GRID,
        *,
        center: LrRule = "sqrt",
        ref_batch: int | None = None,
        ref_lr: float | None = None,
        warmup_epochs: float = 0.0,
    ) -> LrPlan:
        """A grid of ``factors`` around the ``center`` rule (square root by default: halfway, in
        log terms, between keeping the lr and scaling it linearly)."""
        return cls(
            rule=center,
            factors=tuple(float(f) for f in factors),
            ref_batch=ref_batch,
            ref_lr=ref_lr,
            warmup_epochs=warmup_epochs,
        )

    @property
    def needs_reference(self) -> bool:
        return self.rule != "range-test"

    def with_reference(self, task: Task) -> LrPlan:
        """This plan with the reference taken from ``task`` where not given; checked complete."""
        plan = replace(
            self,
            ref_batch=self.ref_batch if self.ref_batch is not None else task.reference_batch,
            ref_lr=self.ref_lr if self.ref_lr is not None else task.reference_lr,
        )
        if plan.needs_reference and (plan.ref_batch is None or plan.ref_lr is None):
            missing = "ref_batch" if plan.ref_batch is None else "ref_lr"
            raise BadInputError(
                f"{missing}: the {plan.rule} rule rescales a reference (batch, lr) and the task "
                "has none; give ref_batch and ref_lr, or use the range-test rule"
            )
        return plan

    def base_lr(self, batch: int, *, reduction: Reduction = "mean") -> float:
        """The reference lr rescaled to ``batch`` by the rule (not for ``range-test``)."""
        if self.rule == "range-test":
            raise BadInputError("lr_rule: the range-test lr is measured per trial, not computed")
        if self.ref_batch is None or self.ref_lr is None:
            raise BadInputError("ref_lr: this plan has no reference; call with_reference(task)")
        rule: Rule = self.rule
        return scale_lr(
            self.ref_lr, ref_batch=self.ref_batch, batch=batch, rule=rule, reduction=reduction
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["factors"] = list(self.factors)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LrPlan:
        return cls(
            rule=data["rule"],
            factors=tuple(data["factors"]),
            ref_batch=data.get("ref_batch"),
            ref_lr=data.get("ref_lr"),
            warmup_epochs=data.get("warmup_epochs", 0.0),
        )
