"""The HTML report loads in a real headless Chromium with every image decoded and no errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from batchpilot.report import Document, Figure, Section, Table, render_html
from browser import load_in_browser


def sample_document(png: bytes) -> Document:
    return Document(
        "check",
        [
            Section(
                "s",
                paragraphs=["p"],
                tables=[Table(["a"], [[1.5]])],
                figures=[Figure(png, "a plot")],
            )
        ],
    )


def a_png() -> bytes:
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    png = Figure.from_matplotlib(fig, "x").png
    plt.close(fig)
    return png


def test_report_loads_with_images_and_no_errors(tmp_path: Path) -> None:
    page = tmp_path / "ok.html"
    page.write_text(render_html(sample_document(a_png())))
    checks = load_in_browser(page, tmp_path)
    assert checks["loaded"] == "yes"
    assert checks["images"] == "1"
    assert checks["broken-images"] == "0"
    assert checks["errors"] == "0", checks.get("error-list")


def test_browser_check_catches_a_broken_image(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(render_html(sample_document(b"not a png at all")))
    checks = load_in_browser(page, tmp_path)
    assert checks["broken-images"] == "1"
    assert checks["errors"] == "1"
