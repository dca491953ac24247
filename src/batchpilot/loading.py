"""Finding the user's task: ``path/to/file.py:factory``, ``package.module:factory`` or an example.

The factory is called with no arguments and must return a :class:`~batchpilot.task.Task`. Every
failure ends in one :class:`BadInputError` (a wrong spec, file, attribute or return type) or
:class:`UserCodeError` (the user's module or factory raised) naming what was wrong.

>>> load_task(example="xor4").train_size
16
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from batchpilot.errors import BadInputError, UserCodeError
from batchpilot.examples import EXAMPLES
from batchpilot.task import Task


def load_task(spec: str | None = None, *, example: str | None = None) -> Task:
    """Load a task from ``spec`` or the built-in ``example``; exactly one must be given."""
    if (spec is None) == (example is None):
        raise BadInputError("TASK: give either a TASK (path/to/file.py:factory) or --example NAME")
    if example is not None:
        if example not in EXAMPLES:
            raise BadInputError(
                f"--example: unknown example {example!r}; choose one of {', '.join(EXAMPLES)}"
            )
        spec = EXAMPLES[example]
    assert spec is not None
    module_part, _, attribute = spec.rpartition(":")
    if not module_part or not attribute:
        raise BadInputError(
            f"TASK: {spec!r} is not of the form path/to/file.py:factory or package.module:factory"
        )
    module = _import(module_part, spec)
    if not hasattr(module, attribute):
        raise BadInputError(f"TASK: {module_part!r} has no attribute {attribute!r}")
    factory = getattr(module, attribute)
    if isinstance(factory, Task):
        return factory
    if not callable(factory):
        raise BadInputError(
            f"TASK: {spec!r} is a {type(factory).__name__}, expected a function returning a Task"
        )
    try:
        task = factory()
    except (BadInputError, UserCodeError):
        raise
    except SystemExit as exc:
        raise _exited(f"{spec}()", exc) from exc
    except Exception as exc:
        raise UserCodeError.wrap(f"{spec}()", exc) from exc
    if not isinstance(task, Task):
        raise BadInputError(
            f"TASK: {spec}() returned {type(task).__name__}, expected a batchpilot.Task"
        )
    return task


def _import(module_part: str, spec: str) -> ModuleType:
    looks_like_path = module_part.endswith(".py") or "/" in module_part or "\\" in module_part
    if looks_like_path:
        return _import_file(Path(module_part))
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as exc:
        if exc.name and module_part.startswith(exc.name):
            raise BadInputError(f"TASK: no module named {module_part!r}") from exc
        raise UserCodeError.wrap(f"import {module_part}", exc) from exc
    except SystemExit as exc:
        raise _exited(f"import {module_part}", exc) from exc
    except Exception as exc:
        raise UserCodeError.wrap(f"import {module_part}", exc) from exc


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise BadInputError(f"TASK: no such file {str(path)!r}")
    name = f"batchpilot_user_task_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise BadInputError(f"TASK: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Let the file import its neighbours, as `python path/to/file.py` would.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise _exited(f"import {path}", exc) from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UserCodeError.wrap(f"import {path}", exc) from exc
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _exited(where: str, exc: SystemExit) -> UserCodeError:
    """A task that calls ``sys.exit`` while it is loaded has not given a task, whatever the code:
    exiting 0 with no output would pass for success."""
    return UserCodeError(f"{where} called sys.exit({exc.code!r}) instead of returning a Task")
