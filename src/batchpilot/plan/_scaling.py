"""The learning-rate / batch-size arithmetic of the seed articles, as pure functions.

Given a (batch, lr) that worked and a new global batch, these return the new learning rate by a
named rule, the micro-batch × accumulation × world-size decomposition of a global batch, and the
epoch / iteration arithmetic. :func:`plan_scaling` puts them together and explains every number.

>>> scale_lr(0.1, ref_batch=256, batch=8192, rule="linear")
3.2
>>> round(scale_lr(0.1, ref_batch=256, batch=8192, rule="sqrt"), 3)
0.566
>>> decompose_batch(1024, max_micro_batch=48, world_size=4)
BatchSplit(micro_batch=32, accumulation_steps=8, world_size=4)
>>> steps_per_epoch(1000, 10)
100
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from batchpilot.checks import (
    Reduction,
    check_positive_float,
    check_positive_int,
    check_reduction,
)
from batchpilot.errors import BadInputError

Rule = Literal["linear", "sqrt", "adam", "none"]
RULES: tuple[str, ...] = get_args(Rule)

# Goyal et al. 2017 warm up over 5 epochs when they scale the lr linearly.
GOYAL_WARMUP_EPOCHS = 5.0

_RULE_FORMULAS = {
    "linear": "lr = lr_ref · κ (Goyal et al. 2017, arXiv 1706.02677)",
    "sqrt": "lr = lr_ref · √κ (Krizhevsky 2014, arXiv 1404.5997; Hoffer et al. 2017)",
    "adam": (
        "lr = lr_ref · √κ, β → 1 − κ(1 − β), eps → eps / √κ (Malladi et al. 2022, arXiv 2205.10287)"
    ),
    "none": "lr = lr_ref (the learning rate is kept as it is)",
}


def check_rule(rule: str) -> Rule:
    if rule not in RULES:
        raise BadInputError(f"rule: unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    return rule  # type: ignore[return-value]


def _sgd_factor(rule: Rule, kappa: float, reduction: Reduction) -> float:
    """Multiplier on the lr for the SGD-type rules.

    A sum-reduced loss already multiplies the gradient by the batch, so the mean-equivalent lr is
    lr·B: the rule is applied to that and converted back, which leaves lr unchanged under the
    linear rule and divides it by √κ under the square-root rule.
    """
    if rule == "none":
        return 1.0
    factor = kappa if rule == "linear" else math.sqrt(kappa)
    return factor / kappa if reduction == "sum" else factor


def scale_lr(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    rule: Rule = "linear",
    reduction: Reduction = "mean",
) -> float:
    """The learning rate for global batch ``batch`` given one, ``ref_lr``, that worked at ``ref_batch``.

    >>> scale_lr(0.1, ref_batch=256, batch=1024, rule="linear", reduction="sum")
    0.1
    """
    ref_lr = check_positive_float("ref_lr", ref_lr)
    kappa = check_positive_int("batch", batch) / check_positive_int("ref_batch", ref_batch)
    rule = check_rule(rule)
    reduction = check_reduction(reduction)
    if rule == "adam":
        return ref_lr * math.sqrt(kappa)
    return ref_lr * _sgd_factor(rule, kappa, reduction)


@dataclass(frozen=True)
class AdamScaling:
    """Adam-family hyper-parameters rescaled by Malladi et al.'s square-root rule."""

    lr: float
    betas: tuple[float, float]
    eps: float


def scale_beta(name: str, beta: float, kappa: float) -> float:
    """β → 1 − κ(1 − β), refusing a result outside (0, 1) with by how much it misses."""
    if not 0.0 <= beta < 1.0:
        raise BadInputError(f"{name}: expected a value in [0, 1), got {beta!r}")
    if kappa == 1.0:
        return beta
    scaled = 1.0 - kappa * (1.0 - beta)
    if scaled <= 0.0:
        kappa_max = 1.0 / (1.0 - beta)
        raise BadInputError(
            f"{name}: the adam rule would push {name}={beta:g} to {scaled:.4g} (≤ 0) at "
            f"κ={kappa:.4g}, {kappa / kappa_max:.3g}× the κ < 1/(1 − {name}) = {kappa_max:.4g} "
            "that this rule allows"
        )
    if scaled >= 1.0:
        raise BadInputError(
            f"{name}: the adam rule would push {name}={beta:g} to {scaled:.6g} (≥ 1) at κ={kappa:.4g}"
        )
    return scaled


def scale_adam(
    ref_lr: float,
    *,
    ref_batch: int,
    batch: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> AdamScaling:
    """Malladi et al.'s square-root rule for Adam: lr·√κ, β → 1 − κ(1 − β), eps → eps/√κ.

    Adam divides out the gradient's scale except in ``eps``; a sum-reduced loss makes gradients
    B times larger, so eps is carried in sum units (× κ) as well.

    >>> s = scale_adam(1e-3, ref_batch=64, batch=256, betas=(0.9, 0.999), eps=1e-8)
    >>> round(s.lr, 6), round(s.betas[0], 6), round(s.betas[1], 6), s.eps
    (0.002, 0.6, 0.996, 5e-09)
    """
    ref_lr = check_positive_float("ref_lr", ref_lr)
    kappa = check_positive_int("batch", batch) / check_positive_int("ref_batch", ref_batch)
    eps = check_positive_float("eps", eps)
    reduction = check_reduction(reduction)
    beta1 = scale_beta("beta1", betas[0], kappa)
    beta2 = scale_beta("beta2", betas[1], kappa)
    eps_scaled = eps / math.sqrt(kappa) * (kappa if reduction == "sum" else 1.0)
    return AdamScaling(lr=ref_lr * math.sqrt(kappa), betas=(beta1, beta2), eps=eps_scaled)


@dataclass(frozen=True)
class BatchSplit:
    """A global batch as micro-batch × accumulation steps × world size."""

    micro_batch: int
    accumulation_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps * self.world_size


def decompose_batch(
    global_batch: int,
    *,
    max_micro_batch: int,
    world_size: int = 1,
    exact: bool = True,
) -> BatchSplit:
    """Split ``global_batch`` into the largest micro-batch ≤ ``max_micro_batch`` and the fewest
    accumulation steps, over ``world_size`` devices.

    With ``exact`` the product equals ``global_batch`` (which must then be a multiple of the world
    size); without it, the nearest achievable global batch is taken.

    >>> decompose_batch(1000, max_micro_batch=64, exact=False)
    BatchSplit(micro_batch=62, accumulation_steps=16, world_size=1)
    """
    check_positive_int("global_batch", global_batch)
    check_positive_int("max_micro_batch", max_micro_batch)
    check_positive_int("world_size", world_size)
    if global_batch % world_size and exact:
        raise BadInputError(
            f"global_batch: {global_batch} is not a multiple of world_size {world_size} "
            f"(nearest: {global_batch // world_size * world_size} or "
            f"{-(-global_batch // world_size) * world_size})"
        )
    per_device = max(1, round(global_batch / world_size))
    if exact:
        accumulation = -(-per_device // max_micro_batch)
        while per_device % accumulation:
            accumulation += 1
        return BatchSplit(per_device // accumulation, accumulation, world_size)
    accumulation = -(-per_device // max_micro_batch)
    micro = min(max_micro_batch, max(1, round(per_device / accumulation)))
    return BatchSplit(micro, accumulation, world_size)


def split_from_micro_batch(
    global_batch: int, *, micro_batch: int, world_size: int = 1
) -> BatchSplit:
    """The accumulation steps that make ``micro_batch × world_size`` reach ``global_batch`` exactly."""
    check_positive_int("global_batch", global_batch)
    check_positive_int("micro_batch", micro_batch)
    check_positive_int("world_size", world_size)
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise BadInputError(
            f"batch: {global_batch} is not a multiple of micro_batch × world_size = "
            f"{micro_batch} × {world_size} = {per_step}"
        )
    return BatchSplit(micro_batch, global_batch // per_step, world_size)


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
    world_size``. ``warmup_epochs`` defaults to Goyal et al.'s 5 epochs when the linear rule raises
    the lr, and to 0 otherwise.

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
    adam_betas: tuple[float, float] | None = None
    adam_eps: float | None = None
    if rule == "adam":
        adam = scale_adam(
            ref_lr,
            ref_batch=ref_batch,
            batch=global_batch,
            betas=betas,
            eps=eps,
            reduction=reduction,
        )
        lr, adam_betas, adam_eps = adam.lr, adam.betas, adam.eps
    else:
        lr = scale_lr(
            ref_lr, ref_batch=ref_batch, batch=global_batch, rule=rule, reduction=reduction
        )
    lines.append(
        f"κ = global batch / reference batch = {global_batch} / {ref_batch} = {kappa:.4g}."
    )
    lines.append(f"Rule {rule}: {_RULE_FORMULAS[rule]}.")
    lines.append(_reduction_sentence(rule, reduction, ref_lr, lr, kappa))
    if adam_betas is not None and adam_eps is not None:
        lines.append(
            f"Adam: beta1 {betas[0]:g} → {adam_betas[0]:.6g}, beta2 {betas[1]:g} → "
            f"{adam_betas[1]:.6g}, eps {eps:g} → {adam_eps:.4g}."
        )

    if warmup_epochs is None:
        warmup_epochs = GOYAL_WARMUP_EPOCHS if rule == "linear" and lr > ref_lr else 0.0
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
        split = split_from_micro_batch(batch, micro_batch=micro_batch, world_size=world_size)
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
        return decompose_batch(
            batch, max_micro_batch=max_micro_batch, world_size=world_size, exact=exact
        )
    return decompose_batch(batch, max_micro_batch=batch, world_size=world_size, exact=exact)


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
    "GOYAL_WARMUP_EPOCHS",
    "RULES",
    "AdamScaling",
    "BatchSplit",
    "Rule",
    "ScalePlan",
    "check_rule",
    "decompose_batch",
    "plan_scaling",
    "scale_adam",
    "scale_beta",
    "scale_lr",
    "split_from_micro_batch",
    "steps_per_epoch",
    "warmup_steps",
]
