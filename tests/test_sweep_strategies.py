from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.errors import BadInputError
from batchpilot.sweep import Grid, Ladder, walk


def valley(optimum: float):  # a synthetic objective with its minimum at `optimum`
    return lambda batch: abs(math.log2(batch / optimum))


def best_of(order: list[int], score) -> int:
    return min(order, key=score)


def test_ladder_halves_from_128_until_the_result_stops_improving() -> None:
    # Seed 003: start at 128, try ×0.5 and ×2; smaller is better, so halve until it stops
    # improving: 16 is the optimum, 8 is the rung that shows it.
    score = valley(16)
    order = walk(Ladder(), score)
    assert order == [128, 64, 256, 32, 16, 8]
    assert best_of(order, score) == 16


def test_ladder_doubles_when_larger_is_better() -> None:
    score = valley(1024)
    order = walk(Ladder(max_batch=8192), score)
    assert order == [128, 64, 256, 512, 1024, 2048]
    assert best_of(order, score) == 1024


def test_ladder_stops_at_once_when_the_start_is_best() -> None:
    assert walk(Ladder(), valley(128)) == [128, 64, 256]


def test_ladder_follows_the_better_of_two_improving_neighbours() -> None:
    scores = {128: 5.0, 64: 4.0, 256: 3.0, 512: 2.5, 1024: 2.6}
    assert walk(Ladder(max_batch=4096), scores.__getitem__) == [128, 64, 256, 512, 1024]


def test_ladder_patience_walks_past_one_bump() -> None:
    scores = {128: 5.0, 64: 4.0, 256: 6.0, 32: 4.5, 16: 3.0, 8: 3.5, 4: 3.6, 2: 9.0}
    assert walk(Ladder(patience=1), scores.__getitem__) == [128, 64, 256, 32]
    assert walk(Ladder(patience=2), scores.__getitem__) == [128, 64, 256, 32, 16, 8, 4]


def test_ladder_respects_bounds_direction_and_factor() -> None:
    assert walk(Ladder(min_batch=8), valley(1)) == [128, 64, 256, 32, 16, 8]
    assert walk(Ladder().bounded(300), valley(4096)) == [128, 64, 256]
    assert walk(Ladder(direction="down"), valley(4096)) == [128, 64]
    assert walk(Ladder(direction="up", max_batch=4096), valley(512)) == [128, 256, 512, 1024]
    assert walk(Ladder(factor=4), valley(8)) == [128, 32, 512, 8, 2]


def test_ladder_needs_a_real_improvement() -> None:
    scores = {128: 1.0, 64: 0.99, 256: 1.5, 32: 0.5}
    assert walk(Ladder(min_improvement=0.05), scores.__getitem__) == [128, 64, 256]
    assert walk(Ladder(), lambda b: scores.get(b, 2.0)) == [128, 64, 256, 32, 16]


def test_failed_batches_never_count_as_improvements() -> None:
    scores = {128: 2.0, 64: 1.0, 256: 3.0, 32: math.inf}
    assert walk(Ladder(), scores.__getitem__) == [128, 64, 256, 32]
    assert walk(Ladder(), {128: math.inf, 64: math.inf, 256: math.inf}.__getitem__) == [
        128,
        64,
        256,
    ]


def test_ladder_proposes_the_first_three_together() -> None:
    assert Ladder(start=100).next_batches({}) == [100, 50, 200]
    assert Ladder(start=100).next_batches({100: 1.0}) == [50, 200]
    # Rounding to whole batches: 100 → 50 → 25 → 12 (not 12.5)
    assert Ladder(start=100).rung(-3) == 12


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 12), optimum=st.integers(0, 12), patience=st.integers(1, 3))
def test_ladder_finds_the_optimum_of_any_valley(start: int, optimum: int, patience: int) -> None:
    score = valley(2**optimum)
    ladder = Ladder(start=2**start, max_batch=4096, patience=patience)
    order = walk(ladder, score)
    assert best_of(order, score) == 2**optimum
    assert len(order) == len(set(order))
    # It never goes further past the optimum than the stop rule needs.
    assert len(order) <= abs(start - optimum) + 2 + patience


def test_ladder_rejects_bad_settings() -> None:
    with pytest.raises(BadInputError, match=r"^factor: expected a number > 1, got 1"):
        Ladder(factor=1)
    with pytest.raises(BadInputError, match=r"^start: expected a positive integer, got 0"):
        Ladder(start=0)
    with pytest.raises(BadInputError, match=r"^direction: .*got 'sideways'"):
        Ladder(direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=r"^start: 128 is larger than the training set"):
        Ladder().bounded(100)
    with pytest.raises(BadInputError, match=r"^patience"):
        Ladder(patience=0)


def test_grid_proposes_every_missing_batch_at_once() -> None:
    grid = Grid.powers_of_two(16, 128)
    assert grid.batches == (16, 32, 64, 128)
    assert grid.next_batches({32: 1.0}) == [16, 64, 128]
    assert walk(grid, valley(64)) == [16, 32, 64, 128]
    with pytest.raises(BadInputError, match=r"^batches: repeated"):
        Grid((8, 8))
    with pytest.raises(BadInputError, match=r"^batches: \[512\] larger than the training set"):
        Grid((8, 512)).bounded(256)
    assert Grid((8, 16)).to_dict() == {"kind": "grid", "batches": [8, 16]}
