"""The largest batch that fits: batchpilot against Lightning's ``Tuner.scale_batch_size``.

Every run happens in a fresh child process (forked from this one, so imports are paid once) that
gets a real memory limit: ``RLIMIT_AS`` is set to the child's address space once its data is built
plus the model's headroom, so an allocation past it fails inside torch with
``DefaultCPUAllocator: can't allocate memory``, the error both tools recognise as running out of
memory. The headroom holds everything else: the model, its gradients and optimizer state, the
activations and the tool's own bookkeeping. Per model it prints

* the true maximum: the largest micro-batch whose fresh process runs ``--steps`` training steps on
  the worst-case batch (the longest sample repeated) under the limit, by bisection over fresh
  processes;
* each tool's answer as a fraction of it (marked ``OOM!`` when larger: it would fail in the real
  run), the training steps it ran (failed ones included) and its wall time.

Both tools use the same safety margin (``--margin``, Lightning's ``margin`` argument and
batchpilot's ``margin``). Two CPU artefacts that device memory does not have are switched off, for
every process alike, so that the address space measures what a GPU's memory would: glibc's malloc
returns freed tensors' address space at once (a fixed mmap threshold; without it the address
space a step needs varies by up to 1.6× with the allocation history: ``--malloc default``), and
oneDNN keeps no compiled kernels per batch shape (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``; its cache
takes ~2.5 MiB of address space for each new conv shape, so every probe of a new batch size
shrinks what is left: ``--kernel-cache`` keeps it).

Run: ``.venv/bin/python benchmarks/max_batch.py`` (about 5–8 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import os
import sys

# Read by oneDNN when torch loads it, so it is decided here, before the imports.
if "--kernel-cache" not in sys.argv:
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "0"

import argparse
import ctypes
import gc
import importlib
import logging
import math
import multiprocessing as mp
import re
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from batchpilot.measure._memory import largest_sample_index, training_step
from batchpilot.measure._memory_search import find_max_batch
from batchpilot.oom import is_out_of_memory
from batchpilot.task import Task

SAMPLES = 16384


# --------------------------------------------------------------------------------------------
# The models: a CNN with BatchNorm (SGD), an MLP (Adam), a small Transformer on variable-length
# sequences padded per batch (AdamW).


def cnn_task() -> Task:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(SAMPLES, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (SAMPLES,), generator=generator)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

    return Task(
        name="cnn",
        model=model,
        train_data=TensorDataset(images, labels),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        reference_lr=0.05,
    )


def mlp_task() -> Task:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, 256, generator=generator)
    labels = torch.randint(0, 10, (SAMPLES,), generator=generator)

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(256, 768), nn.ReLU(), nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 10)
        )

    return Task(
        name="mlp",
        model=model,
        train_data=TensorDataset(inputs, labels),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        reference_lr=1e-3,
    )


class Sequences(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Token sequences of 8 to 32 tokens with a binary label."""

    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(8, 33, (count,), generator=generator)
        self.items = [
            (torch.randint(1, 1000, (int(n),), generator=generator), torch.tensor(int(n) % 2))
            for n in lengths
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]


def pad(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = nn.utils.rnn.pad_sequence([s[0] for s in samples], batch_first=True)
    return tokens, torch.stack([s[1] for s in samples])


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64, padding_idx=0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def seq_task() -> Task:
    return Task(
        name="transformer",
        model=TinyTransformer,
        train_data=Sequences(SAMPLES),
        collate_fn=pad,
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr),
        reference_lr=1e-3,
    )


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Task]
    headroom_mib: int


CASES = (
    Case("cnn (conv+BN, SGD)", cnn_task, 128),
    Case("mlp (Adam)", mlp_task, 64),
    Case("transformer (AdamW, padded)", seq_task, 192),
)


# --------------------------------------------------------------------------------------------
# Children: a fresh process with a real allocation limit.


def _address_space() -> int:
    with open("/proc/self/status") as status:
        match = re.search(r"^VmSize:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def _limit(headroom_mib: int) -> None:
    gc.collect()
    limit = _address_space() + headroom_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _in_child(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a forked child; its result, or the exception text."""
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def main() -> None:
        try:
            sender.send(("ok", function(*args)))
        except BaseException as exc:
            sender.send(("error", f"{type(exc).__name__}: {str(exc)[:200]}"))

    process = context.Process(target=main)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", "child died"
    process.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def runs(case: Case, micro_batch: int, steps: int) -> bool:
    """Whether ``steps`` training steps at ``micro_batch`` run under the limit (a fresh process)."""
    task = case.make()
    sample = task.train_data[largest_sample_index(task)]
    _limit(case.headroom_mib)
    try:
        model = task.make_model("cpu")
        optimizer = task.make_optimizer(model.parameters(), task.reference_lr or 1e-3)
        for _ in range(steps):
            batch = (task.collate_fn or torch.utils.data.default_collate)([sample] * micro_batch)
            training_step(task, model, optimizer, batch, device=torch.device("cpu"))
            del batch
    except Exception as exc:
        if is_out_of_memory(exc):
            return False
        raise
    return True


def true_maximum(case: Case, steps: int, tolerance: float) -> tuple[int, int]:
    """Bisection over fresh processes; returns the maximum and the processes it took."""
    lo, hi, children = 0, 0, 0
    batch = 256
    while hi == 0:
        children += 1
        if _in_child(runs, case, batch, steps):
            lo, batch = batch, batch * 2
        else:
            hi = batch
    while hi - lo > max(1, math.floor(lo * tolerance)):
        middle = (lo + hi) // 2
        children += 1
        if _in_child(runs, case, middle, steps):
            lo = middle
        else:
            hi = middle
    return lo, children


def batchpilot_answer(case: Case, margin: float) -> tuple[int, int, float, int]:
    task = case.make()
    _limit(case.headroom_mib)
    started = time.perf_counter()
    result = find_max_batch(task, device="cpu", margin=margin)
    fake = sum(probe.estimated for probe in result.probes)
    return result.max_micro_batch, result.steps, time.perf_counter() - started, fake


def lightning_answer(case: Case, mode: str, margin: float) -> tuple[int, int, float, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    task = case.make()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = task.model()
            self.batch_size = 2
            self.calls = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.calls += 1
            return task.loss(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return task.optimizer(self.net.parameters(), task.reference_lr or 1e-3)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(
                task.train_data,
                batch_size=self.batch_size,
                shuffle=True,
                collate_fn=task.collate_fn,
            )

    def trainer(folder: str, **kwargs: Any) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
            **kwargs,
        )

    with tempfile.TemporaryDirectory() as folder:
        # Warm up Lightning's own machinery on a throwaway module before the limit (batchpilot's
        # was warmed up in the parent), then build the module inside the headroom.
        trainer(folder, max_steps=1).fit(Module())
        gc.collect()
        _limit(case.headroom_mib)
        module = Module()
        started = time.perf_counter()
        found = Tuner(trainer(folder, max_epochs=1)).scale_batch_size(
            module, mode=mode, margin=margin
        )
        seconds = time.perf_counter() - started
    return int(found or 0), module.calls, seconds, 0


# --------------------------------------------------------------------------------------------


def pin_malloc() -> None:
    """A fixed mmap threshold: every tensor above 64 KiB is its own mapping, unmapped when freed."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    if libc.mallopt(m_mmap_threshold, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="comma-separated names or 'all'")
    parser.add_argument("--margin", type=float, default=0.02, help="safety margin of both tools")
    parser.add_argument("--steps", type=int, default=3, help="steps a fresh process must run")
    parser.add_argument("--tolerance", type=float, default=0.005, help="true-max bisection")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned")
    parser.add_argument("--kernel-cache", action="store_true", help="keep oneDNN's kernel cache")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("this benchmark needs Linux (RLIMIT_AS and /proc/self/status)")
    warnings.filterwarnings("ignore")
    if args.malloc == "pinned":
        pin_malloc()
    torch.set_num_threads(1)
    # Pay the imports once, in the parent, so children do not spend their headroom on them.
    for module in ("lightning.pytorch", "torch.distributed._tools.mem_tracker"):
        importlib.import_module(module)

    # Warm both tools up the same way: Lightning runs one fit in each child before the limit;
    # batchpilot's fake-tensor machinery is imported and run once here (children inherit it).
    find_max_batch(mlp_task(), budget_bytes=2**30, max_batch=64, mode="fake")
    for logger in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)

    cases = [
        c for c in CASES if args.models == "all" or c.name.split()[0] in args.models.split(",")
    ]
    started = time.perf_counter()
    print(
        f"max batch under a real RLIMIT_AS limit, torch {torch.__version__}, 1 thread, "
        f"margin {args.margin:g} for both tools, malloc {args.malloc}, oneDNN kernel cache "
        f"{'on' if args.kernel_cache else 'off'}; machine shared with other jobs (wall times are "
        "indicative)",
        flush=True,
    )
    rows = []
    for case in cases:
        truth, children = true_maximum(case, args.steps, args.tolerance)
        print(f"{case.name}: true max {truth} ({children} fresh processes)", flush=True)
        answers = {}
        for tool, function, extra in (
            ("batchpilot", batchpilot_answer, ()),
            ("lightning power", lightning_answer, ("power",)),
            ("lightning binsearch", lightning_answer, ("binsearch",)),
        ):
            try:
                answers[tool] = _in_child(function, case, *extra, args.margin)
            except RuntimeError as exc:
                answers[tool] = (0, 0, float("nan"), 0)
                print(f"  {tool} failed: {exc}", flush=True)
            found, steps, seconds, _ = answers[tool]
            print(f"  {tool}: {found} in {steps} steps, {seconds:.1f} s", flush=True)
        rows.append((case, truth, answers))

    print()
    print(
        "| model | headroom | true max | tool | answer | of true max | training steps | wall s |\n"
        "|---|---|---:|---|---:|---:|---:|---:|"
    )
    for case, truth, answers in rows:
        for tool, (found, steps, seconds, fake) in answers.items():
            fraction = found / truth if truth else float("nan")
            flag = " OOM!" if found > truth else ""
            probes = f"{steps} (+{fake} on fake tensors)" if fake else str(steps)
            print(
                f"| {case.name} | {case.headroom_mib} MiB | {truth} | {tool} | {found} | "
                f"{fraction:.1%}{flag} | {probes} | {seconds:.1f} |"
            )
    print()
    for case, truth, answers in rows:
        bp, binsearch = answers["batchpilot"], answers["lightning binsearch"]
        if not truth:
            continue
        if binsearch[1]:
            print(
                f"{case.name}: batchpilot {bp[0] / truth:.1%} of the true max with "
                f"{bp[1] / binsearch[1]:.2f}× the steps of Lightning binsearch "
                f"({bp[1]} vs {binsearch[1]}), {bp[2] / binsearch[2]:.2f}× its wall time"
            )
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
