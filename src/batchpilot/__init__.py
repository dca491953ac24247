"""batchpilot: measure which batch size and learning rate to train with, on your own model.

The public API, re-exported here; see the README and ``docs/`` for each piece. Names are imported
on first use, so ``import batchpilot`` (and the command line's ``--help``, ``scale`` and
``examples``) does not import torch.

>>> import batchpilot
>>> batchpilot.split_batch(1024, max_micro_batch=48).accumulation_steps
32
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    "BadInputError": "batchpilot.errors",
    "BatchpilotError": "batchpilot.errors",
    "UserCodeError": "batchpilot.errors",
    "load_task": "batchpilot.loading",
    "Task": "batchpilot.task",
    "preserved": "batchpilot.state",
    "preserved_rng": "batchpilot.state",
    "TaskSummary": "batchpilot.summary",
    "summarize_task": "batchpilot.summary",
    "AdamScaling": "batchpilot.plan._lr_rule",
    "BatchLr": "batchpilot.plan._lr_rule",
    "lr_for_batch": "batchpilot.plan._lr_rule",
    "scale_adam": "batchpilot.plan._lr_rule",
    "scale_lr": "batchpilot.plan._lr_rule",
    "ScalePlan": "batchpilot.plan._scaling",
    "plan_scaling": "batchpilot.plan._scaling",
    "steps_per_epoch": "batchpilot.plan._scaling",
    "warmup_steps": "batchpilot.plan._scaling",
    "BatchSplit": "batchpilot.plan._split",
    "split_batch": "batchpilot.plan._split",
    "plan_goodput": "batchpilot.plan._goodput",
    "recommend": "batchpilot.plan._recommend",
    "find_max_batch": "batchpilot.measure._memory_search",
    "measure_throughput": "batchpilot.measure._throughput",
    "find_lr": "batchpilot.measure._lr_range",
    "measure_noise_scale": "batchpilot.measure._noise",
    "Evaluation": "batchpilot.training._loop",
    "TrainResult": "batchpilot.training._loop",
    "evaluate": "batchpilot.training._loop",
    "train": "batchpilot.training._loop",
    "TuneOptions": "batchpilot.tune",
    "TuneResult": "batchpilot.tune",
    "tune": "batchpilot.tune",
}

if TYPE_CHECKING:
    from batchpilot.errors import BadInputError, BatchpilotError, UserCodeError
    from batchpilot.loading import load_task
    from batchpilot.measure._lr_range import find_lr
    from batchpilot.measure._memory_search import find_max_batch
    from batchpilot.measure._noise import measure_noise_scale
    from batchpilot.measure._throughput import measure_throughput
    from batchpilot.plan._goodput import plan_goodput
    from batchpilot.plan._lr_rule import AdamScaling, BatchLr, lr_for_batch, scale_adam, scale_lr
    from batchpilot.plan._recommend import recommend
    from batchpilot.plan._scaling import ScalePlan, plan_scaling, steps_per_epoch, warmup_steps
    from batchpilot.plan._split import BatchSplit, split_batch
    from batchpilot.state import preserved, preserved_rng
    from batchpilot.summary import TaskSummary, summarize_task
    from batchpilot.task import Task
    from batchpilot.training._loop import Evaluation, TrainResult, evaluate, train
    from batchpilot.tune import TuneOptions, TuneResult, tune


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'batchpilot' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AdamScaling",
    "BadInputError",
    "BatchLr",
    "BatchSplit",
    "BatchpilotError",
    "Evaluation",
    "ScalePlan",
    "Task",
    "TaskSummary",
    "TrainResult",
    "TuneOptions",
    "TuneResult",
    "UserCodeError",
    "__version__",
    "evaluate",
    "find_lr",
    "find_max_batch",
    "load_task",
    "lr_for_batch",
    "measure_noise_scale",
    "measure_throughput",
    "plan_goodput",
    "plan_scaling",
    "preserved",
    "preserved_rng",
    "recommend",
    "scale_adam",
    "scale_lr",
    "split_batch",
    "steps_per_epoch",
    "summarize_task",
    "train",
    "tune",
    "warmup_steps",
]
