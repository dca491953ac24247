"""Where trials run: in this process, in a local process pool, or on a Ray cluster.

Every executor takes a batch of :class:`~batchpilot.sweep.trials.TrialSpec` and yields results as
they finish, so the runner commits each one at once. Pool and Ray workers load the task from its
spec string with :func:`batchpilot.loading.load_task` (a task holds lambdas, which do not pickle)
and keep it for the next trials they run.

Ray is optional (``pip install 'batchpilot[ray]'``) and imported only when asked for. Without an
``address`` it starts a local Ray (``ray.init()``); with one it joins that cluster. A Ray that is
already running in this process (``ray.init`` called by the user) is used as it is.

>>> executor = make_executor("inprocess")
>>> executor.name
'inprocess'
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Literal, Protocol, get_args

import torch

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError
from batchpilot.loading import load_task
from batchpilot.sweep.trials import TrialResult, TrialSpec, failed_trial, run_trial
from batchpilot.task import Task

ExecutorName = Literal["inprocess", "pool", "ray"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)
RAY_MISSING = (
    "executor: 'ray' needs Ray, which is not installed here; install it with "
    "pip install 'batchpilot[ray]' (or pip install 'ray[tune]')"
)


class Executor(Protocol):
    """Runs trials and yields their results in the order they finish."""

    name: str

    def run(self, task: Task | None, specs: Sequence[TrialSpec]) -> Iterator[TrialResult]:
        """Run ``specs``; ``task`` is the loaded task (executors in this process use it, others
        load ``spec.task`` in their workers)."""
        ...

    def close(self) -> None:
        """Release workers (idempotent)."""
        ...


class InProcessExecutor:
    """One trial after another in this process: no start-up cost, the only one that takes a
    :class:`Task` object rather than a spec string, and the one to time trials with."""

    name = "inprocess"

    def run(self, task: Task | None, specs: Sequence[TrialSpec]) -> Iterator[TrialResult]:
        for spec in specs:
            yield run_trial(task if task is not None else _cached_task(_spec_of(spec)), spec)

    def close(self) -> None:
        return None


class PoolExecutor:
    """A local pool of ``workers`` processes (started with ``spawn``: safe with CUDA and OpenMP),
    each using ``threads_per_worker`` torch threads so that workers do not oversubscribe cores."""

    name = "pool"

    def __init__(
        self, workers: int | None = None, *, threads_per_worker: int | None = None
    ) -> None:
        cores = os.cpu_count() or 1
        self.workers = check_positive_int("workers", workers) if workers is not None else cores
        self.threads_per_worker = (
            check_positive_int("threads_per_worker", threads_per_worker)
            if threads_per_worker is not None
            else max(1, cores // self.workers)
        )
        self._pool: ProcessPoolExecutor | None = None

    def run(self, task: Task | None, specs: Sequence[TrialSpec]) -> Iterator[TrialResult]:
        for spec in specs:
            _spec_of(spec)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads_per_worker,),
            )
        pending: set[Future[TrialResult]] = {
            self._pool.submit(_run_in_worker, spec) for spec in specs
        }
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RayExecutor:
    """Trials as Ray tasks, each asking for ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs.

    ``address=None`` starts a local Ray (``num_cpus`` caps it); ``"auto"`` or ``"ray://host:port"``
    joins a cluster, whose nodes must be able to import batchpilot and the task (a file-based task
    spec is made absolute, so the file must be at the same path there, or shipped with a Ray
    ``runtime_env``). A Ray this executor started is shut down by :meth:`close`.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        threads_per_trial: int | None = None,
    ) -> None:
        if not cpus_per_trial > 0:
            raise BadInputError(
                f"cpus_per_trial: expected a positive number, got {cpus_per_trial!r}"
            )
        if not gpus_per_trial >= 0:
            raise BadInputError(f"gpus_per_trial: expected a number ≥ 0, got {gpus_per_trial!r}")
        if num_cpus is not None:
            check_positive_int("num_cpus", num_cpus)
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.threads_per_trial = threads_per_trial or max(1, int(cpus_per_trial))
        self._ray: Any = None
        self._started = False

    def _connect(self) -> Any:
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["num_cpus"] = self.num_cpus
            else:
                options["address"] = self.address
            ray.init(**options)
            self._started = True
        self._ray = ray
        return ray

    def run(self, task: Task | None, specs: Sequence[TrialSpec]) -> Iterator[TrialResult]:
        for spec in specs:
            _spec_of(spec)
        ray = self._connect()
        remote = ray.remote(_run_in_worker_with_threads).options(
            num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial, max_retries=0
        )
        refs = {remote.remote(spec, self.threads_per_trial): spec for spec in specs}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    spec = refs.pop(ref)
                    yield self._result(ray, ref, spec)
        finally:
            for ref in refs:
                ray.cancel(ref)

    @staticmethod
    def _result(ray: Any, ref: Any, spec: TrialSpec) -> TrialResult:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            # A worker or node that died takes its trial with it; the sweep goes on, and a
            # resumed sweep runs that trial again.
            return failed_trial(spec, f"Ray: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray, self._started = None, False


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`BadInputError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise BadInputError(RAY_MISSING) from exc
    return ray


def make_executor(
    name: str,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    gpus_per_trial: float = 0.0,
) -> Executor:
    """The executor called ``name``: ``inprocess``, ``pool`` (``workers`` processes) or ``ray``
    (local, ``workers`` CPUs, unless ``ray_address`` names a cluster)."""
    if name == "inprocess":
        return InProcessExecutor()
    if name == "pool":
        return PoolExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=workers, gpus_per_trial=gpus_per_trial)
    raise BadInputError(
        f"executor: unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}"
    )


def _spec_of(spec: TrialSpec) -> str:
    if spec.task is None:
        raise BadInputError(
            "task: trials outside this process load the task from its spec "
            "(path/to/file.py:factory or package.module:factory); pass the spec, not a Task object"
        )
    return spec.task


# Each worker process loads a task once and keeps it for the trials that follow.
_TASKS: dict[str, Task] = {}


def _cached_task(spec: str) -> Task:
    if spec not in _TASKS:
        _TASKS[spec] = load_task(spec)
    return _TASKS[spec]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(spec: TrialSpec) -> TrialResult:
    return run_trial(_cached_task(_spec_of(spec)), spec)


def _run_in_worker_with_threads(spec: TrialSpec, threads: int) -> TrialResult:
    torch.set_num_threads(threads)
    return _run_in_worker(spec)
