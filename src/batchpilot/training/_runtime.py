"""Applying a batch schedule in a running loop: the lr of every param group, accumulation raised on
out-of-memory, and every DDP rank in agreement.

:class:`BatchRuntime` takes a :class:`~batchpilot.training._schedules.BatchSetting` (from a schedule or
:class:`~batchpilot.training._adaptive.AdaptiveBatch`), sets the lr of every param group (keeping the ratios
between groups), and runs one optimizer step's forward/backward passes over the rank's batch in as
many micro-batches as the memory limit needs. An out-of-memory error lowers the limit and retries
the step with more accumulation steps — the global batch and the lr stay what the schedule said.

Under ``torch.distributed`` the setting is broadcast from rank 0, micro-batches run without
gradient synchronisation, and before the gradients are averaged the ranks exchange one small
tensor: whether any ran out of memory (then all step down to the same smaller micro-batch and
retry together, instead of one rank waiting forever in an all-reduce), and their sample counts
(so that the average is over the global batch even when ranks got unequal parts)::

    runtime = BatchRuntime(optimizer, base_lr=0.1, max_micro_batch=256, model=ddp_model)
    for indices in loader:                      # ScheduledBatchSampler as batch_sampler
        runtime.apply(schedule.at(sampler.epoch_progress))
        optimizer.zero_grad()
        runtime.run_step(batch, lambda micro, weight: backward(micro, weight))
        optimizer.step()

>>> import torch
>>> opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
...                        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
>>> apply_lr(opt, 0.2, base_lr=0.1)
>>> [group["lr"] for group in opt.param_groups]
[0.2, 0.02]
>>> [part.shape[0] for part in split_micro_batches(torch.zeros(10, 3), 3)]
[4, 3, 3]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.data import batch_size as samples_in
from batchpilot.devices import release_memory
from batchpilot.errors import BadInputError
from batchpilot.oom import is_out_of_memory
from batchpilot.plan._split import split_batch
from batchpilot.training._schedules import BatchSetting

# The key under which each param group's own lr at the first apply_lr is kept (saved with the
# optimizer's state_dict, so a resumed run scales the same base).
BASE_LR_KEY = "batchpilot_base_lr"

ForwardBackward = Callable[[Any, float], "torch.Tensor | float | None"]


def apply_lr(optimizer: torch.optim.Optimizer, lr: float, *, base_lr: float) -> None:
    """Set every param group's lr to its own base lr × ``lr / base_lr``.

    A group's base lr is its lr at the first call (kept in the group under ``BASE_LR_KEY``), so
    groups with different lrs (a backbone at 0.1×, say) keep their ratio.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BadInputError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    base_lr = check_positive_float("base_lr", base_lr)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise BadInputError(f"lr: expected a number ≥ 0, got {lr!r}")
    factor = lr / base_lr
    for group in optimizer.param_groups:
        current = group["lr"]
        if BASE_LR_KEY not in group:
            group[BASE_LR_KEY] = float(current)
        value = group[BASE_LR_KEY] * factor
        if isinstance(current, torch.Tensor):  # capturable / fused optimizers keep lr as a tensor
            current.fill_(value)
        else:
            group["lr"] = value


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr of each param group, as floats."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def split_micro_batches(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut along its first dimension into ``parts`` micro-batches (sizes differ by at most
    one; fewer parts when the batch has fewer samples). Tensors in tuples, lists and dicts are cut
    together; other values are shared by every part.
    """
    check_positive_int("parts", parts)
    size = samples_in(batch)
    parts = max(1, min(parts, size))
    if parts == 1:
        return [batch]
    return [_take(batch, index, parts) for index in range(parts)]


def _take(batch: Any, index: int, parts: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        return torch.tensor_split(batch, parts)[index]
    if isinstance(batch, Mapping):
        return type(batch)({k: _take(v, index, parts) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(v, index, parts) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_take(v, index, parts) for v in batch)
    return batch


def resplit(
    setting: BatchSetting, *, max_micro_batch: int | None, world_size: int | None = None
) -> BatchSetting:
    """``setting`` with its micro-batch lowered to ``max_micro_batch`` (when above it) and the
    accumulation steps raised to keep the global batch exactly (by :func:`batchpilot.plan.split_batch`,
    the largest micro-batch that divides it); batch and lr are unchanged.

    >>> from batchpilot.training._schedules import BatchSetting
    >>> resplit(BatchSetting(256, 0.1, 256, 1, 1, 1.0), max_micro_batch=100)
    BatchSetting(batch=256, lr=0.1, micro_batch=64, accumulation_steps=4, world_size=1, noise_reduction=1.0)
    """
    world = (
        setting.world_size if world_size is None else check_positive_int("world_size", world_size)
    )
    if max_micro_batch is not None:
        check_positive_int("max_micro_batch", max_micro_batch)
    fits = max_micro_batch is None or setting.micro_batch <= max_micro_batch
    if fits and world == setting.world_size:
        return setting
    limit = min(setting.micro_batch, max_micro_batch or setting.micro_batch)
    split = split_batch(
        setting.batch, max_micro_batch=limit, world_size=world, exact=setting.batch % world == 0
    )
    return BatchSetting(
        batch=setting.batch,
        lr=setting.lr,
        micro_batch=split.micro_batch,
        accumulation_steps=split.accumulation_steps,
        world_size=world,
        noise_reduction=setting.noise_reduction,
    )


# ----------------------------------------------------------------------- distributed


def distributed_world(group: Any = None) -> tuple[int, int]:
    """``(world_size, rank)`` in ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def broadcast_object(value: Any, *, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s ``value`` on every rank (the value itself when not distributed)."""
    world, _ = distributed_world(group)
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_setting(setting: BatchSetting, *, src: int = 0, group: Any = None) -> BatchSetting:
    """Rank ``src``'s setting on every rank, so that all train with the same batch and lr."""
    data = broadcast_object(setting.to_dict(), src=src, group=group)
    return BatchSetting(**data)


def gather_objects(value: Any, *, group: Any = None) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` when not distributed)."""
    world, _ = distributed_world(group)
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value, group=group)
    return out


def ranks_agree(value: Any, *, group: Any = None) -> bool:
    """Whether every rank holds an equal ``value`` (compared with ``==`` after gathering)."""
    values = gather_objects(value, group=group)
    return all(v == values[0] for v in values[1:])


def _gather_ints(values: Sequence[int], *, group: Any, device: torch.device) -> list[list[int]]:
    """One all-gather of a few integers per rank."""
    world, _ = distributed_world(group)
    if world == 1:
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [row.tolist() for row in out]


def average_gradients(params: Sequence[torch.Tensor], *, group: Any = None) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (what DDP's all-reduce does)."""
    world, _ = distributed_world(group)
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    works = [dist.all_reduce(g, group=group, async_op=True) for g in grads]
    for work in works:
        assert work is not None
        work.wait()
    if grads:
        torch._foreach_div_(grads, float(world))


# --------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class StepReport:
    """What :meth:`BatchRuntime.run_step` did for one optimizer step on this rank."""

    loss: float
    samples: int
    global_samples: int
    micro_batch: int
    accumulation_steps: int
    retries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OomEvent:
    """An out-of-memory step-down: the micro-batch that failed and the new limit."""

    step: int
    failed_micro_batch: int
    max_micro_batch: int
    ranks: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ranks"] = list(self.ranks)
        return data


class BatchRuntime:
    """Applies batch settings to an optimizer and runs steps within a memory limit.

    Args:
        optimizer: the optimizer whose param groups' lrs follow the settings.
        base_lr: the lr the settings' lrs are relative to (your optimizer's lr at construction).
        max_micro_batch: the largest micro-batch per device known to fit (``None``: no limit
            until an out-of-memory error sets one).
        model: the model (a DDP wrapper's ``no_sync`` is used while micro-batches accumulate).
        group: the process group (default the world, when torch.distributed is initialised).
        backoff: the factor the failed micro-batch is multiplied by after an out-of-memory error.
        all_reduce: what averages the gradients over the ranks after a step's micro-batches (e.g.
            ``GradientNoiseScale.all_reduce_gradients``); default :func:`average_gradients`.
        sampler: a batch sampler with ``set_batch_size`` that :meth:`apply` keeps in step.
        broadcast_buffers: after each step, copy rank 0's buffers (BatchNorm running statistics)
            of ``model`` to every rank, as DDP does before each forward.

    Out-of-memory safety needs every rank to run the same collectives: forward the plain module
    (the runtime averages the gradients, so no DDP wrapper is needed), or a DDP wrapper built with
    ``broadcast_buffers=False`` — DDP's own buffer broadcast in each forward would otherwise leave
    the ranks waiting on each other when one of them fails mid-step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        max_micro_batch: int | None = None,
        model: nn.Module | None = None,
        group: Any = None,
        backoff: float = 0.5,
        all_reduce: Callable[[], None] | None = None,
        sampler: Any = None,
        broadcast_buffers: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BadInputError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.base_lr = check_positive_float("base_lr", base_lr)
        if max_micro_batch is not None:
            check_positive_int("max_micro_batch", max_micro_batch)
        self.max_micro_batch = max_micro_batch
        if model is not None and not isinstance(model, nn.Module):
            raise BadInputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.group = group
        if isinstance(backoff, bool) or not (
            isinstance(backoff, int | float) and 0.0 < backoff < 1.0
        ):
            raise BadInputError(f"backoff: expected a number in (0, 1), got {backoff!r}")
        self.backoff = float(backoff)
        self._all_reduce = all_reduce
        if sampler is not None and not hasattr(sampler, "set_batch_size"):
            raise BadInputError(
                f"sampler: expected a sampler with set_batch_size, got {type(sampler).__name__}"
            )
        self.sampler = sampler
        self.broadcast_buffers = bool(broadcast_buffers)
        self.world_size, self.rank = distributed_world(group)
        self.setting: BatchSetting | None = None
        self.steps = 0
        self.oom_events: list[OomEvent] = []

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def apply(self, setting: BatchSetting) -> BatchSetting:
        """Train with ``setting`` from the next step on (rank 0's, under DDP): every group's lr,
        and the micro-batch × accumulation under the current memory limit.

        Returns the setting in force, its split recomputed when an out-of-memory step-down lowered
        the limit below the schedule's micro-batch.
        """
        if not isinstance(setting, BatchSetting):
            raise BadInputError(f"setting: expected a BatchSetting, got {type(setting).__name__}")
        if self.distributed:
            setting = broadcast_setting(setting, group=self.group)
        if setting.batch % self.world_size:
            raise BadInputError(
                f"setting: its batch {setting.batch} is not a multiple of the world size "
                f"{self.world_size}"
            )
        setting = self._resplit(setting)
        apply_lr(self.optimizer, setting.lr, base_lr=self.base_lr)
        if self.sampler is not None:
            self.sampler.set_batch_size(setting.batch)
        self.setting = setting
        return setting

    def _parts_for(self, samples: int) -> int:
        limit = self.max_micro_batch
        wanted = self.setting.accumulation_steps if self.setting is not None else 1
        if limit is not None:
            wanted = max(wanted, -(-samples // limit))
        return max(1, min(wanted, samples))

    def run_step(
        self,
        batch: Any,
        forward_backward: ForwardBackward,
        *,
        on_retry: Callable[[], None] | None = None,
    ) -> StepReport:
        """Forward and backward of one optimizer step over this rank's ``batch``.

        ``forward_backward(micro_batch, weight)`` computes the loss of a micro-batch and calls
        ``(loss * weight).backward()``; ``weight`` is the micro-batch's share of the step (its
        samples over the rank's, times the correction for unequal ranks), so a mean-reduced loss
        gives the gradient of the mean over the global batch. It may return the loss for the report.

        Gradients must be zero at the call (``optimizer.zero_grad()``); on return they hold the
        step's gradient, averaged over the ranks. After an out-of-memory error anywhere, every rank
        zeroes its gradients, calls ``on_retry`` (e.g. ``noise.release``), lowers the micro-batch
        limit to the same value and runs the step again.
        """
        samples = samples_in(batch)
        if samples <= 0:
            raise BadInputError("batch: it holds no samples")
        retries = 0
        device = self._device()
        while True:
            parts = self._parts_for(samples)
            micro = -(-samples // parts)
            failed = False
            total_loss, counted = 0.0, 0
            try:
                with self._no_sync():
                    for part in split_micro_batches(batch, parts):
                        n = samples_in(part)
                        value = forward_backward(part, n / samples)
                        if value is not None:
                            total_loss += float(value) * n
                            counted += n
                        del part
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failed = True
            rows = _gather_ints([int(failed), micro, samples], group=self.group, device=device)
            failed_ranks = tuple(rank for rank, row in enumerate(rows) if row[0])
            if failed_ranks:
                self.optimizer.zero_grad(set_to_none=True)
                release_memory(device)
                if on_retry is not None:
                    on_retry()
                largest_failed = min(row[1] for row in rows if row[0])
                new_limit = math.floor(largest_failed * self.backoff)
                if new_limit < 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory on rank(s) {list(failed_ranks)} even at micro-batch "
                        f"{largest_failed}; nothing smaller to step down to"
                    )
                self.max_micro_batch = new_limit
                self.oom_events.append(
                    OomEvent(self.steps, largest_failed, new_limit, failed_ranks)
                )
                if self.setting is not None:
                    # Every rank reached the same limit: re-split without a broadcast.
                    self.setting = self._resplit(self.setting)
                retries += 1
                continue
            global_samples = sum(row[2] for row in rows)
            if self.distributed:
                expected = global_samples / self.world_size
                if samples != expected:
                    # Unequal parts: DDP averages ranks equally, so weigh this rank's mean by its
                    # share of the global batch to get the global mean.
                    grads = [p.grad for p in self._params() if p.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, samples / expected)
                if self._all_reduce is not None:
                    self._all_reduce()
                else:
                    average_gradients(self._params(), group=self.group)
                if self.broadcast_buffers and self.model is not None:
                    _broadcast_buffers(self.model, group=self.group)
            self.steps += 1
            return StepReport(
                loss=total_loss / counted if counted else math.nan,
                samples=samples,
                global_samples=global_samples,
                micro_batch=micro,
                accumulation_steps=parts,
                retries=retries,
            )

    def _resplit(self, setting: BatchSetting) -> BatchSetting:
        return resplit(setting, max_micro_batch=self.max_micro_batch, world_size=self.world_size)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _device(self) -> torch.device:
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        if self.distributed and dist.get_backend(self.group) == "gloo":
            return torch.device("cpu")
        return device

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        model = self.model
        if self.distributed and model is not None and hasattr(model, "no_sync"):
            wrapper: Any = model
            return wrapper.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """The memory limit (as lowered by out-of-memory errors), the setting and the step count."""
        return {
            "max_micro_batch": self.max_micro_batch,
            "setting": None if self.setting is None else self.setting.to_dict(),
            "steps": self.steps,
            "oom_events": [event.to_dict() for event in self.oom_events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_micro_batch = state["max_micro_batch"]
        self.steps = int(state["steps"])
        self.oom_events = [
            OomEvent(e["step"], e["failed_micro_batch"], e["max_micro_batch"], tuple(e["ranks"]))
            for e in state["oom_events"]
        ]
        setting = state["setting"]
        self.setting = None
        if setting is not None:
            self.apply(BatchSetting(**setting))


def _broadcast_buffers(model: nn.Module, *, group: Any) -> None:
    inner = getattr(model, "module", model)  # the DDP wrapper's module
    buffers = list(inner.buffers())
    source = dist.get_global_rank(group, 0) if group is not None else 0
    for buffer in buffers:
        dist.broadcast(buffer, src=source, group=group)


__all__ = [
    "BASE_LR_KEY",
    "BatchRuntime",
    "OomEvent",
    "StepReport",
    "apply_lr",
    "average_gradients",
    "broadcast_object",
    "broadcast_setting",
    "distributed_world",
    "gather_objects",
    "group_lrs",
    "ranks_agree",
    "resplit",
    "split_micro_batches",
]
