"""PyTorch Lightning: ``tune(module, datamodule)`` and ``apply``; a callback for noise and schedules.

One line for a recommendation, one to apply it (see :mod:`batchpilot.integrations._lightning_tune`)::

    from batchpilot.integrations.lightning import apply, tune

    result = tune(module, datamodule, time_budget_seconds=30)
    apply(result, trainer, module, datamodule)   # batch_size, accumulate_grad_batches, lr
    trainer.fit(module, datamodule)

The callback::

    from batchpilot.integrations.lightning import BatchpilotCallback
    from batchpilot.training._schedules import BatchLimits, periodic_batch

    schedule = periodic_batch(base_batch=64, base_lr=0.05, every_epochs=10,
                              limits=BatchLimits(max_micro_batch=256, dataset_size=50_000))
    callback = BatchpilotCallback(schedule=schedule)
    trainer = lightning.Trainer(callbacks=[callback])
    trainer.fit(model, datamodule)
    callback.history[-1]["noise_scale"]

What it does:

- **before fit** (``on_fit_start``): calls ``tuner(trainer, module)`` when given — any function
  returning the largest micro-batch that fits, e.g. a wrapper around
  ``batchpilot.measure._memory_search.find_max_batch`` — and takes it as the memory limit; applies the
  schedule's first setting; warns about multi-device pitfalls (BatchNorm per device).
- **noise scale**: on one device from the micro-batches of gradient accumulation (set
  ``accumulate_grad_batches ≥ 2``), under DDP from each rank's gradient (a communication hook on
  the strategy's DDP model); logged as ``batchpilot/noise_scale`` with the recommended batch
  (``batchpilot/recommended_batch``), the batch and the lr.
- **schedules**: a :class:`~batchpilot.training._schedules.BatchSchedule` is applied at each epoch start —
  the lr of every param group of every optimizer, ``trainer.accumulate_grad_batches``, and the
  micro-batch: through a :class:`~batchpilot.training._sampler.ScheduledBatchSampler` built with ``sized=False`` as the
  train loader's ``batch_sampler`` (pass ``use_distributed_sampler=False``), or else through a
  ``batch_size`` attribute of the module or datamodule (the loader must be rebuilt:
  ``reload_dataloaders_every_n_epochs=1``). An :class:`~batchpilot.training._adaptive.AdaptiveBatch` sets
  the lr every step (AdaScale gain) and its batch at the next epoch start.

Lightning is imported with this module, never by ``import batchpilot``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchpilot.checks import check_positive_int
from batchpilot.data import batch_size as samples_in
from batchpilot.errors import BadInputError
from batchpilot.integrations import missing_extra
from batchpilot.measure._noise import DEFAULT_MAX_OVERHEAD, GradientNoiseScale, NoiseScaleWarning
from batchpilot.plan._goodput import Throughput
from batchpilot.training._adaptive import AdaptiveBatch, recommend_batch
from batchpilot.training._pitfalls import Pitfall, check_batchnorm, warn_pitfalls
from batchpilot.training._runtime import apply_lr, resplit
from batchpilot.training._sampler import ScheduledBatchSampler
from batchpilot.training._schedules import BatchSchedule, BatchSetting

_IMPORT_ERROR: ImportError | None = None
if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
else:
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import Callback
    except ImportError as exc:  # pragma: no cover - exercised only without Lightning
        pl = None
        Callback = object
        _IMPORT_ERROR = exc

Tuner = Callable[["pl.Trainer", "pl.LightningModule"], int]


class BatchpilotCallback(Callback):
    """Tune before fit, track the gradient noise scale, and apply a batch schedule.

    Args:
        schedule: a batch schedule to apply at every epoch start (``None``: the batch is left
            alone).
        adaptive: an adaptive batch controller instead of a schedule.
        track_noise: measure the gradient noise scale.
        tuner: ``tuner(trainer, module) -> max_micro_batch``, called once before fit.
        max_micro_batch: the largest micro-batch known to fit (the tuner's result replaces it).
        throughput: a throughput curve for the recommendation (see :mod:`batchpilot.plan._goodput`).
        base_batch: the batch the recommendation is relative to (default: the schedule's or the
            first step's global batch).
        every_n_steps: read and log the estimate every that many optimizer steps (reading it
            synchronises the device).
        ema_decay: the estimator's moving-average decay.
        max_overhead: the share of the step time the estimator may take (single process; it
            observes fewer steps to stay within it; ``None``: every step). See
            :class:`~batchpilot.measure._noise.GradientNoiseScale`.
        check_pitfalls: warn about multi-device pitfalls before fit.
    """

    def __init__(
        self,
        *,
        schedule: BatchSchedule | None = None,
        adaptive: AdaptiveBatch | None = None,
        track_noise: bool = True,
        tuner: Tuner | None = None,
        max_micro_batch: int | None = None,
        throughput: Throughput | None = None,
        base_batch: int | None = None,
        every_n_steps: int = 1,
        ema_decay: float = 0.95,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
        check_pitfalls: bool = True,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise missing_extra(
                "batchpilot.integrations.lightning", "lightning", "lightning"
            ) from _IMPORT_ERROR
        super().__init__()
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
        if max_micro_batch is not None:
            check_positive_int("max_micro_batch", max_micro_batch)
        if base_batch is not None:
            check_positive_int("base_batch", base_batch)
        self.schedule = schedule
        self.adaptive = adaptive
        self.track_noise = bool(track_noise)
        self.tuner = tuner
        self.max_micro_batch = max_micro_batch
        self.throughput = throughput
        self.base_batch = base_batch
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.ema_decay = ema_decay
        self.max_overhead = max_overhead
        self.check_pitfalls = check_pitfalls
        self.noise: GradientNoiseScale | None = None
        self.setting: BatchSetting | None = None
        self.pitfalls: list[Pitfall] = []
        self.history: list[dict[str, float]] = []
        self._distributed = False
        self._micro = 0
        self._step_samples = 0
        self._last_step = -1
        self._noise_state: dict[str, Any] | None = None
        self._warned_reload = False
        self._warned_sized = False

    # ------------------------------------------------------------------- fit start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tuner is not None:
            found = self.tuner(trainer, pl_module)
            self.max_micro_batch = check_positive_int("tuner()", int(found))
        setting = self._target_setting(trainer)
        if setting is not None:
            self._apply(trainer, pl_module, setting)
        if self.check_pitfalls:
            micro = setting.micro_batch if setting is not None else _module_batch(pl_module)
            if micro is not None:
                self.pitfalls = check_batchnorm(
                    pl_module,
                    micro_batch=micro,
                    world_size=trainer.world_size,
                    accumulation_steps=trainer.accumulate_grad_batches,
                )
                warn_pitfalls(self.pitfalls)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a batch that leaves it unchanged only accumulated
        if not self.track_noise:
            return
        self._distributed = trainer.world_size > 1
        model = trainer.strategy.model if self._distributed else pl_module
        if model is None:  # pragma: no cover - a strategy without a model
            return
        self.noise = GradientNoiseScale(
            model,
            ema_decay=self.ema_decay,
            distributed=self._distributed or None,
            max_overhead=self.max_overhead,
        )
        if self._noise_state is not None:
            self.noise.load_state_dict(self._noise_state)
        if not self._distributed and trainer.accumulate_grad_batches < 2:
            warnings.warn(
                "batchpilot: on one device the noise scale needs accumulate_grad_batches ≥ 2 "
                "(two micro-batches per step); it is not measured in this run",
                NoiseScaleWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ each epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        setting = self._target_setting(trainer)
        if setting is not None:
            self._apply(trainer, pl_module, setting)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A loader built from a batch_size attribute is rebuilt before the next epoch's start
        # hook: set the attribute now, for that epoch.
        if self.schedule is None and self.adaptive is None:
            return
        if _scheduled_sampler(trainer) is None:
            setting = self._target_setting(trainer, epoch=trainer.current_epoch + 1)
            if setting is not None:
                self._set_module_batch(trainer, pl_module, setting.micro_batch)

    # ------------------------------------------------------------------- each step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._micro = samples_in(batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_samples += self._micro
        if self.noise is not None and not self._distributed and trainer.accumulate_grad_batches > 1:
            self.noise.record_micro_batch(self._micro)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Lightning clips gradients after this hook: the norms are the unclipped ones.
        if self.noise is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoiseScaleWarning)
                if self._distributed:
                    self.noise.finish_step(batch_size=max(1, self._step_samples))
                elif trainer.accumulate_grad_batches > 1:
                    self.noise.finish_step()
        self._step_samples = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # an accumulation batch: no optimizer step yet
        self._last_step = step
        estimate = None
        if self.noise is not None and step % self.every_n_steps == 0:
            estimate = self.noise.estimate()
        if self.adaptive is not None:
            value = estimate if estimate is not None else self.adaptive.noise_scale
            used = self.setting.batch if self.setting is not None else None
            self.adaptive.update(value, batch_used=used)
            # A growth takes effect at the next epoch start; until then the lr is the one for
            # the batch in use.
            lr = self.adaptive.lr_for(used) if used is not None else self.adaptive.lr
            for optimizer in trainer.optimizers:
                apply_lr(optimizer, lr, base_lr=self.adaptive.base_lr)
        if estimate is not None:
            self._log(trainer, pl_module, step, estimate.noise_scale)

    # ------------------------------------------------------------------- internals

    def _target_setting(self, trainer: pl.Trainer, epoch: int | None = None) -> BatchSetting | None:
        epoch = trainer.current_epoch if epoch is None else epoch
        if self.schedule is not None:
            setting = self.schedule.at(epoch)
        elif self.adaptive is not None:
            setting = self.adaptive.setting
        else:
            return None
        return resplit(
            setting, max_micro_batch=self.max_micro_batch, world_size=max(1, trainer.world_size)
        )

    def _apply(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        setting: BatchSetting,
    ) -> None:
        base_lr = (self.schedule or self.adaptive).base_lr  # type: ignore[union-attr]
        for optimizer in trainer.optimizers:
            apply_lr(optimizer, setting.lr, base_lr=base_lr)
        trainer.accumulate_grad_batches = setting.accumulation_steps
        sampler = _scheduled_sampler(trainer)
        if sampler is not None:
            sampler.set_batch_size(setting.micro_batch * setting.world_size)
            if sampler.sized and not self._warned_sized:
                self._warned_sized = True
                warnings.warn(
                    "batchpilot: Lightning counts an epoch's batches once; build the "
                    "ScheduledBatchSampler with sized=False so that epochs follow the schedule",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            self._set_module_batch(trainer, pl_module, setting.micro_batch)
        self.setting = setting

    def _set_module_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, micro_batch: int
    ) -> None:
        from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

        if not lightning_hasattr(pl_module, "batch_size"):
            return
        current = _module_batch(pl_module)
        if current == micro_batch:
            return
        lightning_setattr(pl_module, "batch_size", micro_batch)
        started = trainer.current_epoch > 0 or trainer.global_step > 0
        reload_every = getattr(trainer, "reload_dataloaders_every_n_epochs", 0)
        if started and reload_every != 1 and not self._warned_reload:
            self._warned_reload = True
            warnings.warn(
                "batchpilot: the schedule changed the module's batch_size, but the train loader "
                "is only rebuilt with reload_dataloaders_every_n_epochs=1 (or use "
                "ScheduledBatchSampler as the loader's batch_sampler)",
                UserWarning,
                stacklevel=2,
            )

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, noise_scale: float
    ) -> None:
        setting = self.setting
        batch = setting.batch if setting is not None else None
        base = self.base_batch or (self.schedule.base_batch if self.schedule else None)
        if base is None and self.adaptive is not None:
            base = self.adaptive.base_batch
        if base is None:
            base = batch or max(
                1, self._micro * trainer.accumulate_grad_batches * trainer.world_size
            )
        recommended = recommend_batch(noise_scale, base_batch=base, throughput=self.throughput)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        row = {
            "step": float(step),
            "noise_scale": float(noise_scale),
            "recommended_batch": float(recommended),
            "batch": float(batch if batch is not None else base),
            "lr": lr,
        }
        self.history.append(row)
        for key in ("noise_scale", "recommended_batch", "batch", "lr"):
            pl_module.log(f"batchpilot/{key}", row[key], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": None if self.noise is None else self.noise.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
            "max_micro_batch": self.max_micro_batch,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._noise_state = state_dict.get("noise")
        if self.schedule is not None and state_dict.get("schedule") is not None:
            self.schedule.load_state_dict(state_dict["schedule"])
        if self.adaptive is not None and state_dict.get("adaptive") is not None:
            self.adaptive.load_state_dict(state_dict["adaptive"])
        self.max_micro_batch = state_dict.get("max_micro_batch", self.max_micro_batch)
        self.history = list(state_dict.get("history", []))


def _scheduled_sampler(trainer: pl.Trainer) -> ScheduledBatchSampler | None:
    try:
        loader = trainer.train_dataloader
    except Exception:  # pragma: no cover - before the loaders exist
        return None
    sampler = getattr(loader, "batch_sampler", None)
    return sampler if isinstance(sampler, ScheduledBatchSampler) else None


def _module_batch(pl_module: pl.LightningModule) -> int | None:
    from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

    if not lightning_hasattr(pl_module, "batch_size"):
        return None
    value = lightning_getattr(pl_module, "batch_size")
    return int(value) if isinstance(value, int) else None


# The one-liner (imported last: it needs nothing above, and this module's users import it here).
from batchpilot.integrations._lightning_tune import apply, module_task, tune  # noqa: E402

__all__ = ["BatchpilotCallback", "apply", "module_task", "tune"]
