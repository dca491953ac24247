"""batchpilot: measure which batch size and learning rate to train with, on your own model.

The public API, re-exported here; see the README and ``docs/`` for each piece.
"""

from batchpilot.errors import BadInputError, BatchpilotError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.plan._scaling import (
    AdamScaling,
    BatchSplit,
    ScalePlan,
    decompose_batch,
    plan_scaling,
    scale_adam,
    scale_lr,
    split_from_micro_batch,
    steps_per_epoch,
    warmup_steps,
)
from batchpilot.state import preserved, preserved_rng
from batchpilot.summary import TaskSummary, summarize_task
from batchpilot.task import Task
from batchpilot.training._loop import Evaluation, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "AdamScaling",
    "BadInputError",
    "BatchSplit",
    "BatchpilotError",
    "Evaluation",
    "ScalePlan",
    "Task",
    "TaskSummary",
    "TrainResult",
    "UserCodeError",
    "__version__",
    "decompose_batch",
    "evaluate",
    "load_task",
    "plan_scaling",
    "preserved",
    "preserved_rng",
    "scale_adam",
    "scale_lr",
    "split_from_micro_batch",
    "steps_per_epoch",
    "summarize_task",
    "train",
    "warmup_steps",
]
