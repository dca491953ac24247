"""Adaptive batch: grow the global batch while the measured noise scale says it pays, lr in lockstep.

At a batch ``B = s·B0`` one step is worth ``r`` steps at the base batch ``B0``, the AdaScale gain
(Johnson et al. 2020, arXiv 2007.05105)::

    r = (σ² + μ²) / (σ²/s + μ²)      σ² = tr(Σ)/B0, μ² = |G|²

which is ``s·E(B)`` with the statistical efficiency ``E(B) = (B_noise + B0)/(B_noise + B)`` of
:mod:`batchpilot.plan._goodput`. SGD takes the lr times ``r``; Adam-family optimizers, which divide out
the gradient's scale, times ``√r`` (the square-root rule). Progress is counted in gain-weighted
steps ``τ = Σ r_t`` — base-batch steps — so an lr decay written for the base batch is evaluated at
``τ`` and stays comparable whatever the batch did.

:class:`AdaptiveBatch` decides when to grow. With a throughput curve (samples per second per
micro-batch, e.g. from the throughput measurement) it grows while the next batch's goodput —
throughput × efficiency — beats the current one's; without one it follows the critical batch:
it grows while the next batch is at most the measured noise scale, where a run needs about twice
the fewest possible steps and twice the fewest possible samples (McCandlish et al. 2018)::

    adaptive = AdaptiveBatch(base_batch=32, base_lr=0.1, limits=BatchLimits(max_micro_batch=256,
                             dataset_size=len(data)), decay=StepDecay(every_epochs=30))
    noise = GradientNoiseScale(model)
    setting = adaptive.setting
    while not adaptive.done(total_epochs=90):
        ...one step at setting.batch (setting.micro_batch × setting.accumulation_steps), lr
        setting.lr, calling noise.record_micro_batch after each backward...
        noise.finish_step(); optimizer.step()
        setting = adaptive.update(noise.estimate())

>>> round(adascale_gain(256, base_batch=32, noise_scale=100.0), 4)
2.9663
>>> lr_gain(4.0, family="adam")
2.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.measure._noise import NoiseScaleEstimate
from batchpilot.plan._goodput import Throughput, plan_goodput, statistical_efficiency
from batchpilot.training._schedules import BatchLimits, BatchSetting, LrDecay, split_for

OptimizerFamily = Literal["sgd", "adam"]


def adascale_gain(batch: float, *, base_batch: float, noise_scale: float) -> float:
    """The AdaScale gain ``r = (σ² + μ²)/(σ²/s + μ²) = s·E(B)`` of ``batch`` over ``base_batch``,
    clipped to ``[1, s]``.

    An infinite noise scale (no measurable signal) gives ``r = s``; a noise scale that is not a
    positive number (no estimate yet, or a negative unbiased estimate) gives ``r = 1``.

    >>> adascale_gain(64, base_batch=64, noise_scale=10.0)
    1.0
    >>> adascale_gain(128, base_batch=64, noise_scale=math.inf)
    2.0
    """
    check_positive_float("batch", batch)
    check_positive_float("base_batch", base_batch)
    scale = batch / base_batch
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, int | float):
        raise BadInputError(f"noise_scale: expected a number, got {noise_scale!r}")
    if math.isnan(noise_scale) or noise_scale <= 0:
        return 1.0 if scale >= 1 else scale
    gain = scale * statistical_efficiency(batch, noise_scale=noise_scale, base_batch=base_batch)
    return min(max(gain, min(1.0, scale)), max(1.0, scale))


def lr_gain(gain: float, *, family: OptimizerFamily = "sgd") -> float:
    """The lr multiplier for an AdaScale gain: ``r`` for SGD, ``√r`` for Adam-family optimizers.

    >>> lr_gain(4.0)
    4.0
    """
    gain = check_positive_float("gain", gain)
    family = check_family(family)
    return gain if family == "sgd" else math.sqrt(gain)


def check_family(family: str) -> OptimizerFamily:
    if family not in get_args(OptimizerFamily):
        raise BadInputError(f"family: expected 'sgd' or 'adam', got {family!r}")
    return family  # type: ignore[return-value]


def optimizer_family(optimizer: Any) -> OptimizerFamily:
    """``"adam"`` for optimizers that normalise by a second moment (Adam, AdamW, RMSprop, Adagrad,
    …), ``"sgd"`` otherwise.

    >>> import torch
    >>> optimizer_family(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    'adam'
    """
    name = type(optimizer).__name__.lower()
    adaptive = ("adam", "rmsprop", "adagrad", "adadelta", "lamb", "lion", "adafactor", "nadam")
    return "adam" if any(key in name for key in adaptive) else "sgd"


def recommend_batch(
    noise_scale: float,
    *,
    base_batch: int,
    limits: BatchLimits | None = None,
    throughput: Throughput | None = None,
) -> int:
    """The global batch the noise scale recommends now.

    With a throughput curve, the batch of most goodput (:func:`batchpilot.plan._goodput.plan_goodput`)
    among ``base_batch × 2^k`` within the limits; without one, the largest such batch at most the
    noise scale (the critical batch). Never below ``base_batch``; ``base_batch`` while there is no
    estimate.

    >>> recommend_batch(300.0, base_batch=32)
    256
    >>> recommend_batch(300.0, base_batch=32, limits=BatchLimits(max_batch=100))
    64
    """
    check_positive_int("base_batch", base_batch)
    limits = limits if limits is not None else BatchLimits()
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, int | float):
        raise BadInputError(f"noise_scale: expected a number, got {noise_scale!r}")
    cap = limits.cap
    candidates = [base_batch]
    while candidates[-1] * 2 <= cap and candidates[-1] * 2 <= 2**40:
        candidates.append(candidates[-1] * 2)
    if math.isnan(noise_scale) or noise_scale <= 0:
        return base_batch
    if throughput is None:
        below = [b for b in candidates if b <= noise_scale]
        return below[-1] if below else base_batch
    plan = plan_goodput(
        throughput,
        noise_scale=noise_scale,
        base_batch=base_batch,
        batches=[b for b in candidates if b % limits.world_size == 0],
        max_micro_batch=limits.max_micro_batch,
        world_size=limits.world_size,
        # during training the batch follows goodput alone, as in Pollux: the steps cap guards a
        # one-off recommendation from a noisy curve, not a controller that re-measures
        max_steps_ratio=None,
    )
    return plan.recommended_batch


@dataclass(frozen=True)
class AdaptivePoint:
    """The controller's state after optimizer step ``step`` (counted from 1)."""

    step: int
    batch: int
    lr: float
    gain: float
    progress: float
    noise_scale: float
    grew: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noise_value(estimate: NoiseScaleEstimate | float | None) -> tuple[float, int | None]:
    if estimate is None:
        return math.nan, 0
    if isinstance(estimate, NoiseScaleEstimate):
        return float(estimate.noise_scale), estimate.steps
    if isinstance(estimate, bool) or not isinstance(estimate, int | float):
        raise BadInputError(
            f"estimate: expected a NoiseScaleEstimate or a number, got {type(estimate).__name__}"
        )
    return float(estimate), None


class AdaptiveBatch:
    """Grows the global batch from ``base_batch`` as the measured noise scale allows, with the lr
    following the AdaScale gain and an optional decay evaluated at the gain-weighted progress.

    Args:
        base_batch: the batch ``B0`` the lr ``base_lr`` was chosen for.
        base_lr: the lr at ``base_batch``.
        limits: memory limit (``max_micro_batch``), accumulation, world size and caps; a grown batch
            is split into micro-batch × accumulation under them and never exceeds their cap.
        family: ``"sgd"`` (lr × r) or ``"adam"`` (lr × √r).
        throughput: samples per second per device at a micro-batch, as ``(micro_batch,
            samples_per_second)`` pairs or a curve object (see :mod:`batchpilot.plan._goodput`); without
            it the batch follows the critical batch.
        growth: the factor by which the batch grows at a decision.
        check_every: steps between decisions.
        min_steps: steps the noise-scale estimate must have before the first decision.
        min_improvement: with a throughput curve, the relative goodput gain needed to grow.
        decay: an lr decay in epochs at the base batch, evaluated at ``τ·B0/N`` (needs
            ``limits.dataset_size``).
    """

    def __init__(
        self,
        *,
        base_batch: int,
        base_lr: float,
        limits: BatchLimits | None = None,
        family: OptimizerFamily = "sgd",
        throughput: Throughput | None = None,
        growth: float = 2.0,
        check_every: int = 10,
        min_steps: int = 10,
        min_improvement: float = 0.05,
        decay: LrDecay | None = None,
    ) -> None:
        self.base_batch = check_positive_int("base_batch", base_batch)
        self.base_lr = check_positive_float("base_lr", base_lr)
        self.limits = limits if limits is not None else BatchLimits()
        if not isinstance(self.limits, BatchLimits):
            raise BadInputError(f"limits: expected a BatchLimits, got {type(limits).__name__}")
        if base_batch % self.limits.world_size:
            raise BadInputError(
                f"base_batch: {base_batch} is not a multiple of world_size {self.limits.world_size}"
            )
        if self.limits.cap < base_batch:
            raise BadInputError(
                f"base_batch: {base_batch} is above what the limits allow ({self.limits.cap:g})"
            )
        self.family = check_family(family)
        self.throughput = throughput
        self.growth = check_positive_float("growth", growth)
        if self.growth <= 1.0:
            raise BadInputError(f"growth: expected a factor > 1, got {growth!r}")
        self.check_every = check_positive_int("check_every", check_every)
        self.min_steps = check_positive_int("min_steps", min_steps)
        if not (isinstance(min_improvement, int | float) and min_improvement >= 0):
            raise BadInputError(f"min_improvement: expected a number ≥ 0, got {min_improvement!r}")
        self.min_improvement = float(min_improvement)
        if decay is not None and self.limits.dataset_size is None:
            raise BadInputError(
                "decay: evaluating a decay in epochs needs limits.dataset_size (training samples)"
            )
        self.decay = decay
        micro, accumulation = split_for(base_batch, self.limits)
        self.batch = micro * accumulation * self.limits.world_size
        self.steps = 0
        self.progress = 0.0
        self.gain = 1.0
        self.noise_scale = math.nan
        self.history: list[AdaptivePoint] = []

    # ------------------------------------------------------------------------ state

    @property
    def progress_epochs(self) -> float:
        """Progress in epochs at the base batch: ``τ·B0/N``."""
        if self.limits.dataset_size is None:
            raise BadInputError("limits: progress in epochs needs limits.dataset_size")
        return self.progress * self.base_batch / self.limits.dataset_size

    def done(self, *, total_steps: float | None = None, total_epochs: float | None = None) -> bool:
        """Whether the gain-weighted progress reached a budget given in base-batch steps or epochs."""
        if (total_steps is None) == (total_epochs is None):
            raise BadInputError("total_steps: give either total_steps or total_epochs")
        if total_steps is not None:
            return self.progress >= check_positive_float("total_steps", total_steps) - 1e-9
        assert total_epochs is not None
        return self.progress_epochs >= check_positive_float("total_epochs", total_epochs) - 1e-9

    @property
    def lr(self) -> float:
        """The lr of the next step: ``base_lr × lr_gain(r) × decay(τ)``."""
        factor = 1.0 if self.decay is None else self.decay.factor(self.progress_epochs)
        return self.base_lr * lr_gain(self.gain, family=self.family) * factor

    @property
    def setting(self) -> BatchSetting:
        """What the next step trains with."""
        micro, accumulation = split_for(self.batch, self.limits)
        lr = self.lr
        noise_reduction = (
            (self.batch / self.base_batch) * (self.base_lr / lr) if lr > 0 else math.inf
        )
        return BatchSetting(
            batch=self.batch,
            lr=lr,
            micro_batch=micro,
            accumulation_steps=accumulation,
            world_size=self.limits.world_size,
            noise_reduction=noise_reduction,
        )

    # --------------------------------------------------------------------- decisions

    def lr_for(self, batch: int) -> float:
        """The lr for a step at ``batch`` now (for a loop that applies a growth later than
        :meth:`update` decides it, e.g. at the next epoch)."""
        check_positive_int("batch", batch)
        gain = adascale_gain(batch, base_batch=self.base_batch, noise_scale=self.noise_scale)
        factor = 1.0 if self.decay is None else self.decay.factor(self.progress_epochs)
        return self.base_lr * lr_gain(gain, family=self.family) * factor

    def update(
        self, estimate: NoiseScaleEstimate | float | None, *, batch_used: int | None = None
    ) -> BatchSetting:
        """Account for the step just taken and return the setting of the next one.

        ``estimate`` is the noise scale after the step (a :class:`NoiseScaleEstimate` or a
        number; ``None`` or nan while there is none). ``batch_used`` is the global batch the step
        really had, when the loop has not applied the controller's batch yet (default: it has).
        """
        noise_scale, estimate_steps = _noise_value(estimate)
        self.steps += 1
        # The step just taken was worth r base steps, r the gain of the batch it used.
        if batch_used is None or batch_used == self.batch:
            self.progress += self.gain
        else:
            self.progress += adascale_gain(
                check_positive_int("batch_used", batch_used),
                base_batch=self.base_batch,
                noise_scale=self.noise_scale,
            )
        self.noise_scale = noise_scale
        grew = False
        ready = estimate_steps is None or estimate_steps >= self.min_steps
        if ready and self.steps >= self.min_steps and self.steps % self.check_every == 0:
            candidate = self.next_batch()
            if candidate is not None and self.should_grow(candidate, noise_scale):
                self.batch = candidate
                grew = True
        self.gain = adascale_gain(self.batch, base_batch=self.base_batch, noise_scale=noise_scale)
        self.history.append(
            AdaptivePoint(
                self.steps, self.batch, self.lr, self.gain, self.progress, noise_scale, grew
            )
        )
        return self.setting

    def next_batch(self) -> int | None:
        """The batch a growth would move to (``None`` when the limits allow no larger one)."""
        wanted = min(self.batch * self.growth, self.limits.cap)
        micro, accumulation = split_for(max(self.batch, math.floor(wanted)), self.limits)
        candidate = micro * accumulation * self.limits.world_size
        return candidate if candidate > self.batch else None

    def should_grow(self, candidate: int, noise_scale: float) -> bool:
        """Whether moving from the current batch to ``candidate`` improves goodput."""
        if math.isnan(noise_scale) or noise_scale <= 0:
            return False
        if self.throughput is None:
            return candidate <= noise_scale
        plan = plan_goodput(
            self.throughput,
            noise_scale=noise_scale,
            base_batch=self.base_batch,
            batches=[self.batch, candidate],
            max_micro_batch=self.limits.max_micro_batch,
            world_size=self.limits.world_size,
        )
        goodput = {point.global_batch: point.goodput for point in plan.points}
        if candidate not in goodput or self.batch not in goodput:
            return False
        return goodput[candidate] > goodput[self.batch] * (1.0 + self.min_improvement)

    # ------------------------------------------------------------------- persistence

    def config(self) -> dict[str, Any]:
        return {
            "base_batch": self.base_batch,
            "base_lr": self.base_lr,
            "limits": self.limits.to_dict(),
            "family": self.family,
            "growth": self.growth,
            "check_every": self.check_every,
            "min_steps": self.min_steps,
            "min_improvement": self.min_improvement,
            "decay": None if self.decay is None else self.decay.to_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue at the same batch, gain and progress."""
        return {
            "config": self.config(),
            "batch": self.batch,
            "steps": self.steps,
            "progress": self.progress,
            "gain": self.gain,
            "noise_scale": self.noise_scale,
            "history": [point.to_dict() for point in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a state saved with a different configuration."""
        if state.get("config") != self.config():
            raise BadInputError(
                f"state: it was saved with a different configuration ({state.get('config')!r})"
            )
        self.batch = int(state["batch"])
        self.steps = int(state["steps"])
        self.progress = float(state["progress"])
        self.gain = float(state["gain"])
        self.noise_scale = float(state["noise_scale"])
        self.history = [AdaptivePoint(**point) for point in state["history"]]


__all__ = [
    "AdaptiveBatch",
    "AdaptivePoint",
    "OptimizerFamily",
    "adascale_gain",
    "check_family",
    "lr_gain",
    "optimizer_family",
    "recommend_batch",
]
