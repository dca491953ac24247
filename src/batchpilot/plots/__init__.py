"""Plots of measurement results: one module per measurement, each ``plot_*(result, ax=None) -> Axes``.

Plots take a result object and draw it; they never compute a measurement, call ``plt.show()`` or
print. Matplotlib runs on the Agg backend, so plots work without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


__all__ = ["save_figure"]
