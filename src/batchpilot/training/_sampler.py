"""A batch sampler whose batch size may change between steps, every sample seen once per epoch.

:class:`ScheduledBatchSampler` goes through one permutation of the dataset per epoch and cuts it
into consecutive global batches whose size it asks for just before each batch — from a fixed
size (changed with :meth:`~ScheduledBatchSampler.set_batch_size`), a
:class:`~batchpilot.training._schedules.BatchSchedule`, or a function of the fractional epoch. The last batch
of an epoch takes what is left, so every index appears exactly once per epoch whatever the
schedule.

Under DDP every rank builds the same permutation (same ``seed``) and the same cuts, and takes every
``num_replicas``-th index of each global batch from ``rank`` on: the ranks' parts of a step are
disjoint, their union is the global batch, and their sizes differ by at most one. A leftover too
small to give every rank a sample is merged into the epoch's last batch rather than dropped or
padded.

>>> sampler = ScheduledBatchSampler(10, batch_size=lambda epoch: 2 if epoch < 0.5 else 4,
...                                 shuffle=False)
>>> list(sampler)
[[0, 1], [2, 3], [4, 5], [6, 7, 8, 9]]
>>> sampler.epoch
1
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.training._schedules import BatchSchedule

BatchSource = int | BatchSchedule | Callable[[float], int]


class ScheduledBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices of each global batch; pass it as ``DataLoader(batch_sampler=…)``.

    Args:
        data: the dataset (or its length).
        batch_size: the global batch — an int, a :class:`BatchSchedule` (its ``at(epoch).batch``),
            or ``f(epoch) -> int`` of the fractional epoch (samples drawn / dataset size).
        shuffle: a new permutation each epoch, drawn from ``seed + epoch`` (never the global RNG).
        seed: the same on every rank.
        num_replicas, rank: the data-parallel world; by default taken from ``torch.distributed``
            when it is initialised, else 1 and 0.
        sized: whether ``len()`` answers. Frameworks that count an epoch's batches once (Lightning)
            end epochs early or late when the batch changes; with ``sized=False`` they run each
            epoch until the sampler stops.

    The epoch advances by itself when an epoch's iteration finishes; :meth:`set_epoch` also sets it
    (as with ``DistributedSampler``). ``state_dict()`` saves the epoch and the position in it, so a
    resumed run continues with the next unseen sample.
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        batch_size: BatchSource,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        sized: bool = True,
    ) -> None:
        size = data if isinstance(data, int) else len(data)
        self.dataset_size = check_positive_int("data", size)
        if num_replicas is None or rank is None:
            world, here = _world()
            num_replicas = world if num_replicas is None else num_replicas
            rank = here if rank is None else rank
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise BadInputError(f"rank: expected an integer in [0, {num_replicas}), got {rank!r}")
        self.rank = rank
        if num_replicas > self.dataset_size:
            raise BadInputError(
                f"num_replicas: {num_replicas} ranks cannot each get a sample of a dataset of "
                f"{self.dataset_size}"
            )
        self.shuffle = bool(shuffle)
        self.sized = bool(sized)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadInputError(f"seed: expected an integer, got {seed!r}")
        self.seed = seed
        self._fixed: int | None = None
        self._source: BatchSchedule | Callable[[float], int] | None = None
        if isinstance(batch_size, int) and not isinstance(batch_size, bool):
            self._fixed = self._check_batch(batch_size)
        elif isinstance(batch_size, BatchSchedule) or callable(batch_size):
            self._source = batch_size
        else:
            raise BadInputError(
                "batch_size: expected an int, a BatchSchedule or a function of the epoch, got "
                f"{type(batch_size).__name__}"
            )
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out
        self._ends: list[int] = []  # the position after each batch handed out this epoch
        self.last_batch: int | None = None
        # The fractional epoch at which the last batch handed out starts: ask the schedule for
        # that batch's lr with it (``schedule.at(sampler.batch_start_epoch)``).
        self.batch_start_epoch = 0.0

    # ------------------------------------------------------------------ batch sizes

    def _check_batch(self, batch: Any) -> int:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise BadInputError(f"batch_size: expected a positive integer, got {batch!r}")
        if batch < self.num_replicas:
            raise BadInputError(
                f"batch_size: a global batch of {batch} cannot give each of {self.num_replicas} "
                "ranks a sample"
            )
        return batch

    def set_batch_size(self, batch: int) -> None:
        """Use ``batch`` (global) from the next batch on; with a schedule or function given at
        construction, this replaces it. Under DDP call it on every rank with the same value.

        A ``DataLoader`` with workers asks the sampler for a few batches ahead (``prefetch_factor``
        per worker), so the change shows that many batches later; with ``num_workers=0`` it is
        immediate.
        """
        self._fixed = self._check_batch(batch)
        self._source = None

    def batch_at(self, epoch: float) -> int:
        """The global batch the sampler uses at a fractional ``epoch``."""
        if self._fixed is not None:
            return self._fixed
        source = self._source
        value = source.at(epoch).batch if isinstance(source, BatchSchedule) else source(epoch)  # type: ignore[misc]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return self._check_batch(value)

    # -------------------------------------------------------------------- iteration

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from its beginning, unless it is the epoch already in progress)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise BadInputError(f"epoch: expected an integer ≥ 0, got {epoch!r}")
        if epoch != self.epoch:
            self.epoch, self.position, self._ends = epoch, 0, []

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of the dataset's indices in ``epoch`` (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def _next_end(self, position: int) -> int:
        n = self.dataset_size
        batch = self.batch_at(self.epoch + position / n)
        end = min(n, position + batch)
        if 0 < n - end < self.num_replicas:
            end = n  # a leftover some rank would get nothing of: merged into this batch
        return end

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        n = self.dataset_size
        if self.position >= n:  # a finished epoch that was not advanced (e.g. loaded state)
            self.epoch, self.position, self._ends = self.epoch + 1, 0, []
            order = self.permutation()
        while self.position < n:
            start = self.position
            end = self._next_end(start)
            self.position = end
            self._ends.append(end)
            self.last_batch = end - start
            self.batch_start_epoch = self.epoch + start / n
            yield order[start + self.rank : end : self.num_replicas].tolist()
        self.epoch, self.position, self._ends = self.epoch + 1, 0, []

    def __len__(self) -> int:
        """Batches left in the epoch in progress (all of them at its start), assuming the batch size
        source does not change in between. Raises ``TypeError`` when built with ``sized=False``."""
        if not self.sized:
            raise TypeError("this ScheduledBatchSampler was built with sized=False: no len()")
        return self.batches_left()

    def batches_left(self) -> int:
        """Batches left in the epoch in progress, assuming the batch size source does not change."""
        count, position = 0, self.position
        while position < self.dataset_size:
            position = self._next_end(position)
            count += 1
        return count

    @property
    def epoch_progress(self) -> float:
        """The fractional epoch of the next batch: ``epoch + position / dataset_size``."""
        return self.epoch + self.position / self.dataset_size

    # ------------------------------------------------------------------- persistence

    def state_dict(self, *, batches_consumed: int | None = None) -> dict[str, Any]:
        """The epoch and the position in it.

        With a ``DataLoader`` that prefetches (``num_workers > 0``) the sampler runs ahead of the
        training loop; pass ``batches_consumed`` (batches of this epoch the loop has trained on)
        to save the loop's position instead of the sampler's.
        """
        position = self.position
        if batches_consumed is not None:
            if isinstance(batches_consumed, bool) or not isinstance(batches_consumed, int):
                raise BadInputError(
                    f"batches_consumed: expected an integer, got {batches_consumed!r}"
                )
            if not 0 <= batches_consumed <= len(self._ends):
                raise BadInputError(
                    f"batches_consumed: expected 0 to {len(self._ends)} (batches handed out this "
                    f"epoch), got {batches_consumed}"
                )
            position = self._ends[batches_consumed - 1] if batches_consumed else 0
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": self.dataset_size,
            "num_replicas": self.num_replicas,
            "fixed_batch": self._fixed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (on the same dataset and world size)."""
        for key in ("dataset_size", "num_replicas"):
            if int(state[key]) != getattr(self, key):
                raise BadInputError(
                    f"state: saved with {key}={state[key]}, this sampler has {getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self._ends = []
        if state.get("fixed_batch") is not None and self._source is None:
            self._fixed = int(state["fixed_batch"])


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def epoch_batches(sampler: ScheduledBatchSampler) -> list[list[int]]:
    """All of this rank's batches of the sampler's next epoch (advances the sampler).

    >>> s = ScheduledBatchSampler(7, batch_size=3, shuffle=False, num_replicas=2, rank=1)
    >>> epoch_batches(s)
    [[1], [4, 6]]
    """
    return list(iter(sampler))


def steps_in_epoch(dataset_size: int, batch_at: Callable[[float], int]) -> int:
    """Optimizer steps in one epoch of ``dataset_size`` samples when the batch follows
    ``batch_at(fractional_epoch)``.

    >>> steps_in_epoch(100, lambda epoch: 10 if epoch < 0.5 else 25)
    7
    """
    sampler = ScheduledBatchSampler(dataset_size, batch_size=batch_at, shuffle=False)
    return sampler.batches_left()


__all__ = ["ScheduledBatchSampler", "epoch_batches", "steps_in_epoch"]
