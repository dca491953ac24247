"""The gradient noise scale (McCandlish et al. 2018, arXiv 1812.06162), measured during training.

The expected squared norm of a batch gradient is ``E|G_b|² = |G|² + tr(Σ)/b``. Seeing gradients at
two batch sizes ``b < B`` in the same step — each micro-batch's and their mean, or each rank's and
the all-reduced one — gives unbiased estimates of the true gradient's squared norm ``|G|²`` and of
the per-sample covariance's trace ``tr(Σ)``, with no extra backward pass. Both are kept as separate
bias-corrected exponential moving averages; the simple noise scale ``B_simple = tr(Σ) / |G|²`` is
their ratio (never an average of per-step ratios, which is biased and often infinite).

:class:`GradientNoiseScale` observes any training loop::

    noise = GradientNoiseScale(model)
    for step in range(steps):
        optimizer.zero_grad()
        for micro in micro_batches:                    # your gradient accumulation
            (loss_fn(model, micro) / len(micro_batches)).backward()
            noise.record_micro_batch(batch_size=len(micro))
        noise.finish_step()                            # before clipping and optimizer.step()
        optimizer.step()
    print(noise.estimate().noise_scale)

Under DDP, wrap the model first and pass the wrapper: each rank's gradient is the small batch and
the all-reduced gradient the big one (``noise.finish_step(batch_size=local_batch)`` once per step).
:func:`measure_noise_scale` trains a fresh model of a task and returns the estimate over training.

>>> g2, trace = unbiased_moments(1.0 + 20.0 / 8, 1.0 + 20.0 / 32, small_batch=8, big_batch=32)
>>> round(g2, 6), round(trace, 6)
(1.0, 20.0)
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from batchpilot.checks import (
    Reduction,
    check_positive_float,
    check_positive_int,
    check_run_steps,
    check_trainable,
)
from batchpilot.data import batch_size as samples_in
from batchpilot.data import to_device
from batchpilot.errors import BadInputError
from batchpilot.precision import backward, make_scaler, optimizer_step
from batchpilot.state import preserved_rng
from batchpilot.task import Task
from batchpilot.training._loop import PROGRESS_SAMPLES, evaluate
from batchpilot.training._loop import micro_batches as micro_batch_source

# Per-step values wait on the device and are read back in groups: one host sync per flush, not
# one per step (on CUDA a sync stalls the pipeline).
_FLUSH_EVERY = 32
DEFAULT_EMA_DECAY = 0.95
DEFAULT_BLOCK_STEPS = 5
# The share of training time the estimator's own calls may take by default (single process): it
# skips steps while its own time is above this share of the time since it started. Outside its
# calls it costs a little more (allocations, caches: +1-2% of a step on the small CPU examples of
# benchmarks/critical_batch.py), so 3% keeps the whole overhead within 5%.
DEFAULT_MAX_OVERHEAD = 0.03


class NoiseScaleWarning(UserWarning):
    """The noise-scale measurement may not describe the computation the user trains with."""


def unbiased_moments(
    small_sq_norm: float, big_sq_norm: float, *, small_batch: float, big_batch: float
) -> tuple[float, float]:
    """Unbiased ``(|G|², tr(Σ))`` from squared gradient norms at two batch sizes.

    ``|G|² = (B·|G_B|² − b·|G_b|²) / (B − b)`` and ``tr(Σ) = (|G_b|² − |G_B|²) / (1/b − 1/B)``.
    The batches may be effective (harmonic-mean) sizes when the parts are unequal.

    >>> unbiased_moments(3.0, 1.5, small_batch=4, big_batch=16)
    (1.0, 8.0)
    """
    check_positive_float("small_batch", small_batch)
    check_positive_float("big_batch", big_batch)
    if big_batch <= small_batch:
        raise BadInputError(
            f"big_batch: expected more than small_batch ({small_batch:g}), got {big_batch:g}"
        )
    inv_small, inv_big = 1.0 / small_batch, 1.0 / big_batch
    return _moments(small_sq_norm, big_sq_norm, inv_small, inv_big)


def _moments(small_sq: Any, big_sq: Any, inv_small: Any, inv_big: Any) -> tuple[Any, Any]:
    # Written on 1/b so that it works on floats and on device tensors alike.
    gap = inv_small - inv_big
    return (big_sq * inv_small - small_sq * inv_big) / gap, (small_sq - big_sq) / gap


def ratio_interval(
    gradient_sq_norms: Sequence[float],
    traces: Sequence[float],
    *,
    ema_decay: float,
    block_steps: int,
    z: float = 1.96,
) -> tuple[float, tuple[float, float]]:
    """The EMA ratio ``Σ w·tr / Σ w·|G|²`` and an interval for it from blocks of steps.

    The bias-corrected EMAs of both series share their weights ``w_t = decay^(n−1−t)``, so their
    ratio is a weighted ratio of sums. Its variance follows by linearisation, summing the residuals
    ``w·(tr − R·|G|²)`` within blocks of ``block_steps`` consecutive steps so that correlation
    between neighbouring steps widens the interval instead of being ignored. The interval is
    ``R ± z·se``, cut at 0; it is unbounded above while the signal ``Σ w·|G|²`` cannot be told
    apart from zero.

    >>> estimate, (low, high) = ratio_interval([1.0, 1.2, 0.8, 1.0], [10.0, 9.0, 11.0, 10.0],
    ...                                        ema_decay=1.0, block_steps=1)
    >>> estimate, low < estimate < high
    (10.0, True)
    """
    n = len(gradient_sq_norms)
    if n != len(traces):
        raise BadInputError(
            f"traces: expected {n} values like gradient_sq_norms, got {len(traces)}"
        )
    if n == 0:
        return math.nan, (math.nan, math.nan)
    weights = [ema_decay ** (n - 1 - t) for t in range(n)]
    signal = sum(w * g for w, g in zip(weights, gradient_sq_norms, strict=True))
    noise = sum(w * s for w, s in zip(weights, traces, strict=True))
    signal_se = _signal_se(gradient_sq_norms, weights, block_steps)
    if signal <= z * signal_se:
        # The signal cannot be told apart from zero: no upper bound; the lower one takes the
        # largest signal still plausible.
        plausible = signal + z * signal_se
        low = max(0.0, noise / plausible) if plausible > 0 else 0.0
        return (noise / signal if signal > 0 else math.inf), (low, math.inf)
    ratio = noise / signal
    variance = 0.0
    for start in range(0, n, block_steps):
        residual = sum(
            weights[t] * (traces[t] - ratio * gradient_sq_norms[t])
            for t in range(start, min(n, start + block_steps))
        )
        variance += residual * residual
    se = math.sqrt(variance) / signal
    return ratio, (max(0.0, ratio - z * se), ratio + z * se)


def _signal_se(values: Sequence[float], weights: Sequence[float], block_steps: int) -> float:
    total = sum(weights)
    mean = sum(w * v for w, v in zip(weights, values, strict=True)) / total
    variance = 0.0
    for start in range(0, len(values), block_steps):
        block = range(start, min(len(values), start + block_steps))
        residual = sum(weights[t] * (values[t] - mean) for t in block)
        variance += residual * residual
    return math.sqrt(variance)


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The estimate after the steps seen so far.

    ``noise_scale`` is ``B_simple = tr(Σ)/|G|²`` in samples (``inf`` while the gradient's signal is
    not yet distinguishable from its noise); the interval is an approximate 95% interval.
    """

    noise_scale: float
    noise_scale_interval: tuple[float, float]
    gradient_sq_norm: float
    trace_covariance: float
    steps: int
    skipped_steps: int
    unobserved_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["noise_scale_interval"] = list(self.noise_scale_interval)
        return data


@dataclass(frozen=True)
class NoiseScalePoint:
    """The running estimate after optimizer step ``step`` (counted from 1)."""

    step: int
    noise_scale: float
    gradient_sq_norm: float
    trace_covariance: float


class GradientNoiseScale:
    """Tracks the gradient noise scale of a model over ordinary training steps.

    Single process: call :meth:`record_micro_batch` after each micro-batch's backward (at least two
    per step — the accumulation you already do, or the batch split in parts) and
    :meth:`finish_step` after the last one. The difference between consecutive accumulated
    ``.grad`` values is each micro-batch's gradient; one flat copy of the gradients is kept for it while the step accumulates.

    Distributed: pass the :class:`~torch.nn.parallel.DistributedDataParallel` wrapper. A DDP
    communication hook (the default all-reduce, plus the squared norm of each local bucket) sees
    each rank's gradient before it is averaged; :meth:`finish_step` then adds one all-reduce of
    three scalars, so every rank holds the same estimate. With gradient accumulation, use
    ``no_sync()`` for all but the last micro-batch, as usual. A loop that averages gradients
    itself (a plain model in a process group, or DDP under ``no_sync`` throughout) passes
    ``distributed=True`` and calls :meth:`all_reduce_gradients` instead of all-reducing.

    Args:
        model: the model (or its DDP wrapper) whose parameters' ``.grad`` are observed.
        reduction: ``"mean"`` if each micro-loss is a per-sample mean divided by the number of
            micro-batches (or averaged over ranks by DDP), ``"sum"`` if micro-losses are sums.
        ema_decay: decay per step of the moving averages of ``|G|²`` and ``tr(Σ)``.
        block_steps: consecutive steps per block in the uncertainty estimate.
        scaler: an AMP ``GradScaler`` whose loss scale is divided out of the norms.
        dataset_size: the number of training samples, when batches are drawn without replacement
            from a dataset not much larger than the batch (finite-population correction).
        distributed: observe ranks instead of micro-batches; the default is on for a DDP model.
        process_group: the group of the all-reduces (default: the DDP model's, else the world).
        warn_batchnorm: warn once when BatchNorm in training mode normalises each micro-batch
            on its own, so that micro-batching changes what the model computes.
        every: observe one step in ``every`` (1: all); the others pass through untouched.
        max_overhead: single process only: the largest share of the wall time since the first
            step that the estimator's own calls may take (default 0.03; with what it costs
            outside its calls, under 5% of the step time). A step is observed only
            while the estimator is within it, so on a small model, where one observed step costs
            a large share of a step, it observes a fraction of the steps and the overhead stays
            at the budget. ``None`` observes every (``every``-th) step, and makes which steps are
            observed independent of timing. Under ``distributed`` the ranks must observe the same
            steps, so only ``every`` applies there.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduction: Reduction = "mean",
        ema_decay: float = DEFAULT_EMA_DECAY,
        block_steps: int = DEFAULT_BLOCK_STEPS,
        scaler: torch.amp.GradScaler | None = None,
        dataset_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        warn_batchnorm: bool = True,
        every: int = 1,
        max_overhead: float | None = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise BadInputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if reduction not in ("mean", "sum"):
            raise BadInputError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        if isinstance(ema_decay, bool) or not (
            isinstance(ema_decay, float | int) and 0.0 < ema_decay < 1.0
        ):
            raise BadInputError(f"ema_decay: expected a number in (0, 1), got {ema_decay!r}")
        check_positive_int("block_steps", block_steps)
        if dataset_size is not None:
            check_positive_int("dataset_size", dataset_size)
        check_positive_int("every", every)
        if max_overhead is not None:
            if isinstance(max_overhead, bool) or not (
                isinstance(max_overhead, float | int) and 0.0 < max_overhead <= 1.0
            ):
                raise BadInputError(
                    f"max_overhead: expected a share of the step time in (0, 1] or None, "
                    f"got {max_overhead!r}"
                )
            max_overhead = float(max_overhead)
        is_ddp = isinstance(model, DistributedDataParallel)
        self.distributed = is_ddp if distributed is None else bool(distributed)
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise BadInputError(
                "distributed: torch.distributed is not initialised; call init_process_group first"
            )
        self.reduction: Reduction = reduction
        self.ema_decay = float(ema_decay)
        self.block_steps = block_steps
        self.scaler = scaler
        self.dataset_size = dataset_size
        self.warn_batchnorm = warn_batchnorm
        self.every = every
        self.max_overhead = None if self.distributed else max_overhead
        self.warnings: list[str] = []
        self._skipped = 0
        # Sampling: whether the step in progress is observed (None: not decided yet), the
        # estimator's own wall time and the wall time since its first call.
        self._observing: bool | None = None
        self._unobserved = 0
        self._own_seconds = 0.0
        self._started: float | None = None
        self._model = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise BadInputError("model: it has no parameters that require gradients")
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, param in enumerate(self._params):
            groups.setdefault((param.device, param.dtype), []).append(index)
        self._groups = list(groups.values())
        self._group = process_group
        if (
            self.distributed
            and process_group is None
            and isinstance(model, DistributedDataParallel)
        ):
            self._group = model.process_group
        # Within a step: the accumulated gradients at the last record, each part's gradient norm.
        self._previous: list[torch.Tensor] | None = None
        self._part_norms: list[torch.Tensor] = []
        self._part_sizes: list[int] = []
        self._local_sq: torch.Tensor | None = None
        self._syncs = 0
        # Per-step raw values wait on the device until read back together.
        self._pending: list[tuple[int, torch.Tensor, tuple[Any, ...]]] = []
        self._calls = 0
        self._steps: list[int] = []
        self._gradient_sq: list[float] = []
        self._traces: list[float] = []
        self._history: list[NoiseScalePoint] = []
        self._ema = [0.0, 0.0]
        self._warned: set[str] = set()
        self._batchnorm_checked = False
        if self.distributed and isinstance(model, DistributedDataParallel):
            try:
                # A lambda: DDP rejects hooks whose annotations are strings (postponed here).
                model.register_comm_hook(
                    state=None, hook=lambda state, bucket: self._comm_hook(state, bucket)
                )
            except RuntimeError as exc:
                raise BadInputError(
                    "model: this DDP model already has a communication hook; pass "
                    "distributed=True with the inner model and call all_reduce_gradients() "
                    f"instead ({exc})"
                ) from exc

    # ----------------------------------------------------------------- single process

    def record_micro_batch(self, batch_size: int) -> None:
        """Note the gradient of the micro-batch whose backward just ran (``batch_size`` samples)."""
        if self._observing is False:  # a step passed through: as little work as possible
            return
        start = time.perf_counter()
        if self._observing is None:
            self._observing = self._decide(start)
        if self._observing:
            self._record(batch_size)
        self._own_seconds += time.perf_counter() - start

    def _record(self, batch_size: int) -> None:
        check_positive_int("batch_size", batch_size)
        if self.distributed:
            raise BadInputError(
                "record_micro_batch: in distributed mode a rank's batch is the small batch; "
                "call finish_step(batch_size=...) once per step instead"
            )
        grads = self._gradients("record_micro_batch")
        if grads[0].requires_grad:  # backward(create_graph=True): keep the copies off the graph
            grads = [g.detach() for g in grads]
        # One flat copy per (device, dtype) group: flattening is one call and the distance to the
        # previous copy another, which keeps the cost per micro-batch low.
        if len(self._groups) == 1:
            current = [_flat_copy(grads)]
        else:
            current = [_flat_copy([grads[i] for i in group]) for group in self._groups]
        previous = self._previous
        if self._part_sizes and previous is not None:
            norms = [_distance(new, old) for new, old in zip(current, previous, strict=True)]
        else:
            norms = [_norm(new) for new in current]
        self._part_norms.append(norms[0] if len(norms) == 1 else _combine(norms))
        self._part_sizes.append(batch_size)
        self._previous = current

    def _decide(self, now: float) -> bool:
        """Whether the step now starting is observed: every ``every``-th one, and in a single
        process only while the estimator's own time is within ``max_overhead`` of the time since
        its first call."""
        if self._started is None:
            self._started = now
        if self._calls % self.every:
            return False
        if self.max_overhead is None or self.distributed:
            return True
        return self._own_seconds <= self.max_overhead * (now - self._started)

    def _gradients(self, caller: str) -> list[torch.Tensor]:
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            if all(g is None for g in grads):
                raise BadInputError(
                    f"{caller}: no parameter has a gradient; call it after backward()"
                )
            # A parameter not used so far in this step: its accumulated gradient is zero.
            grads = [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self._params, grads, strict=True)
            ]
        if not self._part_sizes and any(g.is_sparse for g in grads):  # type: ignore[union-attr]
            raise BadInputError(
                f"{caller}: sparse gradients are not supported (an nn.Embedding with sparse=True?)"
            )
        return grads  # type: ignore[return-value]

    # ------------------------------------------------------------------- distributed

    def _comm_hook(self, state: object, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        local = torch.linalg.vector_norm(buffer.detach(), dtype=torch.float32).square()
        self._local_sq = local if self._local_sq is None else self._local_sq + local
        if bucket.is_last():
            self._syncs += 1
        group = self._group if self._group is not None else dist.group.WORLD
        buffer.div_(dist.get_world_size(group))
        work = dist.all_reduce(buffer, group=group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda fut: fut.value()[0])

    def all_reduce_gradients(self) -> None:
        """Average ``.grad`` over the ranks, after noting this rank's gradient (manual DDP)."""
        if not self.distributed:
            raise BadInputError("all_reduce_gradients: the estimator is not in distributed mode")
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            raise BadInputError("all_reduce_gradients: no parameter has a gradient yet")
        self._local_sq = _total_norm(grads).square()
        self._syncs += 1
        group = self._group if self._group is not None else dist.group.WORLD
        works = [dist.all_reduce(g, group=group, async_op=True) for g in grads]
        for work in works:
            assert work is not None
            work.wait()
        torch._foreach_div_(grads, float(dist.get_world_size(group)))

    # ------------------------------------------------------------------------- steps

    def finish_step(self, *, batch_size: int | None = None) -> None:
        """Close the step: call after the last backward and before gradient clipping,
        ``GradScaler.unscale_`` and ``optimizer.step()``.

        In distributed mode ``batch_size`` is this rank's samples in the step (required).
        """
        if self.distributed and batch_size is None:
            raise BadInputError(
                "batch_size: in distributed mode finish_step needs this rank's batch"
            )
        if self._observing is False:  # decided at the step's first micro-batch
            self._observing = None
            self._calls += 1
            self._unobserved += 1
            return
        start = time.perf_counter()
        observing = self._decide(start) if self._observing is None else self._observing
        self._observing = None
        self._calls += 1
        if observing:
            self._finish(batch_size)
        else:
            self._unobserved += 1
            self._local_sq, self._syncs = None, 0
        self._own_seconds += time.perf_counter() - start

    def _finish(self, batch_size: int | None) -> None:
        try:
            entry = self._distributed_entry(batch_size) if self.distributed else self._local_entry()
        finally:
            # The gradient copy lives only while a step accumulates.
            self._previous, self._part_norms, self._part_sizes = None, [], []
            self._local_sq, self._syncs = None, 0
        if entry is not None:
            self._pending.append((self._calls, *entry))
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush()

    def _local_entry(self) -> tuple[torch.Tensor, tuple[Any, ...]] | None:
        if len(self._part_sizes) < 2:
            self._warn_once(
                "parts",
                "the noise scale needs at least two micro-batches per step (gradient "
                "accumulation or a split batch) or distributed training; steps with one are "
                "not used",
            )
            return None
        self._check_batchnorm()
        assert self._previous is not None
        # After the last micro-batch the copy holds the step's accumulated gradient.
        big = [_norm(flat) for flat in self._previous]
        norms = [*self._part_norms, big[0] if len(big) == 1 else _combine(big)]
        values, scale = self._with_scale(norms)
        return values, ("local", tuple(self._part_sizes), scale)

    def _distributed_entry(
        self, batch_size: int | None
    ) -> tuple[torch.Tensor, tuple[Any, ...]] | None:
        if batch_size is None:
            raise BadInputError(
                "batch_size: in distributed mode finish_step needs this rank's batch"
            )
        check_positive_int("batch_size", batch_size)
        if self._local_sq is None:
            raise BadInputError(
                "finish_step: no rank gradient was seen this step; with a DDP model the "
                "all-reduce must run (not under no_sync), otherwise call all_reduce_gradients()"
            )
        if self._syncs > 1:
            self._warn_once(
                "syncs",
                "gradients were all-reduced more than once this step; use no_sync() for all but "
                "the last micro-batch, or a rank's gradient mixes averaged and local parts",
            )
        group = self._group if self._group is not None else dist.group.WORLD
        ranks = dist.get_world_size(group)
        local_sq = (
            self._local_sq.double() if self._local_sq.device.type == "cpu" else self._local_sq
        )
        if self.reduction == "sum":
            local_sq = local_sq / batch_size**2
        # The one collective the estimator adds: [Σ|g_r|², Σ 1/b_r, Σ b_r] over the ranks.
        shared = torch.stack(
            [local_sq, local_sq.new_tensor(1.0 / batch_size), local_sq.new_tensor(batch_size)]
        )
        dist.all_reduce(shared, group=group)
        big = _total_norm([p.grad.detach() for p in self._params if p.grad is not None])
        values, scale = self._with_scale([shared[0].sqrt(), big, shared[1], shared[2]])
        return values, ("ranks", ranks, scale)

    def _with_scale(self, values: list[torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        """Stack the step's values (with the AMP loss scale, when it is a device tensor)."""
        scaler = self.scaler
        scale: float | None = None
        if scaler is not None and scaler.is_enabled():
            current = getattr(scaler, "_scale", None)  # a device tensor: reading it needs no sync
            if isinstance(current, torch.Tensor):
                scale_value = current.detach().reshape(()).to(values[0].device, torch.float32)
                values = [*values, scale_value]
            else:
                scale = float(scaler.get_scale())
        try:
            return torch.stack(values), scale
        except RuntimeError:  # values on several devices
            device = values[0].device
            return torch.stack([v.to(device=device, dtype=torch.float32) for v in values]), scale

    def _flush(self) -> None:
        if not self._pending:
            return
        device = self._pending[0][1].device
        flat = torch.cat([values.to(device) for _, values, _ in self._pending]).tolist()
        offset = 0
        for call, values, meta in self._pending:
            row = flat[offset : offset + values.numel()]
            offset += values.numel()
            g2, trace = self._moments_of(row, meta)
            if not (math.isfinite(g2) and math.isfinite(trace)):
                self._skipped += 1  # an AMP overflow or a diverging step
                continue
            self._steps.append(call)
            self._gradient_sq.append(g2)
            self._traces.append(trace)
            beta = self.ema_decay
            self._ema = [
                beta * self._ema[0] + (1 - beta) * g2,
                beta * self._ema[1] + (1 - beta) * trace,
            ]
            correction = 1.0 - beta ** len(self._steps)
            g2_ema, trace_ema = self._ema[0] / correction, self._ema[1] / correction
            self._history.append(
                NoiseScalePoint(call, _ratio(trace_ema, g2_ema), g2_ema, trace_ema)
            )
        self._pending = []

    def _moments_of(self, row: list[float], meta: tuple[Any, ...]) -> tuple[float, float]:
        """Unbiased (|G|², tr Σ) of one step from its read-back norms."""
        kind, shape, scale = meta
        if scale is None and len(row) > (len(shape) + 1 if kind == "local" else 4):
            scale = row.pop()  # the loss scale travelled with the norms
        try:
            small_sq, big_sq, inv_small, inv_big = self._raw_moments(kind, shape, row, scale)
        except (ZeroDivisionError, OverflowError):
            return math.nan, math.nan
        if not (inv_small > inv_big and math.isfinite(small_sq) and math.isfinite(big_sq)):
            return math.nan, math.nan
        return _moments(small_sq, big_sq, inv_small, inv_big)

    def _raw_moments(
        self, kind: str, shape: Any, row: list[float], scale: float | None
    ) -> tuple[float, float, float, float]:
        """``(|G_b|², |G_B|², 1/b, 1/B)`` in per-sample-mean units, the loss scale divided out."""
        if kind == "local":
            sizes = shape
            parts = len(sizes)
            part_sq = [n * n for n in row[:parts]]
            big_sq = row[parts] ** 2
            total = float(sum(sizes))
            inv_small = sum(1.0 / b for b in sizes) / parts
            if self.reduction == "mean":
                # Each micro-loss was divided by the number of parts: undo it.
                small_sq = parts**2 * sum(part_sq) / parts
                inv_big = inv_small / parts
            else:
                small_sq = sum(sq / b**2 for sq, b in zip(part_sq, sizes, strict=True)) / parts
                big_sq /= total**2
                inv_big = 1.0 / total
            harmonic = 1.0 / inv_small
        else:
            ranks = shape
            local_sq, big_norm, inv_sum, total = row[0] ** 2, row[1], row[2], row[3]
            small_sq, inv_small = local_sq / ranks, inv_sum / ranks
            big_sq = big_norm**2
            if self.reduction == "mean":
                inv_big = inv_small / ranks
            else:
                # DDP averaged the ranks' sums: the global mean is ranks/B of that average.
                big_sq *= ranks**2 / total**2
                inv_big = 1.0 / total
            harmonic = 1.0 / inv_small
        if scale is not None:
            small_sq /= scale**2
            big_sq /= scale**2
        if self.dataset_size is not None:
            inv_small = _finite_population(harmonic, self.dataset_size)
            inv_big = _finite_population(total, self.dataset_size)
        return small_sq, big_sq, inv_small, inv_big

    # ----------------------------------------------------------------------- results

    @property
    def skipped_steps(self) -> int:
        """Steps left out of the estimate because a norm was not finite (AMP overflow)."""
        self._flush()
        return self._skipped

    @property
    def steps(self) -> int:
        """Steps that entered the estimate so far."""
        self._flush()
        return len(self._steps)

    @property
    def unobserved_steps(self) -> int:
        """Steps passed through without being observed (``every``, ``max_overhead``)."""
        return self._unobserved

    @property
    def history(self) -> tuple[NoiseScalePoint, ...]:
        """The running estimate after every step that entered it."""
        self._flush()
        return tuple(self._history)

    def estimate(self, *, up_to: int | None = None) -> NoiseScaleEstimate:
        """The current estimate: bias-corrected EMAs of ``|G|²`` and ``tr(Σ)`` and their ratio.

        ``up_to``: the estimate as it stood after optimizer step ``up_to`` (counted from 1), from
        the steps observed until then.
        """
        self._flush()
        kept = len(self._steps)
        if up_to is not None:
            kept = sum(1 for step in self._steps if step <= up_to)
        if not kept:
            nan = math.nan
            return NoiseScaleEstimate(nan, (nan, nan), nan, nan, 0, self._skipped, self._unobserved)
        _, interval = ratio_interval(
            self._gradient_sq[:kept],
            self._traces[:kept],
            ema_decay=self.ema_decay,
            block_steps=self.block_steps,
        )
        last = self._history[kept - 1]
        return NoiseScaleEstimate(
            noise_scale=last.noise_scale,
            noise_scale_interval=interval,
            gradient_sq_norm=last.gradient_sq_norm,
            trace_covariance=last.trace_covariance,
            steps=kept,
            skipped_steps=self._skipped,
            unobserved_steps=self._unobserved,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the estimate in a resumed run."""
        self._flush()
        return {
            "ema_decay": self.ema_decay,
            "block_steps": self.block_steps,
            "calls": self._calls,
            "skipped_steps": self._skipped,
            "unobserved_steps": self._unobserved,
            "steps": list(self._steps),
            "gradient_sq_norms": list(self._gradient_sq),
            "traces": list(self._traces),
            "ema": list(self._ema),
            "history": [asdict(point) for point in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self._pending = []
        self.ema_decay = float(state["ema_decay"])
        self.block_steps = int(state["block_steps"])
        self._calls = int(state["calls"])
        self._skipped = int(state["skipped_steps"])
        self._unobserved = int(state.get("unobserved_steps", 0))
        self._steps = [int(s) for s in state["steps"]]
        self._gradient_sq = [float(v) for v in state["gradient_sq_norms"]]
        self._traces = [float(v) for v in state["traces"]]
        self._ema = [float(v) for v in state["ema"]]
        self._history = [NoiseScalePoint(**point) for point in state["history"]]

    def release(self) -> None:
        """Free the gradient copy kept between micro-batches (a step in progress is dropped)."""
        self._previous, self._part_norms, self._part_sizes = None, [], []
        self._observing = None

    # ----------------------------------------------------------------------- helpers

    def _check_batchnorm(self) -> None:
        # Checked once: walking the modules every step would cost more than the estimate.
        if not self.warn_batchnorm or self._batchnorm_checked:
            return
        self._batchnorm_checked = True
        training_norms = [
            name or type(module).__name__
            for name, module in self._model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        ]
        if training_norms:
            others = f" and {len(training_norms) - 1} more" if len(training_norms) > 1 else ""
            self._warn_once(
                "batchnorm",
                f"BatchNorm in training mode (module {training_norms[0]!r}{others}) normalises "
                "each micro-batch with its own statistics, so micro-batches do not compute what "
                "the whole batch would: the noise scale describes training with BatchNorm over "
                "micro-batches",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(message)
        warnings.warn(message, NoiseScaleWarning, stacklevel=4)


def _flat_copy(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:  # flattening one tensor returns a view, which backward would change
        return tensors[0].detach().reshape(-1).clone()
    return _flatten_dense_tensors(tensors)


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor, dtype=torch.float32)


def _distance(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    if current.dtype == torch.float32:
        return torch.dist(current, previous)
    if current.dtype == torch.float64:
        return torch.dist(current, previous).float()
    return _norm(current - previous)  # half precision: take the norm in float32


def _total_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, accumulated in float32 whatever their dtype."""
    return _combine(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))


def _combine(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.linalg.vector_norm(torch.stack(list(norms)))
    except RuntimeError:  # parameters on several devices
        device = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _finite_population(batch: float, dataset_size: int) -> float:
    """``1/b · (N − b)/(N − 1)``: the variance factor of a mean of ``b`` of ``N`` samples drawn
    without replacement (``1/b`` with replacement)."""
    if dataset_size <= 1 or batch >= dataset_size:
        return 0.0
    return (dataset_size - batch) / (batch * (dataset_size - 1))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


def critical_batch_over_run(
    history: Sequence[NoiseScalePoint], *, batch: int, dataset_size: int | None = None
) -> float:
    """The critical batch of a whole run at ``batch``, from the noise scale along it.

    Locally ``S = S_min (1 + B_noise/B)``: a step at batch ``B`` makes ``1/(1 + B_noise/B)`` of the
    progress of a step at an unlimited batch. Summed over the run, ``S_min = Σ 1/(1 + B_noise,t/B)``
    and ``S = S_min (1 + B_crit/B)`` give ``B_crit = B (S/S_min − 1)``: the mean of the noise scale
    weighted by progress (McCandlish et al. 2018, appendix D). It is what the steps-to-target of a
    run predicts; the noise scale at the end of a run is larger, at the start smaller.

    Each point stands for the steps since the one before it (an estimator that observes one step
    in four gives points four steps apart). With ``dataset_size`` N the batch's noise is the
    finite-population ``B_noise (N − B)/(B (N − 1))`` instead of ``B_noise/B``, and the result is
    the ``B_crit`` of ``S = S_N (1 + B_crit (N − B)/(B (N − 1)))`` (the law of batches drawn
    without replacement; at ``B = N`` the progress-weighted mean itself).

    >>> points = [NoiseScalePoint(t, b, 1.0, b) for t, b in enumerate([10.0, 30.0], start=1)]
    >>> round(critical_batch_over_run(points, batch=10), 3)
    16.667
    """
    check_positive_int("batch", batch)
    if not history:
        return math.nan
    factor = 1.0 / batch if dataset_size is None else _finite_population(batch, dataset_size)
    spans, previous = [], 0
    for point in history:
        spans.append(max(point.step - previous, 1))
        previous = point.step
    if factor == 0.0:  # the whole dataset: no gradient noise, every step ideal
        finite = [(s, p.noise_scale) for s, p in zip(spans, history, strict=True)]
        finite = [(s, b) for s, b in finite if math.isfinite(b)]
        if not finite:
            return math.inf
        return sum(s * b for s, b in finite) / sum(s for s, _ in finite)
    # An infinite noise scale (no measurable signal) makes no progress: weight 0.
    weights = [
        0.0 if math.isinf(p.noise_scale) else 1.0 / (1.0 + p.noise_scale * factor) for p in history
    ]
    ideal_steps = sum(s * w for s, w in zip(spans, weights, strict=True))
    if ideal_steps <= 0:
        return math.inf
    return (sum(spans) / ideal_steps - 1.0) / factor


# ----------------------------------------------------------------------------- measurement


# The window of a measuring run (``window=True``). The progress signal is the loss on the first
# EVAL_SAMPLES validation samples (the training loss when the task has none), evaluated after
# every step up to step 10, then every WINDOW_SPACING of the steps so far: ~24 points per decade
# of steps, fine enough for a task that reaches its best in 15 steps and cheap for one that needs
# thousands.
EVAL_SAMPLES = PROGRESS_SAMPLES  # the signal the lr check's runs follow to the window's loss
WINDOW_SPACING = 0.2
# The float32 resolution: a loss is not taken as a target below this fraction of where its run
# started (``NoiseScaleResult.target_loss``), its digits there being rounding.
ROUNDING_LEVEL = float(torch.finfo(torch.float32).eps)
# The run stops early once the progress signal has clearly risen from its best (the mean of its
# last 3 points above the best by 3 times its noise about the trend since) while the training
# loss kept falling (by 2 standard errors; overfitting, not a plateau's wander), no sooner than half again as many
# steps as it took to reach its best: early stopping on overfitting, its patience relative to the
# task's own pace instead of a fixed count.
WINDOW_PATIENCE = 1.5
# ... or once the second half of the run has bought less than this share of its (log-loss)
# progress, the loss having at least halved: it has flattened, wherever the machine's speed put
# the time budget.
DIMINISHING_RETURNS = 0.05
# The shortest window: 1.5 time constants of the default moving averages (1 / (1 − 0.95) = 20
# steps), and past the first quick drop of a loss that then sits on a plateau for a while.
MIN_WINDOW_STEPS = 30

PlanQuantity = Literal["critical batch over the window", "noise scale at the end of the window"]
TargetSource = Literal["descent", "rounding", "window"]


@dataclass(frozen=True)
class NoiseScaleResult:
    """The noise scale measured during a short training run of a task.

    ``noise_scale`` and its interval are the estimate at the end of the *window*: with
    ``window=True`` the steps up to the best value of the progress signal (once it fell by more
    than its jitter), else the whole run; ``plateau`` says the run stopped because the signal rose
    after its best. ``critical_batch`` is the progress-weighted noise
    scale over the window (:func:`critical_batch_over_run`), the ``B_crit`` of
    ``S(B) = S_min (1 + B_crit/B)`` for the loss the window ended at. ``plan_noise_scale`` is the
    one a plan should use — that critical batch (``plan_quantity`` says so; without one, the noise
    scale at the window's end) — and ``plan_interval`` its approximate 95 % interval. When the
    window ends at the run's last step the loss was still falling: the noise scale grows as
    training goes on, so the critical batch of a longer run is larger.
    """

    task: str
    batch: int
    micro_batch: int
    micro_batches: int
    lr: float
    steps: int
    noise_scale: float
    noise_scale_interval: tuple[float, float]
    critical_batch: float
    gradient_sq_norm: float
    trace_covariance: float
    skipped_steps: int
    history: tuple[NoiseScalePoint, ...]
    train_losses: tuple[float, ...]
    seconds: float
    diverged: bool
    warnings: tuple[str, ...]
    window_steps: int = 0
    window_reason: str = ""
    plateau: bool = False
    progress: tuple[tuple[int, float], ...] = ()
    progress_split: str = "train"
    plan_noise_scale: float = math.nan
    plan_interval: tuple[float, float] = (math.nan, math.nan)
    plan_quantity: PlanQuantity = "noise scale at the end of the window"
    precision: str = "32"

    @property
    def window_loss(self) -> float | None:
        """The progress signal where the window ends: the median of its last three points up to
        the window's end (one low point of a noisy signal does not set it), or None without a
        progress signal."""
        points = [loss for step, loss in self.progress if step <= self.window_steps]
        points = [loss for loss in points if math.isfinite(loss)]
        if not points:
            return None
        return float(statistics.median(points[-3:]))

    @property
    def target_loss(self) -> float | None:
        """The loss the later checks train to (the lr check's steps to it, the critical batch
        at two batches): the loss at which the noise run had made all but
        ``DIMINISHING_RETURNS`` of its log-loss progress from where it started (its first
        progress point) to the window's loss, and never below ``ROUNDING_LEVEL`` of where it
        started.

        The window ends where the loss stopped falling: at a noise floor (label noise, the lr's
        own floor) or overfitting, whose level another run crosses, or not, by the luck of its
        fluctuations. A little above it the loss is still on its descent, crossed once and
        decisively, so steps to it rank lrs by speed, not by luck; the last 5 % is the same
        share by which the window judged the run's progress to have flattened. A loss lowered
        by float32's resolution (ε = 1.2e-7, seven digits) has converged for any practical
        purpose, and below it the loss's digits are rounding (a realizable task's window ends
        at the float floor, 1e-13 from 5)."""
        return self._target()[0]

    @property
    def target_source(self) -> TargetSource | None:
        """Which rule set :attr:`target_loss`: "descent" (all but ``DIMINISHING_RETURNS`` of the
        progress to the window's loss), "rounding" (float32's resolution), or "window" (the
        window's own loss, when the run made no progress to measure a share of)."""
        return self._target()[1]

    def _target(self) -> tuple[float | None, TargetSource | None]:
        window = self.window_loss
        if window is None or not self.progress or not math.isfinite(self.progress[0][1]):
            return window, None if window is None else "window"
        start = self.progress[0][1]
        target: float = window
        source: TargetSource = "window"
        if 0 < window < start:
            target = math.exp(math.log(window) + DIMINISHING_RETURNS * math.log(start / window))
            source = "descent"
        if ROUNDING_LEVEL * start > target:
            return ROUNDING_LEVEL * start, "rounding"
        return target, source

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_loss"] = self.window_loss
        data["target_loss"] = self.target_loss
        data["target_source"] = self.target_source
        data["noise_scale_interval"] = list(self.noise_scale_interval)
        data["plan_interval"] = list(self.plan_interval)
        data["history"] = [asdict(point) for point in self.history]
        data["train_losses"] = list(self.train_losses)
        data["progress"] = [list(point) for point in self.progress]
        data["warnings"] = list(self.warnings)
        return data


class _Window:
    """Decides a measuring run's window from its progress signal: where it was best, and whether
    it has clearly turned up since (overfitting)."""

    def __init__(
        self,
        *,
        min_steps: int,
        epoch_steps: int = 0,
        reach: tuple[float, int] | None = None,
    ) -> None:
        self.min_steps = min_steps
        # Within the first epoch every batch is scored before the model trains on it, so the
        # training loss is itself a held-out estimate: a validation loss that rises then is the
        # noise of its subset, not overfitting.
        self.epoch_steps = epoch_steps
        # (loss, steps): another run of this lr and batch reached ``loss`` within ``steps``, so
        # the run does not stop early above it before twice those steps.
        self.reach = reach
        self.points: list[tuple[int, float]] = []
        self.best: tuple[int, float] | None = None
        self.next_eval = 1

    def due(self, step: int) -> bool:
        return step >= self.next_eval

    def add(self, step: int, loss: float, train_losses: Sequence[float] = ()) -> str | None:
        """Record the signal after ``step``; why the run may stop, or None.

        ``"overfitting"``: the signal has clearly risen since its best while the training loss
        (``train_losses``, one per step so far) kept falling, not the wander of a loss on a
        plateau. ``"diminishing returns"``: the second half of the run bought less than
        ``DIMINISHING_RETURNS`` of its progress (:meth:`diminishing`).
        """
        self.points.append((step, loss))
        self.next_eval = step + max(1, int(WINDOW_SPACING * step))
        if math.isfinite(loss) and (self.best is None or loss < self.best[1]):
            self.best = (step, loss)
        if self.best is None or self.short_of_reach(step):
            return None
        if self.diminishing(step):
            return "diminishing returns"
        return "overfitting" if self.overfitting(step, train_losses) else None

    def short_of_reach(self, step: int) -> bool:
        """Whether the best signal is still above the loss another run of the same lr and batch
        reached (``reach``) and the run is within twice that run's steps: evidence that the loss
        goes lower, so neither early stop may fire yet."""
        if self.reach is None or self.best is None:
            return False
        loss, steps = self.reach
        return self.best[1] > loss and step < 2 * steps

    def diminishing(self, step: int) -> bool:
        """Whether the best signal since half-way is within ``DIMINISHING_RETURNS`` of the
        run's whole progress, measured in log-loss (a loss that falls as a power of the steps
        keeps a steady share and never stops; one that flattens does), once the loss has at
        least halved; never for a signal that is not positive."""
        assert self.best is not None
        if step < 2 * self.min_steps or not self.progressed():
            return False
        first = self.points[0][1]
        half = [v for s, v in self.points if s <= step / 2 and math.isfinite(v)]
        if not half:
            return False
        at_half, best = min(half), self.best[1]
        if min(first, at_half, best) <= 0:
            return False  # no log scale to judge progress on: the other rules decide
        gained, total = math.log(at_half / best), math.log(first / best)
        # a loss that has not even halved has not converged to anything: it may sit on a
        # plateau (or the lr be too low), so only the other rules may end its run
        return total >= math.log(2.0) and gained < DIMINISHING_RETURNS * total

    def overfitting(self, step: int, train_losses: Sequence[float]) -> bool:
        assert self.best is not None
        if step < max(self.min_steps, WINDOW_PATIENCE * self.best[0]) or step <= self.epoch_steps:
            return False
        after = [v for s, v in self.points if s > self.best[0]]
        if len(after) < 3 or not all(math.isfinite(v) for v in after) or not self.progressed():
            return False
        if sum(after[-3:]) / 3 - self.best[1] <= 3 * _jitter([self.best[1], *after]):
            return False
        return not train_losses or _still_falling(train_losses, self.best[0])

    def progressed(self) -> bool:
        """Whether the signal fell by more than its own jitter: the drop from the first point to
        the best exceeds 3 times the noise about its trend (:func:`_jitter`). A loss that sits on
        a plateau (or an lr too low to move it) is no window's end."""
        if self.best is None or len(self.points) < 3:
            return False
        values = [v for _, v in self.points if math.isfinite(v)]
        return self.points[0][1] - self.best[1] > 3 * _jitter(values)

    def end(self, steps_run: int) -> int:
        """The window's last step: the signal's best (once it fell for real), else the run's end."""
        if self.best is None or not self.progressed():
            return steps_run
        return min(steps_run, max(self.best[0], self.min_steps))


def _still_falling(losses: Sequence[float], since: int) -> bool:
    """Whether the mean training loss of the steps after step ``since`` is below that of as many
    steps before it by more than 2 standard errors."""
    after = list(losses[since:])
    before = list(losses[max(0, since - len(after)) : since])
    if len(after) < 2 or len(before) < 2:
        return False

    def mean_var(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)

    (m_after, v_after), (m_before, v_before) = mean_var(after), mean_var(before)
    return m_after < m_before - 2 * math.sqrt(v_after + v_before)


def _jitter(values: Sequence[float]) -> float:
    """The noise of a series about its trend: the standard deviation implied by the median
    absolute second difference (white noise of σ has second differences of σ√6, median
    0.6745·σ√6), blind to a steady rise or fall."""
    seconds = sorted(
        abs(c - 2 * b + a) for a, b, c in zip(values, values[1:], values[2:], strict=False)
    )
    if not seconds:
        return 0.0
    return seconds[len(seconds) // 2] / (0.6745 * math.sqrt(6.0))


def check_split(task: Task, *, batch: int, micro_batches: int) -> int:
    """The micro-batch of ``batch`` split in ``micro_batches`` equal parts, or a one-line error.

    >>> from batchpilot.loading import load_task
    >>> check_split(load_task(example="xor4"), batch=16, micro_batches=4)
    4
    """
    check_positive_int("batch", batch)
    check_positive_int("micro_batches", micro_batches)
    if micro_batches < 2:
        raise BadInputError(
            f"micro_batches: expected at least 2 (two batch sizes per step), got {micro_batches}"
        )
    if batch % micro_batches:
        raise BadInputError(
            f"batch: {batch} is not a multiple of micro_batches {micro_batches} "
            f"(nearest: {batch // micro_batches * micro_batches or micro_batches})"
        )
    if batch > task.train_size:
        raise BadInputError(
            f"batch: {batch} is larger than the training set ({task.train_size} samples)"
        )
    return batch // micro_batches


def _plan_noise(
    noise: GradientNoiseScale, critical: float, window_end: int, plateau: bool
) -> tuple[PlanQuantity, float, tuple[float, float]]:
    """The noise scale a plan should use, which one it is, and its interval.

    The window's critical batch, with the relative interval of the window's pooled ratio
    ``Σ tr(Σ) / Σ |G|²`` (its steps unweighted, blocks for correlation): an average over the
    window is far steadier than the moving average at its end. Without a measurable critical
    batch, the noise scale at the end and its interval.
    """
    kept = sum(1 for step in noise._steps if step <= window_end)
    if kept and math.isfinite(critical) and critical > 0:
        pooled, (low, high) = ratio_interval(
            noise._gradient_sq[:kept],
            noise._traces[:kept],
            ema_decay=1.0,
            block_steps=noise.block_steps,
        )
        if math.isfinite(pooled) and pooled > 0:
            return (
                "critical batch over the window",
                critical,
                (
                    critical * low / pooled,
                    critical * high / pooled,
                ),
            )
    estimate = noise.estimate(up_to=window_end)
    return (
        "noise scale at the end of the window",
        estimate.noise_scale,
        estimate.noise_scale_interval,
    )


def measure_noise_scale(
    task: Task,
    *,
    batch: int,
    steps: int,
    lr: float,
    micro_batches: int = 4,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ema_decay: float = DEFAULT_EMA_DECAY,
    block_steps: int = DEFAULT_BLOCK_STEPS,
    on_step: Callable[[int, float], None] | None = None,
    window: bool = False,
    min_steps: int = MIN_WINDOW_STEPS,
    time_budget_seconds: float | None = None,
    reach: tuple[float, int] | None = None,
) -> NoiseScaleResult:
    """Train a fresh model of ``task`` for up to ``steps`` steps at global ``batch`` and learning
    rate ``lr``, splitting each batch into ``micro_batches`` equal micro-batches (accumulated, so
    the step is the step at ``batch``), and return the noise scale measured along the way.

    With ``window=True`` the run's own progress decides its length: the loss on the first
    ``EVAL_SAMPLES`` validation samples (the training loss without validation data) is followed
    on a geometric schedule; the window ends at the signal's best step (at least ``min_steps``),
    and the run stops early once the signal has clearly risen from that best, no sooner than
    ``WINDOW_PATIENCE`` times the steps it took to get there, while the training loss kept
    falling (overfitting, not the wander of a loss on a plateau), or once the steps since half-way
    lowered it by less than ``DIMINISHING_RETURNS`` of its log-loss progress (a flattened loss: a
    window set by progress, not by how fast the machine runs). A fast task is measured where it
    reaches its best, not after it has begun to overfit; a slow one runs until ``steps`` or
    ``time_budget_seconds``. A signal that has not fallen by more than its own jitter (a plateau,
    or an lr too low to move it) keeps the whole run as the window. Overfitting is never called
    within the first epoch (each batch is scored before the model trains on it, so the training
    loss is a held-out estimate then). ``reach=(loss, steps)`` is evidence from another run of this
    lr and batch (``tune``'s reference check): it reached ``loss`` within ``steps``, so neither
    early stop fires while the signal is above it and the run within twice those steps (a loss
    resting on a plateau is not taken for converged when a run has been seen to leave it).

    The run draws from ``seed`` and leaves the caller's RNG as it was. A non-finite loss stops it
    (``diverged``). ``on_step(step, loss)`` is called after each step. The loss runs in the task's
    precision; under ``"16-mixed"`` a step whose gradients overflowed is skipped by the
    ``GradScaler`` and left out of the estimate (``skipped_steps``).
    """
    micro = check_split(task, batch=batch, micro_batches=micro_batches)
    check_run_steps("steps", steps)
    check_positive_int("min_steps", min_steps)
    lr = check_positive_float("lr", lr)
    if time_budget_seconds is not None:
        check_positive_float("time_budget_seconds", time_budget_seconds)
    device = torch.device(device)
    split = "val" if task.val_data is not None else "train"
    if reach is not None:
        reach = (float(reach[0]), check_positive_int("reach steps", reach[1]))
    tracker = _Window(
        min_steps=min_steps, epoch_steps=math.ceil(task.train_size / batch), reach=reach
    )
    with preserved_rng():
        torch.manual_seed(seed)
        model = task.make_model(device)
        check_trainable(model)
        model.train()
        optimizer = task.make_optimizer(model.parameters(), lr)
        # "16-mixed": the estimator reads the scaled gradients and divides the scale out; the
        # scaler unscales them after it, before the step
        scaler = make_scaler(task.precision, device)
        noise = GradientNoiseScale(
            model,
            scaler=scaler,
            reduction=task.reduction,
            ema_decay=ema_decay,
            block_steps=block_steps,
            dataset_size=task.train_size,
            max_overhead=None,  # a measuring run: every step counts
        )
        source = micro_batch_source(task, micro, seed=seed)
        losses: list[float] = []
        diverged = plateau = False
        reason = f"the step limit, {steps} steps"
        start = time.perf_counter()
        since_eval: list[float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoiseScaleWarning)  # kept in the result instead
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                total, samples = 0.0, 0
                for _ in range(micro_batches):
                    part = to_device(next(source), device)
                    loss = task.compute_loss(model, part)
                    backward(loss / micro_batches if task.reduction == "mean" else loss, scaler)
                    n = samples_in(part)
                    noise.record_micro_batch(n)
                    value = float(loss.detach())
                    total += value * n if task.reduction == "mean" else value
                    samples += n
                mean_loss = total / samples
                if not math.isfinite(mean_loss):
                    diverged = True
                    reason = f"divergence at step {step + 1}"
                    break
                noise.finish_step()
                optimizer_step(optimizer, scaler)
                losses.append(mean_loss)
                since_eval.append(mean_loss)
                if on_step is not None:
                    on_step(step, mean_loss)
                done = step + 1
                if window and tracker.due(done):
                    if split == "val":
                        signal = evaluate(task, model, device=device, max_samples=EVAL_SAMPLES).loss
                    else:
                        signal = sum(since_eval) / len(since_eval)
                    since_eval = []
                    stop = tracker.add(done, signal, losses if split == "val" else ())
                    if stop is not None:
                        plateau = True
                        assert tracker.best is not None
                        if stop == "overfitting":
                            reason = (
                                f"the {split} loss rose after step {tracker.best[0]} "
                                f"(overfitting; no lower value in the "
                                f"{done - tracker.best[0]} steps since)"
                            )
                        else:
                            reason = (
                                f"diminishing returns: steps {done // 2}–{done} lowered the "
                                f"{split} loss by less than {DIMINISHING_RETURNS:.0%} of its "
                                "(log) progress so far"
                            )
                        break
                if (
                    time_budget_seconds is not None
                    and time.perf_counter() - start > time_budget_seconds
                ):
                    reason = f"the time budget, {time_budget_seconds:.3g} s"
                    break
        seconds = time.perf_counter() - start
        window_end = tracker.end(len(losses)) if window else len(losses)
        estimate = noise.estimate(up_to=window_end)
        history = noise.history
        in_window = tuple(p for p in history if p.step <= window_end)
        critical = critical_batch_over_run(in_window, batch=batch, dataset_size=task.train_size)
        quantity, planned, interval = _plan_noise(noise, critical, window_end, plateau)
        noise.release()
        del model, optimizer
    return NoiseScaleResult(
        task=task.name,
        batch=batch,
        micro_batch=micro,
        micro_batches=micro_batches,
        lr=lr,
        steps=len(losses),
        noise_scale=estimate.noise_scale,
        noise_scale_interval=estimate.noise_scale_interval,
        critical_batch=critical,
        gradient_sq_norm=estimate.gradient_sq_norm,
        trace_covariance=estimate.trace_covariance,
        skipped_steps=estimate.skipped_steps,
        history=history,
        train_losses=tuple(losses),
        seconds=seconds,
        diverged=diverged,
        warnings=tuple(noise.warnings),
        window_steps=window_end,
        window_reason=reason,
        plateau=plateau,
        progress=tuple(tracker.points),
        progress_split=split,
        plan_noise_scale=planned,
        plan_interval=interval,
        plan_quantity=quantity,
        precision=task.precision,
    )


__all__ = [
    "GradientNoiseScale",
    "NoiseScaleEstimate",
    "NoiseScalePoint",
    "NoiseScaleResult",
    "NoiseScaleWarning",
    "PlanQuantity",
    "check_split",
    "critical_batch_over_run",
    "measure_noise_scale",
    "ratio_interval",
    "unbiased_moments",
]
