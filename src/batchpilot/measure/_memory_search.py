"""The largest micro-batch that fits: a fitted memory model, checked by real steps.

Memory per training step is close to a line in the micro-batch, ``bytes(b) = fixed + per_sample·b``
(parameters, gradients and optimizer state are fixed; activations grow with the batch). Two probes
give the line, a third checks it where it matters, and the line's answer under the limit is
verified by a real step. When the line fits poorly (allocator rounding, workspaces that switch on
at some batch) the search brackets the answer instead: a safeguarded secant between the largest
batch that fitted and the smallest that did not. Probes can run on fake tensors (no memory, no
compute) with real steps only to verify; the answer is always a batch a real step fitted at.

The budget is the device's free memory unless given. A step fits when its peak stays within the
budget less the user's margin and less the allocator's overhead (reserved − allocated) measured
at the largest real probe.

>>> parse_size("256MiB"), parse_size("80GB"), parse_size("1.5 GiB")
(268435456, 80000000000, 1610612736)
>>> format_bytes(268435456)
'256.0 MiB'
>>> fit = fit_memory_model([(8, 1800), (64, 7400)])
>>> fit.fixed_bytes, fit.bytes_per_sample, fit.max_batch(100_000)
(1000.0, 100.0, 990)
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from batchpilot.checks import check_positive_int
from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.jsonio import fields_dict
from batchpilot.measure._memory import (
    MemoryProbe,
    StepMemory,
    TensorTracker,
    available_memory,
    check_mode,
    resolve_mode,
)
from batchpilot.oom import is_out_of_memory
from batchpilot.task import Task

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

# The search's knobs: first probes, how well the line must predict the check probe, how close
# the bracket must close, and how many probes it may spend.
FIRST_PROBES = (4, 32)
FIT_TOLERANCE = 0.05
BRACKET_TOLERANCE = 0.02
MAX_PROBES = 16

Stage = Literal["fit", "check", "verify", "bracket"]
CappedBy = Literal["memory", "dataset", "max_batch"]


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``"80GB"`` (10⁹), ``"80GiB"`` or ``"80G"`` (2³⁰), ``"512MiB"``, ``"1e9"``.

    >>> parse_size("80GiB") == 80 * 2**30, parse_size(1024), parse_size("64k")
    (True, 1024, 65536)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise BadInputError(f"device_memory: expected a positive size, got {text!r}")
        return text
    else:
        match = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text)
        )
        if not match or match.group(2).lower() not in _UNITS:
            raise BadInputError(
                f"device_memory: cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 512MiB "
                "or a number of bytes"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value * _UNITS[unit]):
        raise BadInputError(f"device_memory: {text!r} is too large to be a size")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise BadInputError(f"device_memory: expected a positive size, got {text!r}")
    return size


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps it ≥ 1 (``"1.5 GiB"``).

    >>> format_bytes(512), format_bytes(3 * 2**30 / 2)
    ('512 B', '1.5 GiB')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class MemoryFit:
    """``bytes(b) = fixed_bytes + bytes_per_sample · b``, least squares over the probes it saw."""

    fixed_bytes: float
    bytes_per_sample: float
    max_relative_error: float

    def predict(self, micro_batch: float) -> float:
        return self.fixed_bytes + self.bytes_per_sample * micro_batch

    def max_batch(self, limit_bytes: float) -> int:
        """The largest batch the line keeps at or under ``limit_bytes`` (0 if none)."""
        if self.bytes_per_sample <= 0:
            return 0 if self.fixed_bytes > limit_bytes else 2**62
        return max(0, math.floor((limit_bytes - self.fixed_bytes) / self.bytes_per_sample))


def fit_memory_model(points: Sequence[tuple[int, float]]) -> MemoryFit:
    """The least-squares line through ``(micro_batch, bytes)`` points (at least two batches).

    >>> round(fit_memory_model([(1, 10), (2, 20), (4, 41)]).bytes_per_sample, 2)
    10.36
    """
    batches = sorted({b for b, _ in points})
    if len(batches) < 2:
        raise ValueError("fit_memory_model: needs points at two different batches at least")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (y - mean_y) for b, y in points) / var
    fixed = mean_y - slope * mean_b
    error = max(abs(fixed + slope * b - y) / max(abs(y), 1.0) for b, y in points)
    return MemoryFit(fixed_bytes=fixed, bytes_per_sample=slope, max_relative_error=error)


@dataclass(frozen=True)
class Probe:
    """One measured step of the search; ``estimated`` when it ran on fake tensors."""

    batch: int
    peak_bytes: int | None
    reserved_bytes: int | None
    ok: bool
    out_of_memory: bool
    stage: str
    estimated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`search_max_batch` found: the largest batch measured to fit, and how."""

    max_batch: int
    probes: tuple[Probe, ...]
    fit: MemoryFit | None
    poor_fit: bool
    overhead_bytes: int
    peak_limit_bytes: int


Measure = Callable[[int], StepMemory]


@dataclass
class _Run:
    batch: int
    step: StepMemory | None  # None: ran out of memory
    stage: str
    estimated: bool


def search_max_batch(
    measure: Measure,
    *,
    limit_bytes: float,
    cap: int,
    estimates: Sequence[Probe] = (),
    overhead_bytes: float = 0.0,
    on_out_of_memory: Callable[[], None] | None = None,
    first_probes: tuple[int, int] = FIRST_PROBES,
    fit_tolerance: float = FIT_TOLERANCE,
    bracket_tolerance: float = BRACKET_TOLERANCE,
    max_probes: int = MAX_PROBES,
    min_batch: int = 1,
) -> SearchOutcome:
    """The largest ``b ≤ cap`` whose measured step stays within ``limit_bytes``.

    ``measure(b)`` runs one real step and returns its memory, or raises an out-of-memory error
    (any other error propagates); ``on_out_of_memory`` is called after each such failure, once its
    exception is released, to free memory.

    A step fits when it does not run out of memory and its peak plus the allocator's overhead
    (reserved − peak at the largest real probe; ``overhead_bytes`` until one is measured) stays
    within ``limit_bytes``. A step that runs out of memory below the line's answer shows memory
    the probes cannot see: the search steps down from it, 2 %, 4 %, 8 %… while failures follow
    each other, and bisects once a smaller batch has fitted.

    Without ``estimates``, two probes give the line, a third checks it halfway, and real steps
    verify and bracket. ``estimates`` are the probes of a search already run on fake tensors (no
    memory, no compute): they are the line's points, and real steps only verify their answer and
    bracket from there. The answer is the largest batch a real step fitted at; 0 when not even
    ``min_batch`` (the smallest micro-batch the model trains on) fits; no probe goes below it.

    >>> from batchpilot.measure._memory import StepMemory
    >>> def fake(b):  # 1 kB fixed, 100 B a sample
    ...     return StepMemory(b, 1000 + 100 * b, 1000 + 100 * b, 1000, "fake", "cpu")
    >>> outcome = search_max_batch(fake, limit_bytes=50_000, cap=10_000)
    >>> outcome.max_batch, [probe.batch for probe in outcome.probes]
    (490, [4, 32, 125, 490, 499])
    """
    check_positive_int("cap", cap)
    check_positive_int("min_batch", min_batch)
    if min_batch > cap:
        raise BadInputError(f"min_batch: expected at most cap ({cap}), got {min_batch}")
    runs: list[_Run] = []

    def overhead() -> float:
        real = [r for r in runs if r.step is not None and not r.estimated]
        if not real:
            return float(overhead_bytes)
        step = max(real, key=lambda r: r.batch).step
        assert step is not None
        return float(max(0, step.reserved_bytes - step.peak_bytes))

    def peak_limit() -> float:
        return limit_bytes - overhead()

    def fits(run: _Run) -> bool:
        return run.step is not None and run.step.peak_bytes <= peak_limit()

    def bracket() -> tuple[int, int]:
        """lo: the largest batch a real step fitted at; hi: the smallest above it that did not."""
        lo = max((r.batch for r in runs if fits(r) and not r.estimated), default=0)
        hi = min((r.batch for r in runs if not fits(r) and r.batch > lo), default=cap + 1)
        return lo, hi

    def peaks() -> dict[int, float]:
        """Measured peaks by batch; a real measurement replaces an estimate."""
        found: dict[int, float] = {}
        for r in sorted(runs, key=lambda r: not r.estimated):
            if r.step is not None:
                found[r.batch] = float(r.step.peak_bytes)
        return found

    def line() -> MemoryFit | None:
        """The secant through the two measured probes nearest the limit, one on each side if
        possible: interpolation once the answer is bracketed, extrapolation from the top before."""
        measured, limit = peaks(), peak_limit()
        if len(measured) < 2:
            return None
        below = sorted(b for b, used in measured.items() if used <= limit)
        above = sorted(b for b, used in measured.items() if used > limit)
        if below and above:
            chosen = [below[-1], above[0]]
        else:
            chosen = sorted(measured)[-2:] if below else sorted(measured)[:2]
        return fit_memory_model([(b, measured[b]) for b in chosen])

    def run(batch: int, stage: Stage) -> StepMemory | None:
        try:
            step: StepMemory | None = measure(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            step = None
        if step is None and on_out_of_memory is not None:
            on_out_of_memory()
        runs.append(_Run(batch, step, stage, estimated=False))
        return step

    def closed() -> bool:
        lo, hi = bracket()
        return lo >= cap or hi - lo <= max(1, math.floor(lo * bracket_tolerance))

    poor_fit = False
    if estimates:
        # 1. The search already ran on fake tensors: verify its answer.
        runs += [_Run(p.batch, _as_step(p), p.stage, estimated=True) for p in estimates]
        answer = max((r.batch for r in runs if fits(r)), default=0)
        if answer > 0:
            run(answer, "verify")
    else:
        # 1. Two probes for the line.
        for batch in sorted({min(cap, max(min_batch, b)) for b in first_probes}):
            if batch < bracket()[1]:
                run(batch, "fit")
        # 2. Before a long extrapolation, check the line halfway (in log) to its answer.
        fit, (lo, hi) = line(), bracket()
        if fit is not None and lo > 0 and hi > cap:
            predicted = min(fit.max_batch(peak_limit()), cap)
            if predicted > 4 * lo:
                check = round(math.sqrt(lo * predicted))
                step = run(check, "check")
                if step is not None:
                    error = abs(step.peak_bytes - fit.predict(check))
                    poor_fit = error > fit_tolerance * step.peak_bytes
    # 3. Verify the line's answer with a real step; bracket until the answer is pinned down.
    careful = poor_fit and not estimates  # estimates near the limit make the line local
    out_of_memory_in_a_row = same_side_in_a_row = 0
    while not closed() and sum(not r.estimated for r in runs) < max_probes:
        fit, (lo, hi) = line(), bracket()
        if fit is None:  # one probe measured at most
            candidate = 2 * lo if lo else max(min_batch, hi // 4)
        else:
            candidate = fit.max_batch(peak_limit())
            if candidate <= lo:
                # The line puts the answer at lo: a probe just past the bracket's tolerance
                # either closes the bracket or shows the line wrong (a jump in memory below lo).
                candidate = lo + max(1, math.floor(lo * bracket_tolerance))
        candidate = min(candidate, cap)
        if hi <= cap and lo > 0 and same_side_in_a_row >= 2:
            # The secant keeps landing on one side of the limit: memory steps somewhere in the
            # bracket (a workspace switching on); the line is no guide in it any more.
            careful = True
        if careful and hi <= cap:  # bisect the bracket
            candidate = (lo + hi) // 2
        elif careful:  # grow at most 4× past the largest batch that fitted
            candidate = min(candidate, 4 * max(lo, 1))
        if hi <= cap:  # a failure above lo bounds the answer
            middle = (lo + hi) // 2
            if out_of_memory_in_a_row or candidate >= hi:
                # Failures the line cannot see: back off from them, 2 %, 4 %, 8 %… with every
                # failure in a row, never below the middle of the bracket.
                step_down = bracket_tolerance * 2 ** max(0, out_of_memory_in_a_row - 1)
                candidate = min(candidate, math.floor(hi * (1 - min(0.5, step_down))))
                candidate = max(candidate, middle)
        candidate = max(min_batch, min(max(candidate, lo + 1), hi - 1))
        if candidate >= hi:  # nothing left to try between min_batch and a failure
            break
        verified = any(r.stage == "verify" for r in runs)
        fitted_before = fits(runs[-1]) if runs else None
        step = run(candidate, "bracket" if verified else "verify")
        out_of_memory_in_a_row = out_of_memory_in_a_row + 1 if step is None else 0
        same_side_in_a_row = same_side_in_a_row + 1 if fits(runs[-1]) == fitted_before else 1
    if bracket()[0] == 0 and not any(r.batch == min_batch and not r.estimated for r in runs):
        run(min_batch, "bracket")  # out of probes, nothing verified: settle whether any fits

    lo, _ = bracket()
    probes = tuple(
        Probe(
            batch=r.batch,
            peak_bytes=None if r.step is None else r.step.peak_bytes,
            reserved_bytes=None if r.step is None else r.step.reserved_bytes,
            ok=fits(r),
            out_of_memory=r.step is None,
            stage=r.stage,
            estimated=r.estimated,
        )
        for r in runs
    )
    measured = peaks()
    fit = fit_memory_model(list(measured.items())) if len(measured) >= 2 else None
    return SearchOutcome(
        max_batch=lo,
        probes=probes,
        fit=fit,
        poor_fit=poor_fit,
        overhead_bytes=round(overhead()),
        peak_limit_bytes=math.floor(peak_limit()),
    )


def _as_step(probe: Probe) -> StepMemory | None:
    if probe.peak_bytes is None or probe.reserved_bytes is None:
        return None
    return StepMemory(probe.batch, probe.peak_bytes, probe.reserved_bytes, 0, "fake", "")


def _default_budget(
    device: torch.device, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> tuple[int, str]:
    """What the device has free now, plus what the user's model and optimizer already hold there
    (they are part of every peak), except on CUDA where the allocator's cache already counts it."""
    available = available_memory(device)
    if device.type == "cuda" or model is None:
        return available.bytes, available.source
    with TensorTracker(device, model, optimizer) as tracker:
        pass
    held = tracker.start_bytes
    return available.bytes + held, f"{available.source} + {format_bytes(held)} your model holds"


@dataclass(frozen=True)
class MaxBatchResult:
    """The largest micro-batch that fits, the memory model behind it, and every probe.

    ``peak_bytes`` (allocated, or live tensors) and ``reserved_bytes`` (what the allocator held)
    were measured at ``max_micro_batch``; ``fixed_bytes + bytes_per_sample · b`` is the line
    fitted to the probes' peaks. ``margin_bytes`` is the user's margin (``margin · budget``) plus
    ``overhead_bytes``, the allocator's overhead (reserved − allocated) measured at the largest
    probe; a step fitted when its peak stayed within ``limit_bytes = budget_bytes − margin_bytes``.
    ``precision`` is the task's precision the steps ran in.
    """

    max_micro_batch: int
    peak_bytes: int
    reserved_bytes: int
    fixed_bytes: int
    bytes_per_sample: float
    budget_bytes: int
    budget_source: str
    margin: float
    margin_bytes: int
    limit_bytes: int
    overhead_bytes: int
    fit_error: float | None
    poor_fit: bool
    capped_by: str
    mode: str
    device: str
    steps: int
    seconds: float
    probes: tuple[Probe, ...]
    notes: tuple[str, ...] = ()
    precision: str = "32"

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


def find_max_batch(
    task: Task,
    *,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    margin: float = 0.05,
    max_batch: int | None = None,
    mode: str = "auto",
    seed: int = 0,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> MaxBatchResult:
    """The largest micro-batch of ``task`` whose training step fits in the budget.

    Args:
        device: where the steps run (``"cpu"``, ``"cuda"``, …).
        budget_bytes: memory a step may use; default: what the device has free (on a CPU, the
            available RAM, a container's or an address-space limit, whichever is least).
        margin: fraction of the budget kept free for what the probes cannot see.
        max_batch: an upper bound of your own; the training-set size always bounds the search.
        mode: ``"cuda"`` (allocator statistics), ``"tracked"`` (live tensors, any device),
            ``"fake"`` (fake tensors: plan for a device you do not have) or ``"auto"``: cuda on
            CUDA; on other devices tracked, or fake when ``budget_bytes`` is more than this
            machine has.
        model, optimizer: probe these objects (left bitwise unchanged) instead of fresh ones.

    Raises:
        BadInputError: if not even a micro-batch of 1 fits, or an argument is invalid.
        UserCodeError: if the task's own code fails with anything but running out of memory.
    """
    started = time.perf_counter()
    device = torch.device(device)
    check_mode(mode)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise BadInputError(f"margin: expected a fraction in [0, 1), got {margin!r}")
    if budget_bytes is not None:
        check_positive_int("budget_bytes", budget_bytes)
    if max_batch is not None:
        check_positive_int("max_batch", max_batch)
    notes: list[str] = []
    if (
        mode == "auto"
        and device.type != "cuda"
        and budget_bytes is not None
        and budget_bytes > (free := available_memory(device)).bytes
    ):
        mode = "fake"
        notes.append(
            f"the budget ({format_bytes(budget_bytes)}) is more than this machine has free "
            f"({format_bytes(free.bytes)}): measured on fake tensors"
        )
    mode = resolve_mode(mode, device)
    if mode == "fake":
        notes.append(
            "fake tensors count the bytes of tensors: add the CUDA context (~0.3–1 GiB, outside "
            "the budget torch sees) and allocator fragmentation to the margin"
        )

    cap, capped_by = task.train_size, "dataset"
    if max_batch is not None and max_batch < cap:
        cap, capped_by = max_batch, "max_batch"

    if budget_bytes is None:
        if mode == "fake":
            raise BadInputError(
                "budget_bytes: fake tensors have no device to measure; give the memory of the "
                "device to plan for (e.g. 80GiB)"
            )
        # Read before anything is built: what the search builds is part of every peak it sees.
        budget, source = _default_budget(device, model, optimizer)
    else:
        budget, source = budget_bytes, "given"
    margin_bytes = math.ceil(margin * budget)
    limit = budget - margin_bytes

    estimates: tuple[Probe, ...] = ()
    if mode == "tracked":
        # The search first runs on fake tensors (no memory, no compute, no kernel caches left
        # behind by batch shapes the real run never uses); real steps then verify its answer.
        try:
            with MemoryProbe(task, device=device, mode="fake", seed=seed) as fake:
                estimates = search_max_batch(fake.measure, limit_bytes=limit, cap=cap).probes
        except (BadInputError, UserCodeError) as exc:
            notes.append(f"fitted on real steps: fake tensors do not run this model ({exc})")
    with MemoryProbe(
        task, device=device, mode=mode, model=model, optimizer=optimizer, seed=seed
    ) as probe:
        assert probe.priming is not None
        smallest_batch = probe.min_micro_batch
        if smallest_batch > cap:
            raise BadInputError(
                f"{capped_by}: the model cannot train on fewer than {smallest_batch} samples per "
                f"step (a step at micro-batch 1 fails), but the search is capped at {cap}"
            )
        outcome = search_max_batch(
            probe.measure,
            estimates=estimates,
            limit_bytes=limit,
            cap=cap,
            on_out_of_memory=probe.release,
            overhead_bytes=probe.priming.overhead_bytes,
            min_batch=smallest_batch,
        )
        steps = probe.steps
    if outcome.max_batch == 0:
        smallest = next((p for p in outcome.probes if p.batch == smallest_batch), None)
        need = (
            f"a step at micro-batch {smallest_batch} needs {format_bytes(smallest.peak_bytes)}"
            if smallest is not None and smallest.peak_bytes is not None
            else f"a step at micro-batch {smallest_batch} ran out of memory"
        )
        raise BadInputError(
            f"budget_bytes: not even a micro-batch of {smallest_batch} fits: {need}, the limit is "
            f"{format_bytes(outcome.peak_limit_bytes)} ({format_bytes(budget)} budget − "
            f"{margin:.0%} margin − {format_bytes(outcome.overhead_bytes)} allocator overhead)"
        )
    at_answer = next(p for p in reversed(outcome.probes) if p.batch == outcome.max_batch and p.ok)
    assert at_answer.peak_bytes is not None and at_answer.reserved_bytes is not None
    if outcome.max_batch < cap:
        capped_by = "memory"
    elif capped_by == "dataset":
        notes.append(f"the whole training set ({cap} samples) fits in one micro-batch")
    if budget_bytes is None:
        notes.append(f"no budget given: using {format_bytes(budget)}, {source}")
    if outcome.poor_fit:
        notes.append("memory is not linear in the batch here: the answer was bracketed by probes")
    fit = outcome.fit
    return MaxBatchResult(
        max_micro_batch=outcome.max_batch,
        peak_bytes=at_answer.peak_bytes,
        reserved_bytes=at_answer.reserved_bytes,
        fixed_bytes=round(fit.fixed_bytes) if fit else at_answer.peak_bytes,
        bytes_per_sample=fit.bytes_per_sample if fit else 0.0,
        budget_bytes=budget,
        budget_source=source,
        margin=float(margin),
        margin_bytes=budget - outcome.peak_limit_bytes,
        limit_bytes=outcome.peak_limit_bytes,
        overhead_bytes=outcome.overhead_bytes,
        fit_error=fit.max_relative_error if fit else None,
        poor_fit=outcome.poor_fit,
        capped_by=capped_by,
        mode=mode,
        device=str(device),
        steps=steps,
        seconds=time.perf_counter() - started,
        probes=outcome.probes,
        notes=tuple(notes),
        precision=task.precision,
    )


__all__ = [
    "MaxBatchResult",
    "MemoryFit",
    "Probe",
    "SearchOutcome",
    "find_max_batch",
    "fit_memory_model",
    "format_bytes",
    "parse_size",
    "search_max_batch",
]
