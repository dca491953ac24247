from __future__ import annotations

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    # Two CI cores: one intra-op thread per test keeps timings and results steady.
    torch.set_num_threads(1)
