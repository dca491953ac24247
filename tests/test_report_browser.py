"""The HTML report loads in a real headless Chromium with every image decoded and no errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from batchpilot.report import Document, Figure, Section, Table, render_html


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: scripts/test.sh installs it with apt (package chromium)")
    pytest.skip("Chromium is not installed (scripts/test.sh installs it)")


def load_in_browser(path: Path, tmp_path: Path) -> dict[str, str]:
    """Open ``path`` in headless Chromium and return the check attributes the page recorded."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"<html([^>]*)>", done.stdout)
    assert match, f"no DOM from Chromium (exit {done.returncode}): {done.stderr[-500:]}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', match.group(1)))


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
