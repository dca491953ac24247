"""Runnable demonstrations of what practitioners' guides claim, each measured rather than asserted.

Every demo trains small models on CPU in well under a minute (``quick=True``: a few seconds, for
tests), returns a frozen result with ``to_dict()``, the seed's ``claim``, the numbers it measured,
its ``findings`` (each part of the claim with what was measured and whether it holds) and a
``verdict`` that says plainly when the measurement does not reproduce the claim.

>>> [demo.name for demo in list_demos()]
['xor', 'playground', 'sketch', 'decay-vs-batch']
>>> result = run_demo("sketch", seed=0, quick=True, epochs=20)
>>> result.claim == DEMOS["sketch"].claim
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from batchpilot.demos import decay_vs_batch, playground, sketch, xor
from batchpilot.demos.decay_vs_batch import DecayVsBatchResult, run_decay_vs_batch
from batchpilot.demos.findings import Finding
from batchpilot.demos.playground import PlaygroundResult, run_playground
from batchpilot.demos.sketch import SketchResult, run_sketch
from batchpilot.demos.xor import XorResult, run_xor
from batchpilot.errors import BadInputError

DemoResult = XorResult | PlaygroundResult | SketchResult | DecayVsBatchResult


@dataclass(frozen=True)
class Demo:
    """A registered demonstration: what it reproduces and the function that runs it."""

    name: str
    summary: str
    source: str
    claim: str
    run: Callable[..., DemoResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "source": self.source,
            "claim": self.claim,
        }


DEMOS: dict[str, Demo] = {
    demo.name: demo
    for demo in (
        Demo(
            xor.NAME,
            "full-batch GD on 4-input XOR descends in stairs; mini-batch SGD at the same lr",
            xor.SOURCE,
            xor.CLAIM,
            run_xor,
        ),
        Demo(
            playground.NAME,
            "the Playground spiral at batch 1 (150 epochs) and batch 30 (300 epochs)",
            playground.SOURCE,
            playground.CLAIM,
            run_playground,
        ),
        Demo(
            sketch.NAME,
            "six 1-D points fitted at batch 1, 2, 3 and 6: the batch as a drawing stroke",
            sketch.SOURCE,
            sketch.CLAIM,
            run_sketch,
        ),
        Demo(
            decay_vs_batch.NAME,
            "decaying the lr against increasing the batch (Smith et al. 2018) on digits",
            decay_vs_batch.SOURCE,
            decay_vs_batch.CLAIM,
            run_decay_vs_batch,
        ),
    )
}


def list_demos() -> tuple[Demo, ...]:
    """Every demonstration, in the order practitioners' guides tell them."""
    return tuple(DEMOS.values())


def run_demo(name: str, *, seed: int = 0, quick: bool = False, **options: Any) -> DemoResult:
    """Run the demonstration ``name`` (``options`` go to its ``run_*`` function) on one CPU
    thread, restored afterwards."""
    if name not in DEMOS:
        raise BadInputError(f"NAME: unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"seed: expected an integer, got {seed!r}")
    with _one_thread():
        return DEMOS[name].run(seed=seed, quick=quick, **options)


@contextmanager
def _one_thread() -> Iterator[None]:
    # The demo models are tiny: a second intra-op thread made a batch-1 step twice as slow here.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


__all__ = [
    "DEMOS",
    "DecayVsBatchResult",
    "Demo",
    "DemoResult",
    "Finding",
    "PlaygroundResult",
    "SketchResult",
    "XorResult",
    "list_demos",
    "run_demo",
]
