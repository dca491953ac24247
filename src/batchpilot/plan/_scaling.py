"""The batch-size calculator: a working (batch, lr) carried to a new global batch, explained.

:func:`plan_scaling` puts the shared rules together — the lr for a batch
(:mod:`batchpilot.plan._lr_rule`), the micro-batch × accumulation × world-size split
(:mod:`batchpilot.plan._split`) — with the epoch / iteration arithmetic, one sentence per number.

>>> steps_per_epoch(1000, 10)
100
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from batchpilot.checks import (
    Reduction,
    check_positive_float,
    check_positive_int,
    check_reduction,
)
from batchpilot.errors import BadInputError
from batchpilot.plan._lr_rule import (
    Rule,
    check_rule,
    default_warmup_epochs,
    lr_for_batch,
)
from batchpilot.plan._split import BatchSplit, split_batch

_RULE_FORMULAS = {
    "linear": "lr = lr_ref · κ (Goyal et al. 2017, arXiv 1706.02677)",
    "sqrt": "lr = lr_ref · √κ (Krizhevsky 2014, arXiv 1404.5997; Hoffer et al. 2017)",
    "adam": (
        "lr = lr_ref · √κ, β → 1 − κ(1 − β), eps → eps / √κ (Malladi et al. 2022, arXiv 2205.10287)"
    ),
    "none": "lr = lr_ref (the learning rate is kept as it is)",
}


def steps_per_epoch(dataset_size: int, global_batch: int, *, drop_last: bool = False) -> int:
    """Optimizer steps in one pass over ``dataset_size`` samples.

    >>> steps_per_epoch(1000, 300), steps_per_epoch(1000, 300, drop_last=True)
    (4, 3)
    """
    check_positive_int("dataset_size", dataset_size)
    check_positive_int("global_batch", global_batch)
    if drop_last:
        return dataset_size // global_batch
    return -(-dataset_size // global_batch)


def warmup_steps(warmup_epochs: float, steps_in_epoch: int) -> int:
    """Warm-up length in optimizer steps for ``warmup_epochs`` epochs (rounded to nearest)."""
    if not math.isfinite(warmup_epochs) or warmup_epochs < 0:
        raise BadInputError(f"warmup_epochs: expected a number ≥ 0, got {warmup_epochs!r}")
    return round(warmup_epochs * steps_in_epoch)


@dataclass(frozen=True)
class ScalePlan:
    """Everything :func:`plan_scaling` worked out, with one explanation sentence per line."""

    rule: Rule
    reduction: Reduction
    ref_batch: int
    ref_lr: float
    global_batch: int
    micro_batch: int
    accumulation_steps: int
    world_size: int
    kappa: float
    lr: float
    betas: tuple[float, float] | None
    eps: float | None
    samples_per_step: int
    dataset_size: int | None
    epochs: float | None
    drop_last: bool
    steps_per_epoch: int | None
    steps_per_epoch_with_drop_last: int | None
    steps_per_epoch_without_drop_last: int | None
    total_steps: int | None
    warmup_epochs: float
    warmup_steps: int | None
    explanation: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas) if self.betas is not None else None
        data["explanation"] = list(self.explanation)
        return data


def plan_scaling(
    *,
    ref_batch: int,
    ref_lr: float,
    batch: int | None = None,
    micro_batch: int | None = None,
    accumulation_steps: int | None = None,
    world_size: int = 1,
    max_micro_batch: int | None = None,
    exact: bool = True,
    rule: Rule = "linear",
    reduction: Reduction = "mean",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    dataset_size: int | None = None,
    epochs: float | None = None,
    warmup_epochs: float | None = None,
    drop_last: bool = False,
) -> ScalePlan:
    """Scale a working (batch, lr) to a new setting and explain the arithmetic.

    The new global batch is ``batch`` if given, else ``micro_batch × accumulation_steps ×
    world_size``; the lr comes from :func:`~batchpilot.plan.lr_for_batch` (the rule every part of
    batchpilot uses). ``warmup_epochs`` defaults to Goyal et al.'s 5 epochs when the lr grows, and
    to 0 otherwise.

    >>> plan = plan_scaling(ref_batch=256, ref_lr=0.1, batch=8192, micro_batch=256,
    ...                     world_size=8, dataset_size=1_281_167, epochs=90)
    >>> plan.lr, plan.accumulation_steps, plan.steps_per_epoch, plan.warmup_steps
    (3.2, 4, 157, 785)
    """
    check_positive_int("ref_batch", ref_batch)
    ref_lr = check_positive_float("ref_lr", ref_lr)
    check_positive_int("world_size", world_size)
    rule = check_rule(rule)
    reduction = check_reduction(reduction)
    split = _resolve_split(
        batch=batch,
        micro_batch=micro_batch,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        max_micro_batch=max_micro_batch,
        exact=exact,
    )
    global_batch = split.global_batch
    kappa = global_batch / ref_batch
    lines = [_split_sentence(split, batch)]
    scaled = lr_for_batch(
        ref_lr,
        ref_batch=ref_batch,
        batch=global_batch,
        rule=rule,
        reduction=reduction,
        betas=betas,
        eps=eps,
    )
    lr = scaled.lr
    adam_betas = scaled.betas if rule == "adam" and not scaled.fell_back else None
    adam_eps = scaled.eps if adam_betas is not None else None
    lines.append(
        f"κ = global batch / reference batch = {global_batch} / {ref_batch} = {kappa:.4g}."
    )
    lines.append(f"Rule {rule}: {_RULE_FORMULAS[rule]}.")
    if scaled.fell_back:
        lines.append(scaled.reason)
    lines.append(_reduction_sentence(rule, reduction, ref_lr, lr, kappa))
    if adam_betas is not None and adam_eps is not None:
        lines.append(
            f"Adam: beta1 {betas[0]:g} → {adam_betas[0]:.6g}, beta2 {betas[1]:g} → "
            f"{adam_betas[1]:.6g}, eps {eps:g} → {adam_eps:.4g}."
        )

    if warmup_epochs is None:
        warmup_epochs = default_warmup_epochs(lr, ref_lr)
        if warmup_epochs:
            lines.append(
                f"Warm-up defaults to Goyal et al.'s {warmup_epochs:g} epochs, lr rising "
                f"gradually from {ref_lr:g} to {lr:.4g}."
            )
    elif warmup_epochs < 0 or not math.isfinite(warmup_epochs):
        raise BadInputError(f"warmup_epochs: expected a number ≥ 0, got {warmup_epochs!r}")

    spe = spe_drop = spe_keep = total = warm = None
    if dataset_size is not None:
        check_positive_int("dataset_size", dataset_size)
        spe_drop = steps_per_epoch(dataset_size, global_batch, drop_last=True)
        spe_keep = steps_per_epoch(dataset_size, global_batch, drop_last=False)
        spe = spe_drop if drop_last else spe_keep
        lines.append(
            f"{dataset_size} samples / {global_batch} per step = {spe_keep} steps per epoch "
            f"({spe_drop} with drop_last, which skips the last "
            f"{dataset_size - spe_drop * global_batch} samples)."
        )
        if spe_drop == 0:
            lines.append(
                "The global batch is larger than the dataset: with drop_last no step is ever taken."
            )
        warm = warmup_steps(warmup_epochs, spe)
        if epochs is not None:
            epochs = check_positive_float("epochs", epochs)
            total = math.ceil(epochs * spe)
            lines.append(f"{epochs:g} epochs × {spe} steps = {total} optimizer steps in all.")
            if warm > total:
                lines.append(f"Warm-up of {warm} steps capped at the run's {total} steps.")
                warm = total
        if warmup_epochs:
            lines.append(f"Warm-up: {warmup_epochs:g} epochs × {spe} steps = {warm} steps.")
    elif epochs is not None:
        epochs = check_positive_float("epochs", epochs)

    return ScalePlan(
        rule=rule,
        reduction=reduction,
        ref_batch=ref_batch,
        ref_lr=ref_lr,
        global_batch=global_batch,
        micro_batch=split.micro_batch,
        accumulation_steps=split.accumulation_steps,
        world_size=split.world_size,
        kappa=kappa,
        lr=lr,
        betas=adam_betas,
        eps=adam_eps,
        samples_per_step=global_batch,
        dataset_size=dataset_size,
        epochs=epochs,
        drop_last=drop_last,
        steps_per_epoch=spe,
        steps_per_epoch_with_drop_last=spe_drop,
        steps_per_epoch_without_drop_last=spe_keep,
        total_steps=total,
        warmup_epochs=warmup_epochs,
        warmup_steps=warm,
        explanation=tuple(lines),
    )


def _resolve_split(
    *,
    batch: int | None,
    micro_batch: int | None,
    accumulation_steps: int | None,
    world_size: int,
    max_micro_batch: int | None,
    exact: bool,
) -> BatchSplit:
    if micro_batch is not None and max_micro_batch is not None:
        raise BadInputError("max_micro_batch: give either micro_batch or max_micro_batch, not both")
    if batch is None:
        if micro_batch is None:
            raise BadInputError("batch: give the new global batch, or micro_batch (× accumulation)")
        return BatchSplit(
            check_positive_int("micro_batch", micro_batch),
            check_positive_int("accumulation_steps", accumulation_steps or 1),
            world_size,
        )
    check_positive_int("batch", batch)
    if micro_batch is not None:
        split = split_batch(batch, micro_batch=micro_batch, world_size=world_size)
        if accumulation_steps is not None and accumulation_steps != split.accumulation_steps:
            raise BadInputError(
                f"accumulation_steps: {accumulation_steps} does not match batch {batch} = "
                f"{micro_batch} × {split.accumulation_steps} × {world_size}"
            )
        return split
    if accumulation_steps is not None:
        check_positive_int("accumulation_steps", accumulation_steps)
        per_step = accumulation_steps * world_size
        if batch % per_step:
            raise BadInputError(
                f"batch: {batch} is not a multiple of accumulation_steps × world_size = {per_step}"
            )
        return BatchSplit(batch // per_step, accumulation_steps, world_size)
    if max_micro_batch is not None:
        return split_batch(
            batch, max_micro_batch=max_micro_batch, world_size=world_size, exact=exact
        )
    return split_batch(batch, world_size=world_size, exact=exact)


def _split_sentence(split: BatchSplit, asked: int | None) -> str:
    text = (
        f"Global batch {split.global_batch} = micro-batch {split.micro_batch} × "
        f"{split.accumulation_steps} accumulation steps × {split.world_size} devices."
    )
    if asked is not None and asked != split.global_batch:
        text += f" The nearest achievable to the {asked} asked."
    if split.accumulation_steps > 1:
        text += f" Each micro-loss is divided by {split.accumulation_steps} before backward."
    return text


def _reduction_sentence(
    rule: Rule, reduction: Reduction, ref_lr: float, lr: float, kappa: float
) -> str:
    if reduction == "sum" and rule in ("linear", "sqrt"):
        return (
            "The loss is a sum over the batch, so its gradient already grows with the batch: "
            f"the lr changes by {lr / ref_lr:.4g}× instead of "
            f"{kappa if rule == 'linear' else math.sqrt(kappa):.4g}×, giving {lr:.6g}."
        )
    if reduction == "sum" and rule == "adam":
        return f"Adam divides out the gradient's scale, so a summed loss changes only eps: lr {lr:.6g}."
    return f"New lr = {ref_lr:g} × {lr / ref_lr:.4g} = {lr:.6g}."


__all__ = [
    "ScalePlan",
    "plan_scaling",
    "steps_per_epoch",
    "warmup_steps",
]
