"""How stable is ``batchpilot tune``'s answer over seeds, and under CPU load?

Every run is ``batchpilot tune TASK --seed S --format json`` in a fresh subprocess, one at a time
(the wall time is part of what is measured), so this script depends only on the CLI and on the key
paths of its JSON named in ``TUNE_KEYS`` below, never on the package's internals. The runs happen
under each condition in turn:

* ``idle``: nothing else of ours running;
* ``loaded``: beside ``--load-procs`` Python processes spinning ``while True: pass`` (default: one
  per CPU core), started before the condition's first run and always killed after its last one,
  also on Ctrl-C or SIGTERM.

Every run records the task, condition, seed, global batch, lr, wall seconds, the 1-minute load
average before and after, the exit code and tune's warnings; ``--out`` writes them all as JSON
(after every run, so an interrupted benchmark keeps what it measured). A failed run (non-zero exit
or a timeout) counts as a miss in the spread columns and is listed.

Goal (issue 13): in every task × condition row, at least 9 of 10 global batches within ×2 of the
row's median and lrs within ×1.5 of the row's median; per task, the loaded median batch (and lr)
within ×2 of the idle median, and tune's median wall time under load at most 3× the idle one.

    .venv/bin/python benchmarks/stability.py                  # the full run (4 tasks × 10 seeds × 2)
    .venv/bin/python benchmarks/stability.py --quick          # smoke: digits + adam_mlp, 2 seeds, idle
    .venv/bin/python benchmarks/stability.py --tasks spiral --seeds 3 --conditions loaded --markdown

``--tasks`` takes built-in example names (run as ``--example NAME``), names of files in
``benchmarks/tasks/`` (run as ``benchmarks/tasks/NAME.py:task``) or any ``path.py:factory``. The
exit code is 0 when every goal passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BATCHPILOT = ROOT / ".venv" / "bin" / "batchpilot"
OWN_TASKS = Path(__file__).resolve().parent / "tasks"
BUILTIN_EXAMPLES = ("digits", "spiral", "xor4")

# Where the numbers sit in ``tune --format json``: the one place to update if its keys change.
TUNE_KEYS = {
    "global_batch": "recommendation.global_batch",
    "lr": "recommendation.lr",
    "warnings": "recommendation.warnings",  # optional: a missing key reads as no warnings
    "phase_seconds": "phase_seconds",  # optional: where the wall time went
}

DEFAULT_TASKS = ("digits", "spiral", "adam_mlp", "large_regression")
QUICK_TASKS = ("digits", "adam_mlp")
CONDITIONS = ("idle", "loaded")

# The goals of issue 13.
BATCH_SPREAD = 2.0  # a global batch counts when within ×2 of its row's median
LR_SPREAD = 1.5  # an lr counts when within ×1.5 of its row's median
SHARE_NEEDED = 0.9  # 9 of 10 runs per row
LOADED_VS_IDLE = 2.0  # loaded median within ×2 of the idle median
WALL_RATIO_MAX = 3.0  # tune's wall time under load at most 3× idle


class TuneKeyError(RuntimeError):
    """tune's JSON no longer has a key this benchmark reads."""


def lookup(result: dict[str, Any], name: str, *, required: bool = True) -> Any:
    """The value at ``TUNE_KEYS[name]`` (a dotted path) in tune's JSON result.

    >>> lookup({"recommendation": {"global_batch": 256}}, "global_batch")
    256
    >>> lookup({"recommendation": {}}, "warnings", required=False) is None
    True
    """
    path = TUNE_KEYS[name]
    node: Any = result
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if not required:
                return None
            there = sorted(node) if isinstance(node, dict) else type(node).__name__
            where = ".".join(walked) or "the top level"
            raise TuneKeyError(
                f"tune's JSON has no {path!r} for {name} (no {part!r} under {where}; found "
                f"{there}): update TUNE_KEYS at the top of benchmarks/stability.py"
            )
        node = node[part]
        walked.append(part)
    return node


def warning_codes(warnings: Any) -> list[str]:
    """Short names of tune's warnings, whatever their shape (strings or dicts with a code)."""
    if not warnings:
        return []
    codes = []
    for item in warnings:
        if isinstance(item, dict):
            codes.append(str(item.get("code") or item.get("name") or item.get("message") or item))
        else:
            codes.append(str(item))
    return codes


def task_arguments(spec: str) -> list[str]:
    """The CLI's task arguments for a ``--tasks`` entry."""
    if ":" in spec:
        return [spec]
    if spec in BUILTIN_EXAMPLES:
        return ["--example", spec]
    own = OWN_TASKS / f"{spec}.py"
    if own.is_file():
        return [f"{own}:task"]
    raise SystemExit(
        f"--tasks: {spec!r} is neither a built-in example ({', '.join(BUILTIN_EXAMPLES)}), "
        f"a file in {OWN_TASKS.relative_to(ROOT)}/ nor a path.py:factory"
    )


def task_label(spec: str) -> str:
    return Path(spec.split(":")[0]).stem if ":" in spec else spec


# --------------------------------------------------------------------------------------------
# The load generator


@contextlib.contextmanager
def spinning_load(processes: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``processes`` Python processes that each keep one core busy, killed on exit, always."""
    spinners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            spinners.append(
                subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"],
                    stdin=subprocess.DEVNULL,
                    # Own session: a Ctrl-C reaches this script, which then kills them itself.
                    start_new_session=True,
                )
            )
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def raise_on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so the load generator's ``finally`` runs.
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    task: str
    condition: str
    seed: int
    global_batch: int | None
    lr: float | None
    wall_seconds: float
    load_before: float
    load_after: float
    exit_code: int | None  # None: killed at --run-timeout
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.global_batch is not None and self.lr is not None


def run_tune(
    spec: str,
    *,
    condition: str,
    seed: int,
    time_budget: float | None,
    timeout_seconds: float,
    report_dir: Path,
) -> Run:
    command = [
        str(BATCHPILOT),
        "tune",
        *task_arguments(spec),
        "--seed",
        str(seed),
        "--format",
        "json",
        "--out",
        str(report_dir),
    ]
    if time_budget is not None:
        command += ["--time-budget", str(time_budget)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_seconds, cwd=ROOT
        )
        exit_code: int | None = completed.returncode
        stdout, stderr = completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as exc:
        exit_code = None
        stdout = ""
        stderr = f"timed out after {timeout_seconds:g} s; " + _text(exc.stderr)
    wall_seconds = time.perf_counter() - start
    run = Run(
        task=task_label(spec),
        condition=condition,
        seed=seed,
        global_batch=None,
        lr=None,
        wall_seconds=wall_seconds,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        exit_code=exit_code,
    )
    if exit_code != 0:
        run.error = _last_line(stderr) or f"exit code {exit_code}"
        return run
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError as exc:
        run.error = f"stdout is not JSON ({exc}): {stdout[:200]!r}"
        return run
    run.global_batch = int(lookup(result, "global_batch"))
    run.lr = float(lookup(result, "lr"))
    run.warnings = warning_codes(lookup(result, "warnings", required=False))
    run.phase_seconds = dict(lookup(result, "phase_seconds", required=False) or {})
    return run


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------
# Summaries


@dataclass(frozen=True)
class RowSummary:
    """One task × condition: the medians (in log space, :func:`log_median`) of batch and lr, and how
    many runs sit close to them."""

    task: str
    condition: str
    runs: int
    failed: int
    median_batch: float | None
    batches_close: int  # within ×BATCH_SPREAD of the median; failed runs are misses
    median_lr: float | None
    lrs_close: int
    median_wall_seconds: float | None  # an ordinary median
    load_min: float
    load_max: float
    warnings: dict[str, int]

    @property
    def needed(self) -> int:
        return math.ceil(SHARE_NEEDED * self.runs)

    @property
    def batch_pass(self) -> bool:
        return self.runs > 0 and self.batches_close >= self.needed

    @property
    def lr_pass(self) -> bool:
        return self.runs > 0 and self.lrs_close >= self.needed


def within(value: float, centre: float, factor: float) -> bool:
    """``value`` within ×``factor`` of ``centre`` either way.

    >>> within(128, 256, 2.0), within(100, 256, 2.0)
    (True, False)

    Compared in log space with a little slack, so exactly ×2 of a float median counts.

    >>> within(256, 64 * 2.0000000000000004, 2.0)
    True
    """
    return abs(math.log(value / centre)) <= math.log(factor) + 1e-9


def log_median(values: Sequence[float]) -> float:
    """The median in log space: with an even count, the geometric mean of the middle two, so a
    ×2 spread reads the same either way (16 and 64 give 32, not 40).

    >>> round(log_median([16, 64]), 9), round(log_median([64, 128, 1024]), 9)
    (32.0, 128.0)
    """
    return float(math.exp(statistics.median(math.log(v) for v in values)))


def summarize_row(runs: Sequence[Run]) -> RowSummary:
    good = [run for run in runs if run.ok]
    batches = [float(run.global_batch) for run in good if run.global_batch is not None]
    lrs = [run.lr for run in good if run.lr is not None]
    median_batch = log_median(batches) if batches else None
    median_lr = log_median(lrs) if lrs else None
    loads = [load for run in runs for load in (run.load_before, run.load_after)]
    warnings: dict[str, int] = {}
    for run in good:
        for code in set(run.warnings):
            warnings[code] = warnings.get(code, 0) + 1
    return RowSummary(
        task=runs[0].task,
        condition=runs[0].condition,
        runs=len(runs),
        failed=len(runs) - len(good),
        median_batch=median_batch,
        batches_close=0
        if median_batch is None
        else sum(within(b, median_batch, BATCH_SPREAD) for b in batches),
        median_lr=median_lr,
        lrs_close=0 if median_lr is None else sum(within(lr, median_lr, LR_SPREAD) for lr in lrs),
        median_wall_seconds=statistics.median(run.wall_seconds for run in good) if good else None,
        load_min=min(loads),
        load_max=max(loads),
        warnings=warnings,
    )


@dataclass(frozen=True)
class TaskComparison:
    """One task, loaded against idle."""

    task: str
    batch_ratio: float | None
    lr_ratio: float | None
    wall_ratio: float | None

    @property
    def batch_pass(self) -> bool | None:
        return None if self.batch_ratio is None else within(self.batch_ratio, 1.0, LOADED_VS_IDLE)

    @property
    def lr_pass(self) -> bool | None:
        return None if self.lr_ratio is None else within(self.lr_ratio, 1.0, LOADED_VS_IDLE)

    @property
    def wall_pass(self) -> bool | None:
        return None if self.wall_ratio is None else self.wall_ratio <= WALL_RATIO_MAX


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def compare(idle: RowSummary, loaded: RowSummary) -> TaskComparison:
    return TaskComparison(
        task=idle.task,
        batch_ratio=_ratio(loaded.median_batch, idle.median_batch),
        lr_ratio=_ratio(loaded.median_lr, idle.median_lr),
        wall_ratio=_ratio(loaded.median_wall_seconds, idle.median_wall_seconds),
    )


# --------------------------------------------------------------------------------------------
# Tables


def _number(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _verdict(passed: bool | None) -> str:
    return "—" if passed is None else ("PASS" if passed else "FAIL")


ROW_COLUMNS = (
    "task",
    "condition",
    "median batch",
    "batch ×2",
    "median lr",
    "lr ×1.5",
    "median wall s",
    "load avg",
    "failed",
    "warnings (runs)",
)
TASK_COLUMNS = (
    "task",
    "batch loaded/idle",
    "lr loaded/idle",
    "wall loaded/idle",
    "rows: batch ×2",
    "rows: lr ×1.5",
    "batch ≤ ×2 idle",
    "lr ≤ ×2 idle",
    "wall ≤ 3×",
)


def row_cells(row: RowSummary) -> list[str]:
    warnings = ", ".join(f"{code} ({n})" for code, n in sorted(row.warnings.items())) or "—"
    return [
        row.task,
        row.condition,
        _number(row.median_batch, "g"),
        f"{row.batches_close}/{row.runs} {_verdict(row.batch_pass)}",
        _number(row.median_lr, ".4g"),
        f"{row.lrs_close}/{row.runs} {_verdict(row.lr_pass)}",
        _number(row.median_wall_seconds, ".1f"),
        f"{row.load_min:.2f}–{row.load_max:.2f}",
        str(row.failed),
        warnings,
    ]


def task_cells(
    task: str, rows: Sequence[RowSummary], comparison: TaskComparison | None
) -> list[str]:
    cells = [task]
    if comparison is None:
        cells += ["—", "—", "—"]
    else:
        cells += [
            _number(comparison.batch_ratio, ".2f"),
            _number(comparison.lr_ratio, ".2f"),
            _number(comparison.wall_ratio, ".2f"),
        ]
    cells += [
        _verdict(all(row.batch_pass for row in rows)),
        _verdict(all(row.lr_pass for row in rows)),
    ]
    if comparison is None:
        cells += ["—", "—", "—"]
    else:
        cells += [
            _verdict(comparison.batch_pass),
            _verdict(comparison.lr_pass),
            _verdict(comparison.wall_pass),
        ]
    return cells


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def rich_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < 2 else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Benchmark:
    tasks: list[str]
    seeds: int
    conditions: list[str]
    time_budget: float | None
    load_procs: int
    run_timeout_seconds: float
    load_warmup_seconds: float
    out: Path | None
    runs: list[Run] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    def save(self) -> None:
        if self.out is None:
            return
        document = {
            "started": self.started,
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "settings": {
                "tasks": self.tasks,
                "seeds": self.seeds,
                "conditions": self.conditions,
                "time_budget": self.time_budget,
                "load": f"{self.load_procs} spinning Python processes (while True: pass)",
                "load_procs": self.load_procs,
                "run_timeout_seconds": self.run_timeout_seconds,
                "load_warmup_seconds": self.load_warmup_seconds,
                "tune_keys": TUNE_KEYS,
            },
            "runs": [asdict(run) for run in self.runs],
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(document, indent=2) + "\n")

    def run_condition(self, condition: str, report_root: Path) -> None:
        for spec in self.tasks:
            for seed in range(self.seeds):
                run = run_tune(
                    spec,
                    condition=condition,
                    seed=seed,
                    time_budget=self.time_budget,
                    timeout_seconds=self.run_timeout_seconds,
                    report_dir=report_root / f"{task_label(spec)}-{condition}-{seed}",
                )
                self.runs.append(run)
                self.save()
                outcome = (
                    f"batch {run.global_batch}, lr {run.lr:.4g}"
                    if run.ok
                    else f"FAILED (exit {run.exit_code}): {run.error}"
                )
                print(
                    f"{run.task} {condition} seed {seed}: {outcome}, {run.wall_seconds:.1f} s, "
                    f"load {run.load_before:.2f}→{run.load_after:.2f}",
                    file=sys.stderr,
                    flush=True,
                )

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix="batchpilot-stability-") as tmp:
            for condition in self.conditions:
                if condition == "loaded":
                    with spinning_load(self.load_procs):
                        print(
                            f"loaded: {self.load_procs} spinning processes, warming up "
                            f"{self.load_warmup_seconds:g} s",
                            file=sys.stderr,
                            flush=True,
                        )
                        time.sleep(self.load_warmup_seconds)
                        self.run_condition(condition, Path(tmp))
                else:
                    self.run_condition(condition, Path(tmp))

    def report(self, *, markdown: bool) -> bool:
        """Print the tables; True when every goal that could be checked passed."""
        rows: dict[tuple[str, str], RowSummary] = {}
        for spec in self.tasks:
            for condition in self.conditions:
                runs = [
                    run
                    for run in self.runs
                    if run.task == task_label(spec) and run.condition == condition
                ]
                if runs:
                    rows[task_label(spec), condition] = summarize_row(runs)
        task_rows = []
        passed = all(row.batch_pass and row.lr_pass for row in rows.values())
        for spec in self.tasks:
            task = task_label(spec)
            mine = [row for (name, _), row in rows.items() if name == task]
            idle, loaded = rows.get((task, "idle")), rows.get((task, "loaded"))
            comparison = compare(idle, loaded) if idle and loaded else None
            if comparison is not None:
                verdicts = (comparison.batch_pass, comparison.lr_pass, comparison.wall_pass)
                passed = passed and all(v is True for v in verdicts)
            task_rows.append(task_cells(task, mine, comparison))
        failures = [run for run in self.runs if not run.ok]
        load = f"{self.load_procs} spinning Python processes on {os.cpu_count()} CPUs"
        budget = "default" if self.time_budget is None else f"{self.time_budget:g} s"
        heading = (
            f"tune stability: {self.seeds} seeds per row, time budget {budget}, "
            f"loaded = {load}; load avg = 1-min load average before/after each run"
        )
        row_cells_all = [row_cells(row) for row in rows.values()]
        if markdown:
            print(heading + "\n")
            print(markdown_table(ROW_COLUMNS, row_cells_all) + "\n")
            print(markdown_table(TASK_COLUMNS, task_rows))
        else:
            console = Console(width=200)
            console.print(heading)
            console.print(rich_table("per task × condition", ROW_COLUMNS, row_cells_all))
            console.print(
                rich_table("per task: loaded against idle, goals", TASK_COLUMNS, task_rows)
            )
        for run in failures:
            print(f"failed: {run.task} {run.condition} seed {run.seed}: {run.error}")
        unchecked = "" if len(self.conditions) == len(CONDITIONS) else " (loaded vs idle not run)"
        print(f"overall: {'PASS' if passed else 'FAIL'}{unchecked}")
        return passed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)}): built-in examples, "
        "files in benchmarks/tasks/, or path.py:factory",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per row (default 10)")
    parser.add_argument(
        "--conditions", default=None, help="comma-separated, idle and/or loaded (default both)"
    )
    parser.add_argument(
        "--time-budget", type=float, default=None, help="passed to tune as --time-budget"
    )
    parser.add_argument(
        "--load-procs",
        type=int,
        default=os.cpu_count() or 1,
        help="spinning processes of the loaded condition (default: one per CPU core)",
    )
    parser.add_argument(
        "--load-warmup",
        type=float,
        default=5.0,
        help="seconds the load spins before the loaded condition's first run (default 5)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=900.0,
        help="seconds before a tune run counts as failed (default 900)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file of every run's result")
    parser.add_argument(
        "--markdown", action="store_true", help="print Markdown tables (for docs/tune.md)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="run nothing: print the tables of a previous run's --out file",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {','.join(QUICK_TASKS)}, 2 seeds, idle only (explicit options win)",
    )
    args = parser.parse_args(argv)
    args.tasks = (
        args.tasks.split(",") if args.tasks else list(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    )
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    args.conditions = (
        args.conditions.split(",")
        if args.conditions
        else (["idle"] if args.quick else list(CONDITIONS))
    )
    if args.seeds <= 0:
        parser.error(f"--seeds: expected a positive integer, got {args.seeds}")
    if args.load_procs <= 0:
        parser.error(f"--load-procs: expected a positive integer, got {args.load_procs}")
    for condition in args.conditions:
        if condition not in CONDITIONS:
            parser.error(f"--conditions: expected idle and/or loaded, got {condition!r}")
    for spec in args.tasks:
        task_arguments(spec)  # fail on a bad name before any run
    return args


def load_benchmark(path: Path) -> Benchmark:
    """A finished (or interrupted) benchmark back from its ``--out`` file."""
    document = json.loads(path.read_text())
    settings = document["settings"]
    benchmark = Benchmark(
        tasks=settings["tasks"],
        seeds=settings["seeds"],
        conditions=settings["conditions"],
        time_budget=settings["time_budget"],
        load_procs=settings["load_procs"],
        run_timeout_seconds=settings["run_timeout_seconds"],
        load_warmup_seconds=settings.get("load_warmup_seconds", 0.0),
        out=None,
        started=document["started"],
    )
    benchmark.runs = [Run(**run) for run in document["runs"]]
    return benchmark


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return 0 if load_benchmark(args.from_json).report(markdown=args.markdown) else 1
    if not BATCHPILOT.exists():
        raise SystemExit(f"no {BATCHPILOT}: run scripts/setup.sh first")
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    benchmark = Benchmark(
        tasks=args.tasks,
        seeds=args.seeds,
        conditions=args.conditions,
        time_budget=args.time_budget,
        load_procs=args.load_procs,
        run_timeout_seconds=args.run_timeout,
        load_warmup_seconds=args.load_warmup,
        out=args.out,
    )
    try:
        benchmark.run()
    except TuneKeyError as exc:
        benchmark.save()
        raise SystemExit(f"stability: {exc}") from exc
    except KeyboardInterrupt:
        print("interrupted: the tables cover the runs so far", file=sys.stderr)
    if not benchmark.runs:
        return 1
    return 0 if benchmark.report(markdown=args.markdown) else 1


if __name__ == "__main__":
    sys.exit(main())
