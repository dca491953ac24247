"""Hugging Face: ``tune(trainer)`` as ``TrainingArguments`` fields; a callback for noise and lr.

One line for a recommendation (see :mod:`batchpilot.integrations._huggingface_tune`)::

    from batchpilot.integrations.huggingface import tune

    rec = tune(trainer, time_budget_seconds=30)
    args = dataclasses.replace(trainer.args, **rec.training_arguments())

The callback::

    from batchpilot.integrations.huggingface import BatchpilotTrainerCallback

    args = TrainingArguments(..., per_device_train_batch_size=16, gradient_accumulation_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[BatchpilotTrainerCallback()])
    trainer.train()
    trainer.state.log_history[-2]["noise_scale"]

What it does:

- **noise scale** from the micro-batches of gradient accumulation
  (``gradient_accumulation_steps ≥ 2``): each micro-batch's gradient is read when its backward
  ends, before the Trainer clips; every ``logging_steps`` the Trainer logs, the callback adds
  ``noise_scale``, ``recommended_batch`` (the critical batch, or the batch of most goodput given a
  throughput curve), ``batchpilot_lr_factor`` and ``batchpilot_lr`` (the lr the optimizer step
  used) to the logged values and to ``trainer.state.log_history``. The Trainer's own
  ``learning_rate`` is its scheduler's lr times the factor, so every reporter logs the lr applied
  (with ``ReduceLROnPlateau``, whose optimizer lr the Trainer logs, the applied lr stays in the
  optimizer until the step is logged, and the scheduler steps on its own lr). Under DDP pass ``trainer=`` so the callback can tell the
  synchronised micro-batch apart; it then estimates from each rank's unsynchronised micro-batches
  (``gradient_accumulation_steps ≥ 3``).
- **schedules, where the Trainer allows**: the Trainer fixes the batch and the accumulation when
  ``train()`` starts, so a :class:`~batchpilot.training._schedules.BatchSchedule`'s noise reduction is applied
  through the lr (what its batch increase would do once the batch is capped), and an
  :class:`~batchpilot.training._adaptive.AdaptiveBatch` defines the AdaScale gain applied at the Trainer's
  batch (relative to its base batch) and the recommendation.
  The factor multiplies the lr the Trainer's own scheduler set, for the optimizer step only (it is
  taken off again before the scheduler steps). The batch the schedule would use is logged as
  ``batchpilot_schedule_batch`` — restart with it when the Trainer should follow it.

Reporters that come before this callback in the Trainer's list (TensorBoard, W&B: the defaults)
have already written a log entry when it adds its values; to see them there, put the callback
first: ``trainer.callback_handler.callbacks.insert(0, callback)``.

transformers is imported with this module, never by ``import batchpilot``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchpilot.checks import check_positive_int
from batchpilot.data import batch_size as samples_in
from batchpilot.errors import BadInputError
from batchpilot.integrations import missing_extra
from batchpilot.measure._noise import DEFAULT_MAX_OVERHEAD, GradientNoiseScale, NoiseScaleWarning
from batchpilot.plan._goodput import Throughput
from batchpilot.training._adaptive import AdaptiveBatch, adascale_gain, lr_gain, recommend_batch
from batchpilot.training._runtime import distributed_world
from batchpilot.training._schedules import BatchSchedule

_IMPORT_ERROR: ImportError | None = None
if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
else:
    try:
        from transformers import (
            TrainerCallback,
            TrainerControl,
            TrainerState,
            TrainingArguments,
        )
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        TrainerCallback = object
        TrainerControl = TrainerState = TrainingArguments = Any
        _IMPORT_ERROR = exc


class BatchpilotTrainerCallback(TrainerCallback):
    """Track and log the gradient noise scale and the recommended batch; apply a schedule's lr.

    Args:
        schedule: a batch schedule whose noise reduction is applied through the lr.
        adaptive: an adaptive controller whose base batch, optimizer family, limits and throughput
            curve define the AdaScale gain applied at the Trainer's (fixed) batch and the
            recommended batch.
        track_noise: measure the gradient noise scale.
        throughput: a throughput curve for the recommendation (see :mod:`batchpilot.plan._goodput`).
        base_batch: the batch the recommendation and the gain are relative to (default: the
            schedule's or controller's, else the Trainer's global batch).
        every_n_steps: read the estimate for the gain every that many steps (reading it
            synchronises the device); it is read at every log as well.
        ema_decay: the estimator's moving-average decay.
        max_overhead: the share of the step time the estimator may take (single process; it
            observes fewer steps to stay within it; ``None``: every step). See
            :class:`~batchpilot.measure._noise.GradientNoiseScale`.
        trainer: the Trainer, needed only under DDP (to see its wrapped model).
    """

    def __init__(
        self,
        *,
        schedule: BatchSchedule | None = None,
        adaptive: AdaptiveBatch | None = None,
        track_noise: bool = True,
        throughput: Throughput | None = None,
        base_batch: int | None = None,
        every_n_steps: int = 10,
        ema_decay: float = 0.95,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        trainer: Any = None,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise missing_extra(
                "batchpilot.integrations.huggingface", "transformers", "transformers"
            ) from _IMPORT_ERROR
        if schedule is not None and adaptive is not None:
            raise BadInputError("schedule: give a schedule or an adaptive controller, not both")
        if schedule is not None and not isinstance(schedule, BatchSchedule):
            raise BadInputError(
                f"schedule: expected a BatchSchedule, got {type(schedule).__name__}"
            )
        if adaptive is not None and not isinstance(adaptive, AdaptiveBatch):
            raise BadInputError(
                f"adaptive: expected an AdaptiveBatch, got {type(adaptive).__name__}"
            )
        if base_batch is not None:
            check_positive_int("base_batch", base_batch)
        self.schedule = schedule
        self.adaptive = adaptive
        self.track_noise = bool(track_noise)
        self.throughput = throughput
        self.base_batch = base_batch
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.ema_decay = ema_decay
        self.max_overhead = max_overhead
        self.trainer = trainer
        self.noise_scale = math.nan
        self.noise: GradientNoiseScale | None = None
        self.history: list[dict[str, float]] = []
        self.global_batch = 0
        self.lr_factor = 1.0
        self._handles: list[Any] = []
        self._micro = 0
        self._queued = False
        self._saved_lrs: list[Any] | None = None  # the scheduler's lrs while the factor is applied
        self._scaled_optimizer: Any = None
        self._distributed = False
        self._recorded = 0
        self._scaled_scheduler: Any = None

    # ------------------------------------------------------------------ train start

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        world, _ = distributed_world()
        self.global_batch = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        )
        self._distributed = world > 1
        self._scale_logged_lr(kwargs.get("lr_scheduler"))
        if not self.track_noise or model is None:
            return
        needed = 3 if self._distributed else 2
        if args.gradient_accumulation_steps < needed:
            warnings.warn(
                f"batchpilot: the noise scale needs gradient_accumulation_steps ≥ {needed} "
                f"here (it is {args.gradient_accumulation_steps}); it is not measured in this run",
                NoiseScaleWarning,
                stacklevel=2,
            )
            return
        if self._distributed and self.trainer is None:
            warnings.warn(
                "batchpilot: under DDP pass BatchpilotTrainerCallback(trainer=trainer) so that the "
                "synchronised micro-batch can be told apart; the noise scale is not measured",
                NoiseScaleWarning,
                stacklevel=2,
            )
            return
        self.noise = GradientNoiseScale(
            model, ema_decay=self.ema_decay, distributed=False, max_overhead=self.max_overhead
        )
        self._hook(model)

    def _hook(self, model: nn.Module) -> None:
        """Note each training forward's batch size, and read the gradients when a backward ends."""
        self._remove_hooks()

        def before_forward(module: nn.Module, args: Any, kwargs: Any) -> None:
            if module.training and torch.is_grad_enabled():
                self._micro = _first_batch_size(args, kwargs)

        self._handles.append(model.register_forward_pre_hook(before_forward, with_kwargs=True))
        engine = torch.autograd.Variable._execution_engine

        def after_grad(param: torch.Tensor) -> None:
            # The first parameter whose gradient lands queues one callback for the end of this
            # backward, when every gradient of the micro-batch is in .grad (and not yet clipped).
            if not self._queued:
                self._queued = True
                engine.queue_callback(self._backward_done)

        for param in model.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(after_grad))

    def _backward_done(self) -> None:
        self._queued = False
        if self.noise is None or self._micro <= 0:
            return
        if self._distributed and self._synchronised():
            return  # this micro-batch's backward averaged the ranks: not a local gradient
        self.noise.record_micro_batch(self._micro)
        self._recorded += 1

    def _synchronised(self) -> bool:
        wrapped = getattr(self.trainer, "model_wrapped", None)
        return isinstance(wrapped, DistributedDataParallel) and bool(
            wrapped.require_backward_grad_sync
        )

    def _scale_logged_lr(self, scheduler: Any) -> None:
        """Make the scheduler's ``get_last_lr`` — what the Trainer logs as ``learning_rate`` —
        include the factor, so the value reporters write is the lr applied, not the scheduler's
        alone. Undone at train end."""
        self._unscale_logged_lr()
        if scheduler is None or not callable(getattr(scheduler, "get_last_lr", None)):
            return
        own = scheduler.get_last_lr

        def get_last_lr() -> list[float]:
            return [lr * self.lr_factor for lr in own()]

        scheduler.get_last_lr = get_last_lr
        self._scaled_scheduler = scheduler

    def _unscale_logged_lr(self) -> None:
        scheduler, self._scaled_scheduler = self._scaled_scheduler, None
        if scheduler is not None and "get_last_lr" in vars(scheduler):
            del scheduler.get_last_lr  # the class's method again

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------- each step

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        self._restore_lrs()  # a step whose lr was still in the optimizer (its log never came)
        self.lr_factor = self._lr_factor(state)
        if optimizer is None or self.lr_factor == 1.0:
            return
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        self._scaled_optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.lr_factor

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if _logs_the_optimizers_lr(kwargs.get("lr_scheduler")):
            # The Trainer logs the optimizer's lr for these schedulers and steps them only after
            # evaluating: the lr applied stays in the optimizer until the step is logged
            # (on_log), evaluated (on_evaluate) or ends without a log (on_step_end).
            return
        # Put back the Trainer scheduler's lr before it steps (chained schedulers read it).
        self._restore_lrs()

    def _restore_lrs(self) -> None:
        """Put the scheduler's own lrs back in the optimizer the factor was applied to."""
        optimizer, self._scaled_optimizer = self._scaled_optimizer, None
        saved, self._saved_lrs = self._saved_lrs, None
        if optimizer is not None and saved is not None:
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._restore_lrs()  # before a ReduceLROnPlateau steps on the evaluation's metric

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not control.should_log:
            self._restore_lrs()  # nothing will log this step's lr
        if self.noise is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoiseScaleWarning)
            if self._recorded >= 2:
                self.noise.finish_step()
            else:
                self.noise.release()  # a short last step of an epoch: not enough parts
        self._recorded = 0
        if self.adaptive is not None and state.global_step % self.every_n_steps == 0:
            self.noise_scale = self.noise.estimate().noise_scale

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._restore_lrs()  # the lr applied has been read into the logs by now
        if logs is None or "loss" not in logs:
            return  # evaluation and end-of-training summaries
        values: dict[str, float] = {"batchpilot_lr_factor": self.lr_factor}
        optimizer = kwargs.get("optimizer")
        if optimizer is not None and optimizer.param_groups:
            # The lr the last optimizer step used: the Trainer's times the factor.
            values["batchpilot_lr"] = float(optimizer.param_groups[0]["lr"]) * self.lr_factor
        if self.noise is not None:
            estimate = self.noise.estimate()
            self.noise_scale = estimate.noise_scale
            values["noise_scale"] = estimate.noise_scale
            adaptive = self.adaptive
            values["recommended_batch"] = float(
                recommend_batch(
                    estimate.noise_scale,
                    base_batch=self._base(),
                    limits=adaptive.limits if adaptive is not None else None,
                    throughput=self.throughput
                    if self.throughput is not None or adaptive is None
                    else adaptive.throughput,
                )
            )
        if self.schedule is not None:
            values["batchpilot_schedule_batch"] = float(self.schedule.at(state.epoch or 0.0).batch)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self.history.append({"step": float(state.global_step), **values})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hooks()
        self._restore_lrs()
        self._unscale_logged_lr()
        if self.noise is not None:
            self.noise.release()

    # ------------------------------------------------------------------- internals

    def _base(self) -> int:
        if self.base_batch is not None:
            return self.base_batch
        if self.schedule is not None:
            return self.schedule.base_batch
        if self.adaptive is not None:
            return self.adaptive.base_batch
        return max(1, self.global_batch)

    def _lr_factor(self, state: TrainerState) -> float:
        """What multiplies the Trainer's lr at this step."""
        if self.schedule is not None:
            k = self.schedule.noise_reduction(state.epoch or 0.0)
            return 0.0 if math.isinf(k) else 1.0 / k
        if self.adaptive is not None and self.global_batch:
            gain = adascale_gain(
                self.global_batch,
                base_batch=self.adaptive.base_batch,
                noise_scale=self.noise_scale,
            )
            return lr_gain(gain, family=self.adaptive.family)
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        """The estimator's, schedule's and controller's state, for a resumed run."""
        return {
            "noise": None if self.noise is None else self.noise.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
            "history": list(self.history),
        }


def _logs_the_optimizers_lr(scheduler: Any) -> bool:
    """Whether the Trainer logs ``optimizer.param_groups[0]["lr"]`` (not the scheduler's
    ``get_last_lr``) as ``learning_rate``: for ``ReduceLROnPlateau`` and transformers'
    ``GreedyLR``, which it steps on an evaluation's metric instead of after every step."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    try:
        from transformers.optimization import GreedyLR
    except ImportError:  # transformers before GreedyLR
        return False
    return isinstance(scheduler, GreedyLR)


def _first_batch_size(args: Any, kwargs: Mapping[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return samples_in(list(args) + list(kwargs.values()))


# The one-liner (imported last: it needs nothing above, and this module's users import it here).
from batchpilot.integrations._huggingface_tune import (  # noqa: E402
    TrainerRecommendation,
    trainer_task,
    tune,
)

__all__ = ["BatchpilotTrainerCallback", "TrainerRecommendation", "trainer_task", "tune"]
