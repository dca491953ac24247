"""The peak memory of one real training step at a given micro-batch, three ways.

A step is what a training loop does for one micro-batch: forward, backward into gradients that
already exist (as under gradient accumulation), and the optimizer step, with its state already
created by a first step. Its peak is measured

* ``"cuda"``: from the CUDA caching allocator (peak allocated; peak reserved as allocator overhead);
* ``"tracked"``: on any device, CPU included, by following the bytes of every live tensor storage
  through a ``TorchDispatchMode`` (:class:`TensorTracker`);
* ``"fake"``: on fake tensors (``FakeTensorMode``), which have shapes but no storage, so a laptop
  can answer what fits on a card it does not have.

Every probe batch repeats the training set's largest sample, so variable-size inputs are measured
at their worst. The step runs in the task's precision (:attr:`Task.precision`): the loss under its
autocast, and for ``"16-mixed"`` through a ``GradScaler`` (except on fake tensors, which run no
scaler: its memory is one scalar). :class:`MemoryProbe` keeps one model and optimizer for a
series of probes and, on exit, leaves the user's model, optimizer and RNG bitwise as they were and
frees what it allocated.

>>> from batchpilot.loading import load_task
>>> step = measure_step_memory(load_task(example="xor4"), 8, mode="fake")
>>> step.peak_bytes > step.persistent_bytes > 0
True
"""

from __future__ import annotations

import logging
import os
import re
import resource
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import default_collate

from batchpilot.checks import check_positive_int, check_trainable
from batchpilot.data import to_device
from batchpilot.devices import release_memory
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.jsonio import fields_dict
from batchpilot.oom import is_out_of_memory
from batchpilot.precision import backward, make_scaler, optimizer_step, step_skipped
from batchpilot.state import preserved, preserved_rng
from batchpilot.task import Task

MemoryMode = Literal["auto", "tracked", "cuda", "fake"]
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)

# Fake batches are shaped from a real batch of this many copies of the largest sample.
_TEMPLATE_SIZE = 2

# Above this many samples the largest one is looked for in a seeded subset, not the whole set.
LARGEST_SAMPLE_SCAN = 2048

# Under "16-mixed" a step whose gradients overflowed is skipped by the GradScaler (no optimizer
# step, so a lower peak) and run again: up to this many times while priming (the scale starts at
# 2**16 and halves on each overflow until it settles), and this many for a probe.
_PRIMING_SKIPS = 24
_PROBE_SKIPS = 2


@dataclass(frozen=True)
class StepMemory:
    """The memory one training step took at ``micro_batch``.

    Attributes:
        peak_bytes: peak bytes in use during the step (allocated on CUDA; live tensors otherwise),
            including the persistent state.
        reserved_bytes: peak bytes the allocator held (CUDA reserved); ``peak_bytes`` where the
            allocator says nothing (tracked and fake modes: on a CPU, glibc's heap and the kernel
            libraries' caches are invisible to tensor tracking).
        persistent_bytes: bytes held before the step: parameters, buffers, gradients, optimizer
            state (and, on CUDA, anything else the process keeps on the device).
        by_category: the tracked peak split into parameters, buffers, gradients, optimizer_state
            and step (activations, the batch and temporaries at the peak); empty on CUDA.
    """

    micro_batch: int
    peak_bytes: int
    reserved_bytes: int
    persistent_bytes: int
    mode: str
    device: str
    by_category: Mapping[str, int] = field(default_factory=dict)

    @property
    def overhead_bytes(self) -> int:
        """Bytes the allocator held beyond those in use at the peak."""
        return max(0, self.reserved_bytes - self.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**fields_dict(self), "overhead_bytes": self.overhead_bytes}


def check_mode(mode: str) -> MemoryMode:
    if mode not in MEMORY_MODES:
        raise BadInputError(
            f"mode: unknown mode {mode!r}; expected one of {', '.join(MEMORY_MODES)}"
        )
    return mode  # type: ignore[return-value]


def resolve_mode(mode: str, device: torch.device) -> MemoryMode:
    """``auto`` is ``cuda`` on a CUDA device and ``tracked`` elsewhere."""
    mode = check_mode(mode)
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "tracked"
    if mode == "cuda" and device.type != "cuda":
        raise BadInputError(f"mode: 'cuda' needs a CUDA device, got device {str(device)!r}")
    return mode


# ---------------------------------------------------------------------------------------------
# Tensor tracking: a dispatch mode that follows every tensor storage from creation to release.
#
# PyTorch's own MemTracker (torch.distributed._tools.mem_tracker) does this too, with a per-module
# breakdown, but its module hooks keep the tensors of a step that ran out of memory alive after the
# exception is gone (34 MiB of a 128 MiB budget in our benchmark), so a search would lose memory
# with every failed probe. The tests compare the two on steps that succeed.


class TensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages on ``device`` while the context is open.

    The storages of ``model`` (parameters, buffers, gradients) and ``optimizer`` (state) count from
    the start; every storage an operator creates inside the context counts from its creation to
    its release (views share their base's storage, so nothing is counted twice). Memory a kernel
    allocates for itself without making a tensor is not seen.

    >>> model = torch.nn.Linear(4, 2)
    >>> with TensorTracker(torch.device("cpu"), model) as tracker:
    ...     out = model(torch.zeros(16, 4))
    >>> tracker.start_bytes, tracker.peak_bytes - tracker.start_bytes
    (40, 384)
    """

    def __init__(
        self,
        device: torch.device,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        super().__init__()
        self.device = device
        # id(storage) → (weak reference whose callback uncounts it, bytes counted)
        self._live: dict[int, tuple[weakref.ref[Any], int]] = {}
        self.current_bytes = 0
        self.start_bytes = 0
        self.peak_bytes = 0
        self.start_by_category: dict[str, int] = {}
        if model is not None:
            self._count_category("parameters", list(model.parameters()))
            self._count_category("buffers", list(model.buffers()))
            self._count_category("gradients", [p.grad for p in model.parameters()])
        if optimizer is not None:
            state = [v for values in optimizer.state.values() for v in values.values()]
            self._count_category("optimizer_state", state)
        self.start_bytes = self.peak_bytes = self.current_bytes

    @property
    def peak_by_category(self) -> dict[str, int]:
        """The persistent categories at the start and ``step``: what the step added at its peak."""
        return {**self.start_by_category, "step": self.peak_bytes - self.start_bytes}

    def _count_category(self, name: str, values: list[Any]) -> None:
        before = self.current_bytes
        for value in values:
            if isinstance(value, torch.Tensor):
                self._count(value)
        self.start_by_category[name] = self.current_bytes - before

    def _count(self, tensor: torch.Tensor) -> None:
        if not _same_device(tensor.device, self.device):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        key, size = id(storage), storage.nbytes()
        known = self._live.get(key)
        if known is not None and known[0]() is storage:
            if known[1] != size:  # resized in place
                self.current_bytes += size - known[1]
                self._live[key] = (known[0], size)
            return
        self._live[key] = (weakref.ref(storage, self._released(key)), size)
        self.current_bytes += size

    def _released(self, key: int) -> Any:
        def callback(reference: weakref.ref[Any]) -> None:
            known = self._live.get(key)
            if known is not None and known[0] is reference:
                del self._live[key]
                self.current_bytes -= known[1]

        return callback

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return result

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        # Stop counting: the callbacks of storages freed later must not touch a finished tracker.
        self._live.clear()


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        index_a = a.index if a.index is not None else torch.cuda.current_device()
        index_b = b.index if b.index is not None else torch.cuda.current_device()
        return index_a == index_b
    return True


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


@dataclass(frozen=True)
class AvailableMemory:
    """Memory a search may fill on a device, and where the number comes from."""

    bytes: int
    source: str


def available_memory(device: torch.device) -> AvailableMemory:
    """How many bytes more this process can allocate on ``device`` right now.

    CUDA: the device's free memory plus what this process's allocator already holds. CPU: the
    smallest of the system's available memory, the cgroup (container) limit left and the
    address-space limit (``RLIMIT_AS``) left. MPS: the recommended working set.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        return AvailableMemory(free + reserved, "CUDA free memory + this process's reserved cache")
    if device.type == "mps":
        limit = int(torch.mps.recommended_max_memory())
        return AvailableMemory(
            max(0, limit - int(torch.mps.driver_allocated_memory())),
            "MPS recommended working set − memory this process holds",
        )
    candidates: list[tuple[int, str]] = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        candidates.append((meminfo, "available RAM (MemAvailable)"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        candidates.append((cgroup, "container memory limit − usage (cgroup)"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _status_bytes("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        candidates.append(
            (max(0, soft - size), "address-space limit (RLIMIT_AS) − address space in use")
        )
    if not candidates:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            candidates.append((int(pages), "free physical memory"))
        except (ValueError, OSError, AttributeError):
            candidates.append((8 * 2**30, "an assumed 8 GiB (this system does not say)"))
    return AvailableMemory(*min(candidates))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current") as current_file:
            current = int(current_file.read().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - current)


# ---------------------------------------------------------------------------------------------
# Probe batches: the largest sample, repeated.


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(item) for item in value)
    return 0


def _collate(task: Task, samples: list[Any]) -> Any:
    collate = task.collate_fn if task.collate_fn is not None else default_collate
    try:
        return collate(samples)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        where = "Task.collate_fn(samples)" if task.collate_fn is not None else "collating samples"
        raise UserCodeError.wrap(where, exc) from exc


def largest_sample_index(task: Task, *, seed: int = 0) -> int:
    """The index of the training sample whose batch of one takes the most bytes.

    Variable-size inputs (sequences padded by a collate function) are probed with this sample
    repeated, the worst case a real batch can meet. Sets over :data:`LARGEST_SAMPLE_SCAN` samples
    are searched in a seeded subset of that size.

    >>> from batchpilot.loading import load_task
    >>> largest_sample_index(load_task(example="xor4"))
    0
    """
    from torch.utils.data import TensorDataset

    dataset = task.train_data
    if isinstance(dataset, TensorDataset):  # every sample has the same shape
        return 0
    size = task.train_size
    if size <= LARGEST_SAMPLE_SCAN:
        indices = list(range(size))
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(size, generator=generator)[:LARGEST_SAMPLE_SCAN].tolist()
    best, best_bytes = indices[0], -1
    for index in indices:
        nbytes = _nbytes(_collate(task, [dataset[index]]))
        if nbytes > best_bytes:
            best, best_bytes = index, nbytes
    return best


def _fake_batch(template: Any, size: int, micro_batch: int, device: torch.device) -> Any:
    """``template`` (a batch of ``size`` copies) with every batch dimension made ``micro_batch``.

    Called inside a FakeTensorMode: the tensors it makes have shapes but no storage.
    """
    if isinstance(template, torch.Tensor):
        shape = tuple(template.shape)
        if shape and shape[0] == size:
            shape = (micro_batch, *shape[1:])
        return torch.zeros(shape, dtype=template.dtype, device=device)
    if isinstance(template, Mapping):
        return type(template)(  # type: ignore[call-arg]
            {k: _fake_batch(v, size, micro_batch, device) for k, v in template.items()}
        )
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_fake_batch(v, size, micro_batch, device) for v in template))
    if isinstance(template, list | tuple):
        return type(template)(_fake_batch(v, size, micro_batch, device) for v in template)
    return template


# ---------------------------------------------------------------------------------------------
# One training step, with the user's errors told apart from running out of memory.


def training_step(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    device: torch.device,
    set_to_none: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Forward, backward and optimizer step on ``batch``, in the task's precision.

    The forward runs under the task's autocast (:meth:`Task.compute_loss`); with a ``scaler``
    (``"16-mixed"``, from :func:`batchpilot.precision.make_scaler`) the loss is scaled and the
    gradients are unscaled before the step, whose cost (a few small kernels and one device sync)
    is part of the step. Out-of-memory errors pass through unchanged; any other exception from
    the user's code is raised as :class:`UserCodeError` naming where it came from.
    """
    optimizer.zero_grad(set_to_none=set_to_none)
    batch = to_device(batch, device)
    loss = task.compute_loss(model, batch)
    _user_call("loss.backward()", partial(backward, loss, scaler))
    del loss, batch
    _user_call("optimizer.step()", partial(optimizer_step, optimizer, scaler))


def _user_call(where: str, function: Any) -> None:
    try:
        function()
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise UserCodeError.wrap(where, exc) from exc


_FAKE_ERRORS = (
    "DataDependentOutputException",
    "DynamicOutputShapeException",
    "UnsupportedOperatorException",
    "UnsupportedFakeTensorException",
    "GuardOnDataDependentSymNode",
)


def _explain_fake_failure(exc: UserCodeError) -> BadInputError | None:
    message = str(exc)
    if any(name in message for name in _FAKE_ERRORS):
        return BadInputError(
            "mode: the model cannot run on fake tensors (it reads tensor values or uses an "
            f"operator fake tensors lack: {message}); measure with mode 'tracked' or on the device"
        )
    return None


@contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Keep torch's fake-tensor logger quiet: it logs the traceback of every operator that fails
    on fake tensors, and that failure reaches the user anyway, as one line."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# A series of probes on one model.


class MemoryProbe(AbstractContextManager["MemoryProbe"]):
    """Measures training steps of ``task`` at several micro-batches on one model and optimizer.

    On entry the model and optimizer are built (or the user's are taken) and one priming step at
    micro-batch 1 creates the gradients and optimizer state, so every measured step finds them in
    place as a long run does. On exit the user's model, optimizer and every RNG stream are restored
    bitwise, and the memory the probes used is released.

    >>> from batchpilot.loading import load_task
    >>> with MemoryProbe(load_task(example="spiral"), mode="fake") as probe:
    ...     small, large = probe.measure(16), probe.measure(64)
    >>> large.peak_bytes > small.peak_bytes
    True
    """

    def __init__(
        self,
        task: Task,
        *,
        device: torch.device | str = "cpu",
        mode: str = "auto",
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
    ) -> None:
        if optimizer is not None and model is None:
            raise BadInputError("optimizer: give the model it optimizes too")
        self.task = task
        self.device = torch.device(device)
        self.mode = resolve_mode(mode, self.device)
        self.seed = seed
        self._user_model = model
        self._user_optimizer = optimizer
        self._stack = ExitStack()
        self._fake_mode: Any = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.priming: StepMemory | None = None
        self.min_micro_batch = 1
        # "16-mixed": the loss scaler every step goes through (none on fake tensors, whose
        # overflow check cannot read a value; its memory is one scalar and in-place unscaling)
        self.scaler: torch.amp.GradScaler | None = None
        self._skips = _PRIMING_SKIPS
        self._sample: Any = None
        self._template: Any = None
        if model is not None and self.mode == "fake":
            raise BadInputError("mode: 'fake' builds its own fake model; do not pass a model")

    def __enter__(self) -> MemoryProbe:
        try:
            self._enter()
        except BaseException:
            self._stack.close()
            release_memory(self.device)
            raise
        return self

    def _enter(self) -> None:
        task = self.task
        self._sample = task.train_data[largest_sample_index(task, seed=self.seed)]
        self._stack.enter_context(preserved_rng())
        torch.manual_seed(self.seed)
        if self._user_model is not None:
            # The snapshot is taken before we create an optimizer or touch anything.
            self._stack.enter_context(preserved(self._user_model, self._user_optimizer))
            self.model = self._user_model
            self.optimizer = self._user_optimizer or task.make_optimizer(
                self._user_model.parameters(), task.reference_lr or 1e-3
            )
        elif self.mode == "fake":
            self._enter_fake()
        else:
            self.model = task.make_model(self.device)
            self.optimizer = task.make_optimizer(self.model.parameters(), task.reference_lr or 1e-3)
        assert self.model is not None
        check_trainable(self.model)
        self.model.train()
        if self._fake_mode is None:
            self.scaler = make_scaler(task.precision, self.device)
        # Priming: from here on gradients and optimizer state exist, as in a long run, and the
        # first-call costs (kernel selection, caches) are paid before anything is measured.
        out_of_memory = False
        try:
            self.priming = self._prime()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True
        self._skips = _PROBE_SKIPS
        if out_of_memory:  # raised here, so that no traceback keeps the failed step's tensors
            raise BadInputError(
                f"budget_bytes: not even a micro-batch of 1 fits on {self.device}: a training "
                "step at micro-batch 1 ran out of memory"
            )
        release_memory(self.device, full=False)

    def _prime(self) -> StepMemory:
        """The first step, at the smallest micro-batch the model accepts.

        Some models cannot train on one sample (BatchNorm after a Linear layer needs two values
        per channel): when a step at 1 fails and one at 2 runs, 2 is the smallest micro-batch
        (:attr:`min_micro_batch`) and no probe goes below it.
        """
        measure = self._measure_cuda if self.mode == "cuda" else self._measure_tracked
        try:
            return measure(1)
        except UserCodeError as exc:
            failure = exc
        if self.task.train_size < 2:
            raise failure
        release_memory(self.device, full=True)
        try:
            step = measure(2)
        except UserCodeError:
            raise failure from None
        self.min_micro_batch = 2
        return step

    def _enter_fake(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self._stack.enter_context(_quiet_fake_tensor_log())

        # Fake parameters cannot be moved with .to(): they are built where they belong.
        if self.device.type != "cuda":
            self.device = torch.device("cpu")
        self._template = _collate(self.task, [self._sample] * _TEMPLATE_SIZE)
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self._fake_mode, torch.device(self.device), warnings.catch_warnings():
            # Models that deep-copy their layers (nn.TransformerEncoder) touch fake data pointers.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            try:
                model = self.task.model()
            except Exception as exc:
                raise UserCodeError.wrap("Task.model()", exc) from exc
            if not isinstance(model, nn.Module):
                raise BadInputError(
                    "Task.model(): expected it to return a torch.nn.Module, "
                    f"got {type(model).__name__}"
                )
            self.model = model
            self.optimizer = self.task.make_optimizer(
                model.parameters(), self.task.reference_lr or 1e-3
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.model = None
        self.optimizer = None
        self.scaler = None
        self._sample = None
        self._template = None
        try:
            self._stack.close()
        finally:
            self._fake_mode = None
            release_memory(self.device)

    def _fake_context(self) -> AbstractContextManager[Any]:
        return self._fake_mode if self._fake_mode is not None else nullcontext()

    def _run(self, micro_batch: int) -> None:
        """One training step; in fake mode, call it inside :meth:`_fake_context`."""
        assert self.model is not None and self.optimizer is not None
        self.steps += 1
        try:
            if self._fake_mode is not None:
                batch = _fake_batch(self._template, _TEMPLATE_SIZE, micro_batch, self.device)
            else:
                batch = _collate(self.task, [self._sample] * micro_batch)
            for _ in range(self._skips if self.scaler is not None else 1):
                scale = None if self.scaler is None else self.scaler.get_scale()
                training_step(
                    self.task,
                    self.model,
                    self.optimizer,
                    batch,
                    device=self.device,
                    scaler=self.scaler,
                )
                if not step_skipped(self.scaler, scale):
                    break
        except UserCodeError as exc:
            explained = _explain_fake_failure(exc) if self._fake_mode is not None else None
            if explained is not None:
                raise explained from exc
            raise

    def measure(self, micro_batch: int) -> StepMemory:
        """The memory of one training step at ``micro_batch``.

        Raises the allocator's own exception when the step runs out of memory (recognise it with
        :func:`batchpilot.oom.is_out_of_memory`); the probe stays usable after it.
        """
        check_positive_int("micro_batch", micro_batch)
        if self.model is None:
            raise RuntimeError("MemoryProbe.measure: use the probe inside a `with` block")
        if micro_batch < self.min_micro_batch:
            raise BadInputError(
                f"micro_batch: the model cannot train on fewer than {self.min_micro_batch} "
                f"samples per step (a step at 1 fails), got {micro_batch}"
            )
        try:
            if self.mode == "cuda":
                return self._measure_cuda(micro_batch)
            return self._measure_tracked(micro_batch)
        finally:
            release_memory(self.device, full=False)

    def release(self) -> None:
        """Free everything a failed step left behind; call it once its exception is handled
        (the traceback holds the step's tensors until then)."""
        release_memory(self.device, full=True)

    def _measure_cuda(self, micro_batch: int) -> StepMemory:
        device = self.device
        release_memory(device, full=False)
        torch.cuda.reset_peak_memory_stats(device)
        persistent = torch.cuda.memory_allocated(device)
        self._run(micro_batch)
        torch.cuda.synchronize(device)
        return StepMemory(
            micro_batch=micro_batch,
            peak_bytes=int(torch.cuda.max_memory_allocated(device)),
            reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
            persistent_bytes=int(persistent),
            mode=self.mode,
            device=str(device),
        )

    def _measure_tracked(self, micro_batch: int) -> StepMemory:
        release_memory(self.device, full=False)
        tracker = TensorTracker(self.device, self.model, self.optimizer)
        # The tracker is entered inside the fake mode, so that it follows the fake tensors.
        with self._fake_context(), tracker:
            self._run(micro_batch)
        return StepMemory(
            micro_batch=micro_batch,
            peak_bytes=tracker.peak_bytes,
            reserved_bytes=tracker.peak_bytes,
            persistent_bytes=tracker.start_bytes,
            mode=self.mode,
            device=str(self.device),
            by_category=tracker.peak_by_category,
        )


def measure_step_memory(
    task: Task,
    micro_batch: int,
    *,
    device: torch.device | str = "cpu",
    mode: str = "auto",
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
) -> StepMemory:
    """The peak memory of one training step of ``task`` at ``micro_batch``.

    With ``model`` (and ``optimizer``) the user's own objects are measured and left bitwise as they
    were; otherwise fresh ones are built from the task. Raises the allocator's exception if the
    step does not fit.
    """
    check_positive_int("micro_batch", micro_batch)
    with MemoryProbe(
        task, device=device, mode=mode, model=model, optimizer=optimizer, seed=seed
    ) as probe:
        return probe.measure(micro_batch)


__all__ = [
    "MEMORY_MODES",
    "AvailableMemory",
    "MemoryMode",
    "MemoryProbe",
    "StepMemory",
    "TensorTracker",
    "available_memory",
    "largest_sample_index",
    "measure_step_memory",
    "resolve_mode",
    "training_step",
]
