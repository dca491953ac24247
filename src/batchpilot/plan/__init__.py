"""From measurements to a plan: the batch split, the lr for a batch, goodput, the recommendation.

Pure functions over plain numbers; one home per rule:

- ``_scaling``: the lr scaling rules (linear, square root, Adam-family) and epoch arithmetic;
- ``_accumulation``: micro-batch × accumulation × devices for a global batch, at the best speed;
- ``_goodput``: statistical efficiency × throughput, and the batch that maximises it;
- ``_recommend``: everything combined into one recommendation with its reasons and warnings.
"""

from __future__ import annotations

from batchpilot.plan._accumulation import (
    AccumulationPlan,
    plan_accumulation,
)
from batchpilot.plan._goodput import (
    MAX_STEPS_RATIO,
    TIE_SIGMAS,
    GoodputPlan,
    GoodputPoint,
    StepsCriticalBatch,
    critical_batch_from_steps,
    plan_goodput,
    predicted_steps,
    samples_to_target_ratio,
    statistical_efficiency,
    steps_to_target_ratio,
)
from batchpilot.plan._lr_rule import (
    GOYAL_WARMUP_EPOCHS,
    RULES,
    WARMUP_MAX_FRACTION,
    AdamScaling,
    BatchLr,
    Rule,
    RuleChoice,
    Warmup,
    adam_kappa_limit,
    check_rule,
    default_warmup_epochs,
    is_adam_family,
    lr_for_batch,
    noise_aware_lr,
    scale_adam,
    scale_beta,
    scale_lr,
    warmup_from_evidence,
)
from batchpilot.plan._recommend import (
    Advice,
    Recommendation,
    advise,
    recommend,
    with_checked_lr,
    with_measured_critical_batch,
    without_rescaled_betas,
)
from batchpilot.plan._scaling import (
    ScalePlan,
    plan_scaling,
    steps_per_epoch,
    warmup_steps,
)
from batchpilot.plan._split import (
    SPEED_TIE,
    BatchSplit,
    SupportsThroughput,
    divisors,
    split_batch,
)

__all__ = [
    "GOYAL_WARMUP_EPOCHS",
    "MAX_STEPS_RATIO",
    "RULES",
    "SPEED_TIE",
    "TIE_SIGMAS",
    "WARMUP_MAX_FRACTION",
    "AccumulationPlan",
    "AdamScaling",
    "Advice",
    "BatchLr",
    "BatchSplit",
    "GoodputPlan",
    "GoodputPoint",
    "Recommendation",
    "Rule",
    "RuleChoice",
    "ScalePlan",
    "StepsCriticalBatch",
    "SupportsThroughput",
    "Warmup",
    "adam_kappa_limit",
    "advise",
    "check_rule",
    "critical_batch_from_steps",
    "default_warmup_epochs",
    "divisors",
    "is_adam_family",
    "lr_for_batch",
    "noise_aware_lr",
    "plan_accumulation",
    "plan_goodput",
    "plan_scaling",
    "predicted_steps",
    "recommend",
    "samples_to_target_ratio",
    "scale_adam",
    "scale_beta",
    "scale_lr",
    "split_batch",
    "statistical_efficiency",
    "steps_per_epoch",
    "steps_to_target_ratio",
    "warmup_from_evidence",
    "warmup_steps",
    "with_checked_lr",
    "with_measured_critical_batch",
    "without_rescaled_betas",
]
