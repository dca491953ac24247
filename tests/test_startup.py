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


def _command_modules(*args: str) -> tuple[set[str], str]:
    """The modules imported by ``batchpilot ARGS`` run in a fresh interpreter, and its stdout."""
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['batchpilot', *{list(args)!r}]\n"
        "try:\n"
        "    runpy.run_module('batchpilot', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print('\\nMODULES', ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    out, _, modules = done.stdout.rpartition("\nMODULES ")
    return set(modules.split()), out


def test_the_light_commands_import_no_torch() -> None:
    for args in (
        ("--help",),
        ("scale", "--ref-batch", "256", "--ref-lr", "0.1", "--batch", "8192"),
        ("scale", "--help"),
        ("examples", "--format", "json"),
    ):
        modules, out = _command_modules(*args)
        assert "torch" not in modules and "matplotlib" not in modules, args
        assert out.strip(), args
    # --help lists every command without importing the modules that define them
    modules, out = _command_modules("--help")
    assert "batchpilot.cli.tune" not in modules
    from batchpilot.cli import COMMANDS

    assert all(name in out for name in COMMANDS)
