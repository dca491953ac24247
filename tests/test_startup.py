"""Fast start: the package and the light commands must not import torch or matplotlib."""

from __future__ import annotations

import subprocess
import sys


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_importing_batchpilot_imports_no_torch() -> None:
    modules = _imported_after("import batchpilot; batchpilot.split_batch(64, max_micro_batch=8)")
    assert "torch" not in modules and "matplotlib" not in modules
    # and a name from the heavy part still resolves on first use
    heavy = _imported_after("from batchpilot import Task")
    assert "torch" in heavy
