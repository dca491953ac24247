"""batchpilot: measure which batch size and learning rate to train with, on your own model.

The public API, re-exported here; see the README and ``docs/`` for each piece.
"""

from batchpilot.errors import BadInputError, BatchpilotError, UserCodeError
from batchpilot.loading import load_task
from batchpilot.plan._lr_rule import AdamScaling, scale_adam, scale_lr
from batchpilot.plan._scaling import ScalePlan, plan_scaling, steps_per_epoch, warmup_steps
from batchpilot.plan._split import BatchSplit, split_batch
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
    "evaluate",
    "load_task",
    "plan_scaling",
    "preserved",
    "preserved_rng",
    "scale_adam",
    "scale_lr",
    "split_batch",
    "steps_per_epoch",
    "summarize_task",
    "train",
    "warmup_steps",
]
