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
    SpeedCurve,
    plan_accumulation,
)
from batchpilot.plan._goodput import (
    GoodputPlan,
    GoodputPoint,
    SupportsThroughput,
    plan_goodput,
    samples_to_target_ratio,
    statistical_efficiency,
    steps_to_target_ratio,
)
from batchpilot.plan._recommend import (
    Advice,
    Recommendation,
    advise,
    is_adam_family,
    noise_aware_lr,
    recommend,
)
from batchpilot.plan._scaling import (
    GOYAL_WARMUP_EPOCHS,
    RULES,
    AdamScaling,
    BatchSplit,
    Rule,
    ScalePlan,
    check_rule,
    decompose_batch,
    plan_scaling,
    scale_adam,
    scale_beta,
    scale_lr,
    split_from_micro_batch,
    steps_per_epoch,
    warmup_steps,
)

__all__ = [
    "GOYAL_WARMUP_EPOCHS",
    "RULES",
    "AccumulationPlan",
    "AdamScaling",
    "Advice",
    "BatchSplit",
    "GoodputPlan",
    "GoodputPoint",
    "Recommendation",
    "Rule",
    "ScalePlan",
    "SpeedCurve",
    "SupportsThroughput",
    "advise",
    "check_rule",
    "decompose_batch",
    "is_adam_family",
    "noise_aware_lr",
    "plan_accumulation",
    "plan_goodput",
    "plan_scaling",
    "recommend",
    "samples_to_target_ratio",
    "scale_adam",
    "scale_beta",
    "scale_lr",
    "split_from_micro_batch",
    "statistical_efficiency",
    "steps_per_epoch",
    "steps_to_target_ratio",
    "warmup_steps",
]
