"""Running a script on two CPU processes with ``torchrun`` (gloo) and reading what each rank wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_two_ranks(script: str, folder: Path, *, timeout: float = 280.0) -> tuple[Any, Any]:
    """Write ``script`` to ``folder``, run it under ``torchrun --standalone --nproc_per_node=2``
    with ``folder`` as its argument, and return what ranks 0 and 1 wrote to ``rank{r}.json``
    there (the script's stderr tail is the assertion message when it fails)."""
    path = folder / "two_ranks.py"
    path.write_text(script)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launch, str(path), str(folder)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))
    return zero, one
