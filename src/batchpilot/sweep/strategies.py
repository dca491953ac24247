"""Which batch sizes a sweep tries: the ×0.5 / ×2 ladder, or a grid.

Practitioners' guides: "start from 128; train at ×0.5 and ×2 and compare the test results; if smaller is
better, halve again, until the result stops improving." :class:`Ladder` is that rule with its
knobs named (start, factor, direction rule, stop rule); :class:`Grid` tries a fixed list.

A strategy is asked for the next batches given the scores so far (lower is better), so it holds no
state: a resumed sweep asks again and gets the same answers, and batches proposed together can run
in parallel.

>>> import math
>>> walk(Ladder(start=128), lambda batch: abs(math.log2(batch / 16)))
[128, 64, 256, 32, 16, 8]
>>> walk(Grid((8, 16, 32)), lambda batch: 1.0)
[8, 16, 32]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args

from batchpilot.checks import check_positive_float, check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.jsonio import fields_dict

Direction = Literal["both", "down", "up"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)


class Strategy(Protocol):
    """Proposes batch sizes from the scores of those already tried."""

    kind: ClassVar[str]

    def next_batches(self, scores: Mapping[int, float]) -> list[int]:
        """Batches to try next (run them, add their scores, ask again); empty when done.

        ``scores`` maps each finished batch to its score, lower is better; a failed or diverged
        batch scores ``math.inf``.
        """
        ...

    def to_dict(self) -> dict[str, Any]: ...

    def bounded(self, max_batch: int) -> Strategy:
        """This strategy with batches capped at ``max_batch`` (the training set's size)."""
        ...


@dataclass(frozen=True)
class Ladder:
    """The ×0.5 / ×2 ladder: ``start``, then ``start / factor`` and ``start × factor``; then on in the
    better direction while the score improves.

    Attributes:
        start: the first batch (practitioners' guides start at 128).
        factor: the ratio between rungs (2 = the seed's ×0.5 and ×2).
        direction: ``"both"`` tries one rung each way and follows the better one if it beats the
            start; ``"down"`` or ``"up"`` only ever go that way.
        patience: the stop rule: stop after this many rungs in a row without improvement.
        min_improvement: a rung improves only if it beats the best score so far by this fraction
            of its magnitude (0 = any improvement counts).
        min_batch, max_batch: bounds of the walk (``max_batch`` defaults to the training set).
    """

    start: int = 128
    factor: float = 2.0
    direction: Direction = "both"
    patience: int = 1
    min_improvement: float = 0.0
    min_batch: int = 1
    max_batch: int | None = None

    kind: ClassVar[str] = "ladder"

    def __post_init__(self) -> None:
        check_positive_int("start", self.start)
        check_positive_float("factor", self.factor)
        if self.factor <= 1.0:
            raise BadInputError(f"factor: expected a number > 1, got {self.factor!r}")
        if self.direction not in DIRECTIONS:
            raise BadInputError(
                f"direction: expected one of {', '.join(DIRECTIONS)}, got {self.direction!r}"
            )
        check_positive_int("patience", self.patience)
        if not (math.isfinite(self.min_improvement) and self.min_improvement >= 0):
            raise BadInputError(
                f"min_improvement: expected a number ≥ 0, got {self.min_improvement!r}"
            )
        check_positive_int("min_batch", self.min_batch)
        if self.max_batch is not None:
            check_positive_int("max_batch", self.max_batch)
            if self.max_batch < self.min_batch:
                raise BadInputError(
                    f"max_batch: {self.max_batch} is below min_batch {self.min_batch}"
                )
        if self.start < self.min_batch or (
            self.max_batch is not None and self.start > self.max_batch
        ):
            raise BadInputError(
                f"start: {self.start} is outside [{self.min_batch}, {self.max_batch}]"
            )

    def bounded(self, max_batch: int) -> Ladder:
        limit = max_batch if self.max_batch is None else min(self.max_batch, max_batch)
        if self.start > limit:
            raise BadInputError(
                f"start: {self.start} is larger than the training set ({max_batch} samples)"
            )
        return Ladder(
            start=self.start,
            factor=self.factor,
            direction=self.direction,
            patience=self.patience,
            min_improvement=self.min_improvement,
            min_batch=self.min_batch,
            max_batch=limit,
        )

    def rung(self, k: int) -> int | None:
        """The batch ``k`` rungs from the start (negative = smaller); ``None`` outside the bounds."""
        batch = max(1, round(self.start * self.factor**k))
        if batch < self.min_batch or (self.max_batch is not None and batch > self.max_batch):
            return None
        return batch

    def next_batches(self, scores: Mapping[int, float]) -> list[int]:
        ways = {"both": (-1, 1), "down": (-1,), "up": (1,)}[self.direction]
        neighbours = {way: self.rung(way) for way in ways}
        first = [self.start] + [b for b in neighbours.values() if b is not None and b != self.start]
        missing = [batch for batch in first if batch not in scores]
        if missing:
            return missing
        # The direction rule: follow the neighbour that beats the start (the better of two).
        better = [
            (scores[batch], way, batch)
            for way, batch in neighbours.items()
            if batch is not None
            and batch != self.start
            and self._improves(scores[batch], scores[self.start])
        ]
        if not better:
            return []
        best, way, previous = min(better)
        stale, k = 0, 1
        while True:
            k += 1
            batch = self.rung(way * k)
            if batch is None or batch == previous:
                return []
            if batch not in scores:
                return [batch]
            # The stop rule: `patience` rungs in a row that do not improve on the best.
            if self._improves(scores[batch], best):
                best, stale = scores[batch], 0
            else:
                stale += 1
                if stale >= self.patience:
                    return []
            previous = batch

    def _improves(self, score: float, best: float) -> bool:
        if not math.isfinite(score):
            return False
        if not math.isfinite(best):
            return True
        return best - score > self.min_improvement * abs(best)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **fields_dict(self)}


@dataclass(frozen=True)
class Grid:
    """Every batch in ``batches`` (proposed all at once, so they can all run in parallel)."""

    batches: tuple[int, ...]

    kind: ClassVar[str] = "grid"

    def __post_init__(self) -> None:
        if not self.batches:
            raise BadInputError("batches: expected at least one batch size")
        for batch in self.batches:
            check_positive_int("batches", batch)
        if len(set(self.batches)) != len(self.batches):
            raise BadInputError(f"batches: repeated batch sizes in {list(self.batches)}")

    @classmethod
    def powers_of_two(cls, min_batch: int, max_batch: int) -> Grid:
        """Powers of two from ``min_batch`` up to ``max_batch`` (both rounded inwards).

        >>> Grid.powers_of_two(3, 100).batches
        (4, 8, 16, 32, 64)
        """
        check_positive_int("min_batch", min_batch)
        check_positive_int("max_batch", max_batch)
        low = math.ceil(math.log2(min_batch))
        high = math.floor(math.log2(max_batch))
        if high < low:
            raise BadInputError(f"max_batch: no power of two in [{min_batch}, {max_batch}]")
        return cls(tuple(2**k for k in range(low, high + 1)))

    def bounded(self, max_batch: int) -> Grid:
        too_big = [batch for batch in self.batches if batch > max_batch]
        if too_big:
            raise BadInputError(
                f"batches: {too_big} larger than the training set ({max_batch} samples)"
            )
        return self

    def next_batches(self, scores: Mapping[int, float]) -> list[int]:
        return [batch for batch in self.batches if batch not in scores]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **fields_dict(self)}


@dataclass(frozen=True)
class GridAround:
    """The default grid of ``batchpilot sweep --strategy grid``: powers of two from
    ``start`` / ``span`` to ``start`` × ``span``, within [``min_batch``, ``max_batch``] and the
    training set, which :meth:`bounded` resolves to a :class:`Grid` (what the store records).

    >>> GridAround(64).bounded(250).batches
    (8, 16, 32, 64, 128)
    """

    start: int = 128
    span: int = 8
    min_batch: int = 1
    max_batch: int | None = None

    kind: ClassVar[str] = "grid"

    def __post_init__(self) -> None:
        check_positive_int("start", self.start)
        check_positive_int("span", self.span)
        check_positive_int("min_batch", self.min_batch)
        if self.max_batch is not None:
            check_positive_int("max_batch", self.max_batch)

    def bounded(self, max_batch: int) -> Grid:
        high = min(self.start * self.span, max_batch, self.max_batch or max_batch)
        return Grid.powers_of_two(max(self.min_batch, self.start // self.span), high)

    def next_batches(self, scores: Mapping[int, float]) -> list[int]:
        return self.bounded(self.start * self.span).next_batches(scores)

    def to_dict(self) -> dict[str, Any]:
        return self.bounded(self.start * self.span).to_dict()


def walk(strategy: Strategy, score: Callable[[int], float]) -> list[int]:
    """Run ``strategy`` against a score function (lower is better); the batches in the order tried."""
    scores: dict[int, float] = {}
    order: list[int] = []
    while batches := strategy.next_batches(scores):
        for batch in batches:
            scores[batch] = score(batch)
            order.append(batch)
    return order
