"""How verification should pick its winner: a replay study on dense tables of training runs.

``batchpilot.measure._lr_range.verify_ladder`` trains candidate lrs for the budget with a few seeds and
keeps the best. Which statistic of the seeds' losses, and how many seeds, decide how often it
picks the lr that is best *on average over seeds*. This script measures that without re-training:

1. ``--gather`` trains every lr of the √2 grid around the best, for the budget of
   ``benchmarks/lr_find.py``, with many seeds (the 8 scoring seeds of that benchmark, its 20
   verification seeds, and ``--extra`` more: 32 in all), and runs its 4 range tests; the table is cached in
   ``--cache`` (one JSON file per example).
2. The replay draws ``--trials`` random seed sets from the pool (never a scoring seed) and runs
   the verification rounds on the table: the real ``verify_ladder`` (its ``train`` replaced by a
   lookup), and variants of it that score by the mean, the mean plus a standard deviation, or
   with other seed schedules.

Printed per example and rule: training runs, how often the pick is the grid point with the lowest
mean loss over all seeds, the pick's expected loss as a ratio to that point's (mean over trials),
and its loss on the benchmark's 8 scoring seeds as a ratio to the benchmark's oracle (mean, and
the share of trials above 1.1).

    .venv/bin/python benchmarks/verify_selection.py --gather    # ~30 min on one core, cached
    .venv/bin/python benchmarks/verify_selection.py             # the replay, ~1 min

Needs nothing beyond batchpilot.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchpilot import lr_finder
from batchpilot.loading import load_task
from batchpilot.measure._lr_range import (
    VERIFY_FINAL_SEEDS,
    VERIFY_SEEDS,
    stability_edge,
    verification_candidates,
)
from batchpilot.training._loop import train
from lr_find import SETUPS, range_test

# The √2-grid exponents j (lr = 2^(j/2)) trained per example: around the best constant lr.
GRIDS = {"spiral": (-8, 2), "xor4": (1, 12)}
# benchmarks/lr_find.py's oracle (best mean over its scoring seeds 0–7 on a quarter-decade grid).
ORACLE = {"spiral": 0.3528, "xor4": 0.1774}
SCORING = tuple(range(8))
RANGE_SEEDS = 4
CACHE = Path(tempfile.gettempdir()) / "batchpilot-verify-selection"


def range_seed(s: int) -> int:
    return 1000 + 7919 * s  # as in benchmarks/lr_find.py


# ---------------------------------------------------------------------------------- gathering


def gather(name: str, extra: int, path: Path, log: Callable[[str], None]) -> None:
    task, setup = load_task(example=name), SETUPS[name]
    out: dict[str, Any] = {"ranges": {}, "table": {}}
    for s in range(RANGE_SEEDS):
        result = range_test(task, setup, range_seed(s))
        out["ranges"][str(s)] = {
            "edge": stability_edge(result),
            "min_lr": result.min_lr,
            "candidates": verification_candidates(result),
        }
    seeds = [*SCORING, *(range_seed(s) + k for s in range(RANGE_SEEDS) for k in range(5))]
    seeds += list(range(len(SCORING), len(SCORING) + extra))
    low, high = GRIDS[name]
    start = time.perf_counter()
    for j in range(low, high + 1):
        row = {}
        for seed in seeds:
            run = train(
                task, micro_batch=setup.batch, lr=2 ** (j / 2), steps=setup.train_steps, seed=seed
            )
            final = run.final
            ok = not run.diverged and final is not None and math.isfinite(final.loss)
            row[str(seed)] = final.loss if ok and final is not None else math.inf
        out["table"][str(j)] = row
        log(f"{name}: lr {2 ** (j / 2):.3g} done ({time.perf_counter() - start:.0f} s)")
        path.write_text(json.dumps(out))


# ---------------------------------------------------------------------------------- the replay


@dataclass
class RunTable:
    """Loss by (grid exponent, seed); an lr off the table scores like the worst point on it."""

    losses: dict[int, dict[int, float]]
    ranges: dict[int, dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> RunTable:
        data = json.loads(path.read_text())
        losses = {int(j): {int(s): v for s, v in row.items()} for j, row in data["table"].items()}
        ranges = {int(s): r for s, r in data["ranges"].items()}
        return cls(losses, ranges)

    @property
    def seeds(self) -> list[int]:
        return sorted(next(iter(self.losses.values())))

    def loss(self, j: int, seed: int) -> float:
        if j not in self.losses:
            return max(v for row in self.losses.values() for v in row.values())
        return self.losses[j][seed]

    def mean(self, j: int, seeds: Sequence[int]) -> float:
        return float(np.mean([self.loss(j, s) for s in seeds]))


def exponent(lr: float) -> int:
    return round(2 * math.log2(lr))


def real_ladder(table: RunTable, s: int, draw: Sequence[int]) -> tuple[int, int]:
    """``verify_ladder`` itself, with each training run looked up: its seed ``k`` is ``draw[k]``."""

    def lookup(task: Any, *, lr: float, seed: int, **_: Any) -> Any:
        loss = table.loss(exponent(lr), draw[seed])
        return SimpleNamespace(
            diverged=not math.isfinite(loss),
            final=SimpleNamespace(loss=loss, metric=None),
            train_losses=[loss],
        )

    r = table.ranges[s]
    result = SimpleNamespace(
        diverged_at=r["edge"], lrs=[r["edge"]], min_lr=r["min_lr"], suggestions={}
    )
    task = SimpleNamespace(val_data=True)
    with (
        mock.patch.object(lr_finder, "train", lookup),
        mock.patch.object(lr_finder, "verification_candidates", lambda *a, **k: r["candidates"]),
    ):
        check = lr_finder.verify_ladder(task, result, micro_batch=1, steps=1, seed=0)  # type: ignore[arg-type]
    assert check.best_lr is not None
    return exponent(check.best_lr), check.runs


def replayed_ladder(
    table: RunTable,
    s: int,
    draw: Sequence[int],
    *,
    score: Callable[[np.ndarray], float],
    seeds: int,
    final_seeds: int,
) -> tuple[int, int]:
    """The same rounds as ``verify_ladder``, with another statistic or seed schedule."""
    r = table.ranges[s]
    held: dict[int, int] = {exponent(lr): 1 for lr in r["candidates"].values()}

    def value(j: int) -> float:
        losses = np.array([table.loss(j, draw[k]) for k in range(held[j])])
        return math.inf if not np.isfinite(losses).all() else score(losses)

    def ranked(count: int) -> list[int]:
        done = [j for j in held if held[j] >= count and math.isfinite(value(j))]
        return sorted(done, key=lambda j: (value(j), j))

    for j in ranked(1)[:3]:
        held[j] = seeds
    leaders = ranked(seeds)
    if leaders:
        for j in (leaders[0] - 1, leaders[0] + 1):
            if j not in held and 2 ** (j / 2) < r["edge"]:
                held[j] = seeds
    leaders = ranked(seeds)
    if leaders and final_seeds > seeds:
        reach = max(table.loss(leaders[0], draw[k]) for k in range(seeds))
        rivals = [j for j in leaders[1:3] if value(j) < reach]
        if rivals:
            for j in (leaders[0], *rivals):
                held[j] = final_seeds
    best = min(ranked(seeds), key=lambda j: (-held[j], value(j), j))
    return best, sum(held.values())


def _mean_plus_sd(losses: np.ndarray) -> float:
    return float(losses.mean() + (losses.std(ddof=1) if len(losses) > 1 else 0.0))


VARIANTS: dict[str, Callable[[RunTable, int, Sequence[int]], tuple[int, int]]] = {
    "mean of 3 seeds (previous default)": lambda t, s, d: replayed_ladder(
        t, s, d, score=np.mean, seeds=3, final_seeds=3
    ),
    "mean of 5 seeds": lambda t, s, d: replayed_ladder(
        t, s, d, score=np.mean, seeds=5, final_seeds=5
    ),
    "mean + 1 sd, 3 seeds": lambda t, s, d: replayed_ladder(
        t, s, d, score=_mean_plus_sd, seeds=3, final_seeds=3
    ),
    "median of 3 seeds": lambda t, s, d: replayed_ladder(
        t, s, d, score=np.median, seeds=3, final_seeds=3
    ),
    "median of 5 seeds": lambda t, s, d: replayed_ladder(
        t, s, d, score=np.median, seeds=5, final_seeds=5
    ),
    "mean, 3 seeds, tie-break 7": lambda t, s, d: replayed_ladder(
        t, s, d, score=np.mean, seeds=3, final_seeds=7
    ),
    f"median, tie-break {VERIFY_SEEDS} → {VERIFY_FINAL_SEEDS} seeds (default)": real_ladder,
}


def replay(name: str, table: RunTable, trials: int) -> list[dict[str, Any]]:
    pool = [s for s in table.seeds if s not in SCORING]
    expected = {j: table.mean(j, table.seeds) for j in table.losses}
    best = min(expected, key=lambda j: expected[j])
    rows = []
    for label, variant in VARIANTS.items():
        rng = random.Random(0)  # the same draws for every variant
        picks, runs = [], []
        for trial in range(trials):
            draw = rng.sample(pool, VERIFY_FINAL_SEEDS)
            j, n = variant(table, trial % RANGE_SEEDS, draw)
            picks.append(j)
            runs.append(n)
        scored = np.array([table.mean(j, SCORING) / ORACLE[name] for j in picks])
        rows.append(
            {
                "example": name,
                "rule": label,
                "runs": float(np.mean(runs)),
                "picks_best": float(np.mean([j == best for j in picks])),
                "expected_ratio": float(np.mean([expected[j] / expected[best] for j in picks])),
                "scored_ratio": float(scored.mean()),
                "above_1_1": float(np.mean(scored > 1.1)),
                "best_lr": 2 ** (best / 2),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(GRIDS), help="comma-separated examples")
    parser.add_argument("--gather", action="store_true", help="train the tables (slow)")
    parser.add_argument("--extra", type=int, default=4, help="seeds beyond the benchmark's")
    parser.add_argument("--cache", default=str(CACHE), help="folder of the tables")
    parser.add_argument("--trials", type=int, default=2000, help="seed draws per rule")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(highlight=False, width=150)
    err = Console(stderr=True, highlight=False)
    rows = []
    for name in args.examples.split(","):
        if name not in GRIDS:
            sys.exit(f"unknown example {name!r}; choose from {', '.join(GRIDS)}")
        path = Path(args.cache) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.gather or not path.exists():
            gather(name, args.extra, path, lambda line: err.print(line))
        table = RunTable.load(path)
        rows += replay(name, table, args.trials)
        console.print(
            f"{name}: {len(table.losses)} lrs × {len(table.seeds)} seeds; lowest mean over all "
            f"seeds at lr {rows[-1]['best_lr']:.3g}"
        )
    out = Table(title=f"verification rules replayed on {args.trials} random seed draws each")
    for column in ("example", "rule", "runs", "picks the best lr", "expected loss ratio"):
        out.add_column(column, justify="left" if column in ("example", "rule") else "right")
    out.add_column("scored ratio (benchmark)", justify="right")
    out.add_column("scored > 1.1", justify="right")
    for row in rows:
        out.add_row(
            row["example"],
            row["rule"],
            f"{row['runs']:.1f}",
            f"{row['picks_best']:.0%}",
            f"{row['expected_ratio']:.3f}",
            f"{row['scored_ratio']:.3f}",
            f"{row['above_1_1']:.0%}",
        )
    console.print(out)


if __name__ == "__main__":
    main()
