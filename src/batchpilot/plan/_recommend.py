"""From measurements to one recommendation: batch split, learning rate, warm-up, and why.

Pure functions over plain numbers, so the rules can be read and tested on their own:

- the global batch comes from goodput (throughput × statistical efficiency) when the noise scale is
  known, else the throughput knee, always within what memory and the dataset allow;
- the learning rate for that batch is the range test's lr at the reference batch, moved by the
  shared rule :func:`batchpilot.plan.lr_for_batch`: McCandlish et al.'s ε_opt(B) = ε_max /
  (1 + B_noise/B) for SGD-family optimizers, Malladi et al.'s square-root rule for Adam-family
  ones (falling back to lr·√κ with the betas unchanged beyond the κ the betas allow);
- warm-up only when the evidence calls for it (:func:`batchpilot.plan.warmup_from_evidence`), sized
  against the steps predicted to the target;
- :func:`with_checked_lr` replaces the rule's lr by the one short runs at the batch chose;
- warnings follow practitioners' guides and the literature (see :func:`advise`).

>>> rec = recommend(train_size=100000, max_micro_batch=4096, reference_batch=32,
...     reference_lr=1e-3, optimizer_name="Adam", throughput=[(32, 1e3), (512, 1.6e4),
...     (4096, 1.28e5)], noise_scale=1e6)
>>> rec.global_batch, rec.lr_rule, rec.betas
(65536, 'sqrt', None)
>>> rec.warnings[-1].code  # B_noise = 1e6: the 100000-sample dataset caps the batch
'steps-cap'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from batchpilot.checks import check_positive_int, check_reduction
from batchpilot.plan._goodput import (
    GoodputPlan,
    StepsCriticalBatch,
    Throughput,
    plan_goodput,
    predicted_steps,
)
from batchpilot.plan._lr_rule import is_adam_family, lr_for_batch, warmup_from_evidence
from batchpilot.plan._scaling import steps_per_epoch
from batchpilot.plan._split import BatchSplit

Bound = Literal["memory", "throughput knee", "noise scale", "dataset size"]

__all__ = [
    "Advice",
    "Recommendation",
    "advise",
    "recommend",
    "with_checked_lr",
    "without_rescaled_betas",
]

# Below this many samples per device, BatchNorm statistics get noisy (Wu & He 2018, GroupNorm).
BATCHNORM_MIN_PER_DEVICE = 16
# Fewer optimizer steps per epoch than this and "epochs" stop being a useful unit of progress.
MIN_STEPS_PER_EPOCH = 10
# A noise scale measured at an lr this many times off the range test's is not trustworthy.
LR_MISMATCH_FACTOR = 3.0


@dataclass(frozen=True)
class Advice:
    """A warning with the reason for it and what to do."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Recommendation:
    micro_batch: int
    accumulation_steps: int
    world_size: int
    global_batch: int
    per_device_batch: int
    lr: float
    lr_rule: str
    reference_batch: int
    reference_lr: float
    betas: tuple[float, float] | None
    eps: float | None
    warmup_steps: int
    warmup_epochs: float
    steps_per_epoch: int
    expected_samples_per_second: float
    steps_to_target_ratio: float | None
    noise_scale: float | None
    bound_by: Bound
    reasons: tuple[str, ...]
    warnings: tuple[Advice, ...]
    goodput: GoodputPlan | None = None
    rule_lr: float | None = None
    lr_source: Literal["rule", "checked"] = "rule"
    warmup_reason: str = ""
    predicted_steps: float | None = None
    noise_interval: tuple[float, float] | None = None
    # what ``noise_scale`` is: the gradient noise scale's estimate of the critical batch, or the
    # critical batch measured through steps to one loss at two batches (StepsCriticalBatch)
    critical_batch_source: Literal["noise scale", "steps at two batches"] = "noise scale"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["betas"] = list(self.betas) if self.betas is not None else None
        data["noise_interval"] = None if self.noise_interval is None else list(self.noise_interval)
        data["reasons"] = list(self.reasons)
        data["warnings"] = [w.to_dict() for w in self.warnings]
        data["goodput"] = None if self.goodput is None else self.goodput.to_dict()
        return data


def recommend(
    *,
    train_size: int,
    max_micro_batch: int,
    reference_batch: int,
    reference_lr: float,
    optimizer_name: str,
    throughput: Throughput,
    reduction: str = "mean",
    world_size: int = 1,
    noise_scale: float | None = None,
    knee_batch: int | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    has_batchnorm: bool = False,
    noise_lr: float | None = None,
    max_global_batch: int | None = None,
    noise_interval: tuple[float, float] | None = None,
    window_steps: int | None = None,
    stable_lr: float | None = None,
) -> Recommendation:
    """Combine the phases' measurements into one recommendation with its reasons and warnings.

    ``throughput`` is one device's samples/s per micro-batch (pairs or a curve object, see
    :func:`batchpilot.plan._goodput.plan_goodput`); the global batch maximises goodput over powers of two
    up to the dataset size (or ``max_global_batch``). ``window_steps``: the steps the noise-scale
    run took at ``reference_batch`` to the loss it ended at; with ``noise_scale`` as that run's
    critical batch they predict the steps at the chosen batch, which size the warm-up.
    ``stable_lr``: where the range test's loss broke down (no warm-up below it).
    """
    check_positive_int("train_size", train_size)
    check_positive_int("max_micro_batch", max_micro_batch)
    check_positive_int("world_size", world_size)
    reasons: list[str] = []
    largest = min(max_global_batch or train_size, train_size)
    plan = plan_goodput(
        throughput,
        noise_scale=noise_scale if noise_scale is not None else math.inf,
        base_batch=reference_batch,
        max_batch=max(largest, world_size),
        max_micro_batch=max_micro_batch,
        world_size=world_size,
    )
    chosen = plan.recommended
    global_batch = chosen.global_batch
    per_device = global_batch // world_size
    split = BatchSplit(chosen.micro_batch, chosen.accumulation_steps, world_size)

    bound: Bound
    if global_batch * 2 > largest:
        bound = "dataset size"
        reasons.append(
            f"The dataset has {train_size} samples: a batch of {global_batch * 2} would leave "
            "less than one step per epoch."
        )
    elif split.accumulation_steps > 1 or per_device >= max_micro_batch:
        bound = "memory"
        reasons.append(
            f"Memory holds at most {max_micro_batch} samples per micro-batch; a larger batch needs "
            f"accumulation, which buys no speed."
        )
    elif noise_scale is not None and knee_batch is not None and per_device < knee_batch:
        bound = "noise scale"
        reasons.append(
            f"The gradient noise scale is {noise_scale:.0f}: beyond a global batch of {global_batch} "
            "the steps saved no longer pay for the extra samples (goodput falls), although the "
            f"device would run faster up to micro-batch {knee_batch}."
        )
    else:
        bound = "throughput knee" if knee_batch is not None else "noise scale"
        if knee_batch is not None:
            reasons.append(
                f"Samples/s reach 90% of their best at micro-batch {knee_batch}: past the knee, "
                "doubling the batch buys little speed."
            )
    if noise_scale is not None:
        reasons.append(
            f"Goodput = throughput × statistical efficiency E(B) = (B_noise + B0)/(B_noise + B) with "
            f"B_noise = {noise_scale:.1f}, B0 = {reference_batch} (Pollux, OSDI'21): {plan.rule}"
        )
    else:
        reasons.append("No noise scale measured: the batch with the highest samples/s was taken.")

    scaled = lr_for_batch(
        reference_lr,
        ref_batch=reference_batch,
        batch=global_batch,
        optimizer=optimizer_name,
        reduction=check_reduction(reduction),
        noise_scale=noise_scale,
        betas=betas,
        eps=eps,
    )
    lr, rule = scaled.lr, scaled.rule
    betas_out = scaled.betas if scaled.rule == "adam" else None
    eps_out = scaled.eps if scaled.rule == "adam" else None
    reasons.append(f"lr {reference_lr:.3g} worked at batch {reference_batch}; {scaled.reason}")
    if plan.capped_by_memory:
        advice_extra: tuple[Advice, ...] = (
            Advice(
                "steps-cap",
                f"Even global batch {global_batch}, the largest that memory and the dataset allow, "
                f"needs {chosen.steps_ratio:.1f}× the fewest possible steps to the target "
                f"(B_noise ≈ {noise_scale:.0f}): a larger batch would train in fewer steps.",
            ),
        )
    else:
        advice_extra = ()
    steps_epoch = steps_per_epoch(train_size, global_batch)
    predicted = None
    if window_steps and noise_scale is not None:
        predicted = predicted_steps(
            window_steps,
            from_batch=reference_batch,
            to_batch=global_batch,
            critical_batch=noise_scale,
            dataset_size=train_size,
        )
    warm = warmup_from_evidence(
        lr,
        ref_lr=reference_lr,
        steps_per_epoch=steps_epoch,
        stable_lr=stable_lr,
        predicted_steps=predicted,
        adam_beta2=(betas_out or betas)[1] if is_adam_family(optimizer_name) else None,
    )
    reasons.append(_sentence(warm.reason))
    expected = chosen.samples_per_second
    ratio = 1.0 + noise_scale / global_batch if noise_scale is not None else None
    advice = advise(
        has_batchnorm=has_batchnorm,
        per_device_micro_batch=split.micro_batch,
        reduction=reduction,
        steps_in_epoch=steps_epoch,
        train_size=train_size,
        global_batch=global_batch,
        noise_lr=noise_lr,
        good_lr=reference_lr,
    )
    return Recommendation(
        micro_batch=split.micro_batch,
        accumulation_steps=split.accumulation_steps,
        world_size=world_size,
        global_batch=global_batch,
        per_device_batch=per_device,
        lr=lr,
        lr_rule=rule,
        reference_batch=reference_batch,
        reference_lr=reference_lr,
        betas=betas_out,
        eps=eps_out,
        warmup_steps=warm.steps,
        warmup_epochs=warm.steps / steps_epoch,
        steps_per_epoch=steps_epoch,
        expected_samples_per_second=expected,
        steps_to_target_ratio=ratio,
        noise_scale=noise_scale,
        bound_by=bound,
        reasons=tuple(reasons),
        warnings=advice + advice_extra,
        goodput=plan,
        rule_lr=lr,
        warmup_reason=warm.reason,
        predicted_steps=predicted,
        noise_interval=noise_interval,
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def with_checked_lr(
    recommendation: Recommendation,
    lr: float,
    *,
    reason: str,
    verified_runs: int,
    stable_lr: float | None = None,
) -> Recommendation:
    """``recommendation`` with the lr that short runs at its batch chose (``reason`` says how),
    and the warm-up re-derived for it: none when ``verified_runs`` runs at that lr, constant from
    the first step, trained without diverging."""
    warm = warmup_from_evidence(
        lr,
        ref_lr=recommendation.reference_lr,
        steps_per_epoch=recommendation.steps_per_epoch,
        stable_lr=stable_lr,
        verified_runs=verified_runs,
        predicted_steps=recommendation.predicted_steps,
        adam_beta2=None if recommendation.betas is None else recommendation.betas[1],
    )
    return replace(
        recommendation,
        lr=lr,
        lr_source="checked",
        rule_lr=recommendation.rule_lr if recommendation.rule_lr is not None else recommendation.lr,
        warmup_steps=warm.steps,
        warmup_epochs=warm.steps / recommendation.steps_per_epoch,
        warmup_reason=warm.reason,
        reasons=(
            *(r for r in recommendation.reasons if r != _sentence(recommendation.warmup_reason)),
            f"lr checked at batch {recommendation.global_batch}: {reason}.",
            _sentence(warm.reason),
        ),
    )


def with_measured_critical_batch(
    recommendation: Recommendation, measured: StepsCriticalBatch
) -> Recommendation:
    """``recommendation`` whose critical batch is the one measured through the steps to one
    loss at two batches (the noise run at the reference batch, the lr check at this batch):
    a direct reading of ``S(B) = S_min (1 + B_crit/B)`` where the noise scale is a proxy for it
    (McCandlish et al. 2018 find ``B_simple`` off ``B_crit`` when the Hessian is far from a
    multiple of the identity). The batch and lr stay as checked; the steps at the batch are
    the measured ones."""
    low, high = measured.interval
    return replace(
        recommendation,
        noise_scale=measured.critical_batch,
        noise_interval=(low, high),
        critical_batch_source="steps at two batches",
        steps_to_target_ratio=1.0 + measured.critical_batch / recommendation.global_batch,
        predicted_steps=measured.steps,
        reasons=(
            *recommendation.reasons,
            f"Critical batch measured through the steps to loss {measured.target_loss:.4g}: "
            f"{measured.reference_steps:.4g} at batch {measured.reference_batch}, "
            f"{measured.steps:.4g} at batch {measured.batch} (median over seeds, "
            f"{measured.steps_range[0]:.4g}–{measured.steps_range[1]:.4g}): B_crit ≈ "
            f"{measured.critical_batch:.3g} ({low:.3g}–{high:.3g}), reported in place of the "
            f"noise scale's {_number(recommendation.noise_scale)}, with which the batch above "
            "was chosen (the lr was checked at that batch only).",
        ),
    )


def _number(value: float | None) -> str:
    return "unmeasured" if value is None else f"{value:.3g}"


def without_rescaled_betas(recommendation: Recommendation, reason: str) -> Recommendation:
    """``recommendation`` keeping the optimizer's own betas and eps (a check at the batch found
    that the rescaled ones did not train better; ``reason`` says how)."""
    return replace(
        recommendation,
        betas=None,
        eps=None,
        reasons=(*recommendation.reasons, f"Adam betas checked: {reason}."),
    )


def advise(
    *,
    has_batchnorm: bool,
    per_device_micro_batch: int,
    reduction: str,
    steps_in_epoch: int,
    train_size: int,
    global_batch: int,
    noise_lr: float | None,
    good_lr: float | None,
) -> tuple[Advice, ...]:
    """The warnings practitioners' guides and the literature call for; each fires only on its condition."""
    found: list[Advice] = []
    if has_batchnorm and per_device_micro_batch < BATCHNORM_MIN_PER_DEVICE:
        found.append(
            Advice(
                "batchnorm-small-batch",
                f"BatchNorm sees only {per_device_micro_batch} samples per forward pass (< "
                f"{BATCHNORM_MIN_PER_DEVICE}): its statistics get noisy and accumulation does not help; "
                "use SyncBatchNorm across devices or GroupNorm (Wu & He 2018).",
            )
        )
    if reduction == "sum":
        found.append(
            Advice(
                "sum-reduced-loss",
                "The loss is a sum over the batch: its gradient grows with the batch, so the lr must "
                "not be scaled up with it (it was converted here), and gradient clipping thresholds "
                "change with the batch too.",
            )
        )
    if steps_in_epoch < MIN_STEPS_PER_EPOCH:
        found.append(
            Advice(
                "few-steps-per-epoch",
                f"A global batch of {global_batch} is comparable to the {train_size}-sample dataset: "
                f"only {steps_in_epoch} optimizer steps per epoch, so plan the run in steps, not epochs.",
            )
        )
    if (
        noise_lr is not None
        and good_lr is not None
        and (noise_lr > good_lr * LR_MISMATCH_FACTOR or noise_lr < good_lr / LR_MISMATCH_FACTOR)
    ):
        found.append(
            Advice(
                "noise-scale-lr-mismatch",
                f"The noise scale was measured while training at lr {noise_lr:.3g}, more than "
                f"{LR_MISMATCH_FACTOR:g}× away from the range test's {good_lr:.3g}: the noise scale "
                "depends on where training is, so re-measure it at a good lr.",
            )
        )
    return tuple(found)
