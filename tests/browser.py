"""Loading a page in a real headless Chromium and reading back what it recorded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest


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
