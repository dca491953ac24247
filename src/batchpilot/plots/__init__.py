"""Plots of measurement results: one module per measurement, each ``plot_*(result, ax=None) -> Axes``.

Plots take a result object and draw it; they never compute a measurement, call ``plt.show()`` or
print. Without a display, matplotlib is put on the Agg backend; a program (or notebook) that has
already chosen a backend — imported pyplot, or set ``MPLBACKEND`` — keeps its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

if (
    "matplotlib.pyplot" not in sys.modules
    and "MPLBACKEND" not in os.environ
    and not os.environ.get("DISPLAY")
    and sys.platform.startswith("linux")
):
    matplotlib.use("Agg")  # headless Linux: no display to draw on


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


__all__ = ["save_figure"]
