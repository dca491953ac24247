"""A durable store of sweep trials in one SQLite file.

A sweep is hours of compute, so a finished trial must never be lost: each one is written with its
validation curve in one transaction and committed (``synchronous=FULL``) as soon as it finishes. The
file is in WAL mode with a busy timeout and every write takes the write lock up front
(``BEGIN IMMEDIATE``), so several sweeps — in several processes — can share one file; each sweep's
trials live under its name.

>>> with TrialStore(":memory:") as store:
...     store.open_sweep("demo", {"task": "xor4"})
...     store.sweep_names()
True
['demo']
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from batchpilot.errors import BadInputError
from batchpilot.jsonio import fields_dict
from batchpilot.sweep.trials import TrialResult

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    sweep TEXT NOT NULL REFERENCES sweeps(name),
    key TEXT NOT NULL,
    batch INTEGER NOT NULL,
    lr REAL,
    status TEXT NOT NULL,
    finished REAL NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (sweep, key)
);
CREATE TABLE IF NOT EXISTS curves (
    sweep TEXT NOT NULL,
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    seconds REAL NOT NULL,
    train_loss REAL,
    val_loss REAL,
    val_metric REAL,
    PRIMARY KEY (sweep, key, step)
);
"""


@dataclass(frozen=True)
class SweepRecord:
    """A sweep as stored: its name, when it was created, its settings and how many trials are done."""

    name: str
    created: float
    config: dict[str, Any]
    finished_trials: int
    failed_trials: int

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


class TrialStore:
    """Sweeps and their trials in the SQLite file at ``path`` (``":memory:"`` for a throwaway one)."""

    def __init__(
        self, path: str | Path, *, timeout_seconds: float = 60.0, read_only: bool = False
    ) -> None:
        self.path = str(path)
        self.read_only = read_only
        if self.path != ":memory:":
            folder = Path(self.path).parent
            if not folder.is_dir():
                raise BadInputError(f"store: no such folder {str(folder)!r}")
            if Path(self.path).is_dir():
                raise BadInputError(f"store: {self.path!r} is a folder, expected a SQLite file")
        if read_only and self.path == ":memory:":
            raise BadInputError("store: an in-memory store cannot be opened read-only")
        try:
            if read_only:  # reading commands never change the file, not even its journal mode
                self._db = sqlite3.connect(
                    Path(self.path).resolve().as_uri() + "?mode=ro",
                    uri=True,
                    timeout=timeout_seconds,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                self._db = sqlite3.connect(
                    self.path,
                    timeout=timeout_seconds,
                    isolation_level=None,
                    check_same_thread=False,
                )
        except sqlite3.Error as exc:
            raise BadInputError(f"store: cannot open {self.path!r} as SQLite: {exc}") from exc
        try:
            self._check_is_store()
            if not read_only:
                self._setup(timeout_seconds)
        except BadInputError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise BadInputError(
                f"store: {self.path!r} is not a batchpilot trial store: {exc}"
            ) from exc

    def _check_is_store(self) -> None:
        """Refuse a database that holds anything but a batchpilot store (an empty file is fine
        for writing: it becomes one)."""
        tables = {
            row[0]
            for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if not tables and version == 0 and not self.read_only:
            return
        missing = {"sweeps", "trials", "curves"} - tables
        if missing:
            raise BadInputError(
                f"store: {self.path!r} is not a batchpilot trial store (it has no "
                f"{', '.join(sorted(missing))} table)"
            )
        if version != SCHEMA_VERSION:
            raise BadInputError(
                f"store: {self.path!r} has schema version {version}, this batchpilot "
                f"reads version {SCHEMA_VERSION}"
            )

    def _setup(self, timeout_seconds: float) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout_seconds * 1000)}")
        self._retry(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
        # FULL: a committed trial survives a power cut too, not only a killed process.
        self._db.execute("PRAGMA synchronous = FULL")
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise BadInputError(
                    f"store: {self.path!r} has schema version {version}, this batchpilot "
                    f"reads version {SCHEMA_VERSION}"
                )

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @property
    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def open_sweep(self, name: str, config: dict[str, Any]) -> bool:
        """Register sweep ``name`` with ``config``; ``True`` if new, ``False`` if it was there.

        A stored sweep of that name with other settings is refused: its trials would not be
        comparable with the new ones.
        """
        text = json.dumps(config, sort_keys=True)
        with self._write() as db:
            row = db.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO sweeps (name, created, config) VALUES (?, ?, ?)",
                    (name, time.time(), text),
                )
                return True
        stored = json.loads(row[0])
        if stored != json.loads(text):
            differ = sorted(
                key for key in set(stored) | set(config) if stored.get(key) != config.get(key)
            )
            raise BadInputError(
                f"name: the store already holds a sweep {name!r} run with other settings "
                f"({', '.join(differ)} differ); choose another name or store"
            )
        return False

    def sweep_config(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._config(name, row[0])

    def _config(self, name: str, text: Any) -> dict[str, Any]:
        try:
            config = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise self._damaged(f"the settings of sweep {name!r}", exc) from exc
        if not isinstance(config, dict):
            raise self._damaged(
                f"the settings of sweep {name!r}", TypeError(f"a {type(config).__name__}")
            )
        return config

    def _damaged(self, what: str, exc: BaseException) -> BadInputError:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BadInputError(f"store: {self.path!r} is damaged: {what} cannot be read ({detail})")

    def sweep_names(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM sweeps ORDER BY created")]

    def sweeps(self) -> list[SweepRecord]:
        rows = self._db.execute(
            """
            SELECT s.name, s.created, s.config,
                   SUM(CASE WHEN t.status = 'done' THEN 1 ELSE 0 END),
                   SUM(CASE WHEN t.status = 'failed' THEN 1 ELSE 0 END)
            FROM sweeps s LEFT JOIN trials t ON t.sweep = s.name
            GROUP BY s.name ORDER BY s.created
            """
        ).fetchall()
        return [
            SweepRecord(name, created, self._config(name, config), int(done or 0), int(failed or 0))
            for name, created, config, done, failed in rows
        ]

    def save(self, sweep: str, result: TrialResult) -> bool:
        """Commit ``result`` and its curve; ``False`` if a finished trial with its key was already
        stored (that one is kept). A failed trial is replaced when the trial is run again."""
        payload = result.to_dict()
        payload.pop("curve")
        with self._write() as db:
            row = db.execute(
                "SELECT status FROM trials WHERE sweep = ? AND key = ?", (sweep, result.key)
            ).fetchone()
            if row is not None and row[0] == "done":
                return False
            db.execute("DELETE FROM curves WHERE sweep = ? AND key = ?", (sweep, result.key))
            db.execute(
                "INSERT OR REPLACE INTO trials (sweep, key, batch, lr, status, finished, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    sweep,
                    result.key,
                    result.batch,
                    result.lr,
                    result.status,
                    time.time(),
                    json.dumps(payload, allow_nan=True),
                ),
            )
            db.executemany(
                "INSERT INTO curves (sweep, key, step, samples, seconds, train_loss, val_loss, "
                "val_metric) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        sweep,
                        result.key,
                        p.step,
                        p.samples,
                        p.seconds,
                        p.train_loss,
                        p.val_loss,
                        p.val_metric,
                    )
                    for p in result.curve
                ],
            )
        return True

    def trials(self, sweep: str, *, status: str | None = None) -> list[TrialResult]:
        """The stored trials of ``sweep`` (all, or those with ``status``), by batch then lr."""
        return self._load(sweep, status=status)

    def get(self, sweep: str, key: str) -> TrialResult | None:
        """The stored trial ``key`` of ``sweep``, if any."""
        found = self._load(sweep, key=key)
        return found[0] if found else None

    def _load(
        self, sweep: str, *, status: str | None = None, key: str | None = None
    ) -> list[TrialResult]:
        where, args = "sweep = ?", [sweep]
        if key is not None:
            where, args = where + " AND key = ?", [*args, key]
        curves: dict[str, list[dict[str, Any]]] = {}
        for row in self._db.execute(
            "SELECT key, step, samples, seconds, train_loss, val_loss, val_metric FROM curves "
            f"WHERE {where} ORDER BY key, step",
            args,
        ):
            curves.setdefault(row[0], []).append(
                {
                    "step": row[1],
                    "samples": row[2],
                    "seconds": row[3],
                    "train_loss": _float(row[4]),
                    "val_loss": _float(row[5]),
                    "val_metric": row[6],
                }
            )
        if status is not None:
            where, args = where + " AND status = ?", [*args, status]
        results = [
            self._trial(sweep, trial_key, text, curves.get(trial_key, []))
            for trial_key, text in self._db.execute(
                f"SELECT key, result FROM trials WHERE {where}", args
            )
        ]
        try:
            return sorted(results, key=lambda r: (r.batch, r.lr_factor, r.key))
        except TypeError as exc:
            raise self._damaged(f"the trials of sweep {sweep!r}", exc) from exc

    def _trial(self, sweep: str, key: str, text: Any, curve: list[dict[str, Any]]) -> TrialResult:
        """One stored trial; a row that does not hold one is reported, not raised as a crash."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, expected an object")
            return TrialResult.from_dict({**data, "curve": curve})
        except (TypeError, ValueError, KeyError) as exc:
            raise self._damaged(f"trial {key!r} of sweep {sweep!r}", exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the write lock from its start, committed on exit."""
        self._retry(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._retry(lambda: self._db.execute("COMMIT"))

    @staticmethod
    def _retry(operation: Any, attempts: int = 20) -> Any:
        # The busy timeout covers most waits; a few operations (switching to WAL while another
        # process opens the file) report "locked" at once instead, so try those again.
        for attempt in range(attempts):
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return None


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)
