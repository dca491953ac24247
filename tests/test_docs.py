"""The examples in the README and docs/ run: doctest blocks are checked output for output, other
Python blocks are run as scripts in an empty folder. A block preceded by an HTML comment
``<!-- not run: why -->`` is a pattern that needs the reader's own code (or torchrun) and is
skipped, with its reason; ``<!-- run with: torchrun --nproc_per_node=2 -->`` runs the block as
a script under that launcher (gloo on the CPU)."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- (?:not run: (?P<why>.*?)|run with: (?P<launcher>.*?)) -->\n)?```python\n(?P<code>.*?)```",
    re.S,
)
# --standalone: a free port for the rendezvous (a fixed one can still be held by an earlier test).
LAUNCHERS = {
    "torchrun --nproc_per_node=2": [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
    ]
}


def _scripts() -> list[tuple[str, int, str, str | None, str | None]]:
    found = []
    for page in PAGES:
        for index, match in enumerate(BLOCK.finditer(page.read_text())):
            code = match.group("code")
            if code.lstrip().startswith(">>>"):
                continue  # a doctest: test_doctests_in_the_docs checks it
            found.append((page.name, index, code, match.group("why"), match.group("launcher")))
    return found


SCRIPTS = _scripts()


def test_the_docs_have_runnable_examples() -> None:
    # Guards the regular expression: a change of fence style must not make every test vanish.
    assert len([s for s in SCRIPTS if s[3] is None]) >= 10
    assert all(s[4] is None or s[4] in LAUNCHERS for s in SCRIPTS)


@pytest.mark.parametrize(
    ("code", "why", "launcher"),
    [
        pytest.param(code, why, launcher, id=f"{page}#{index}")
        for page, index, code, why, launcher in SCRIPTS
    ],
)
@pytest.mark.slow  # each runs a fresh interpreter, and some train for a minute
@pytest.mark.timeout(900)
def test_python_examples_in_the_docs_run(
    code: str, why: str | None, launcher: str | None, tmp_path: Path
) -> None:
    if why is not None:
        pytest.skip(f"not run: {why}")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"}
    script = tmp_path / "example.py"
    script.write_text(code)
    before = LAUNCHERS[launcher] if launcher is not None else []

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *before, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    done = run()
    if launcher is not None and done.returncode != 0 and "SIGABRT" in done.stderr:
        # gloo can abort a worker while tearing its process group down on a loaded 2-core
        # machine, after the script's last line (seen once in four CI runs of train_ddp.py):
        # run once more; that run must pass, and the aborted one must have printed every line
        # it prints (an abort during the example's work is a failure)
        aborted, done = done, run()
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
        printed = len(aborted.stdout.splitlines())
        assert printed == len(done.stdout.splitlines()), (aborted.stdout, aborted.stderr[-3000:])
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=p.name) for p in PAGES if "\n>>> " in p.read_text()],
)
@pytest.mark.timeout(900)
def test_doctests_in_the_docs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # A closing fence right after an expected output would read as part of it.
    text = re.sub(r"^```.*$", "", page.read_text(), flags=re.M)
    test = doctest.DocTestParser().get_doctest(text, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


COMMAND_LINE = re.compile(r"^(?:\$ )?(?:timeout [^b]*)?(?:\.venv/bin/)?batchpilot (?P<args>.*)$")


def _command_lines() -> list[tuple[str, str]]:
    """Every ``batchpilot …`` line in a code block of the README and docs/ (continuations
    joined), with the page it is on."""
    lines = []
    for page in PAGES:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                match = COMMAND_LINE.match(line.strip())
                if match:
                    lines.append((page.name, match.group("args").split("#")[0]))
    return lines


def test_the_command_lines_in_the_docs_use_options_that_exist() -> None:
    """An option renamed in the code cannot stay in an example: each one must be a visible option
    of its command (hidden old names print a deprecation note; the docs use the new ones)."""
    import shlex

    from batchpilot.cli import COMMANDS, load_command

    lines = _command_lines()
    assert len(lines) >= 20
    for page, args in lines:
        words = shlex.split(args)
        if not words or words[0] not in COMMANDS:
            continue
        command = load_command(words[0])
        subcommands = getattr(command, "commands", None)
        if isinstance(subcommands, dict):  # sweep: `sweep show STORE` or `sweep [run] TASK`
            command = subcommands.get(words[1] if len(words) > 1 else "", subcommands["run"])
        known = {"--help", "-h"} | {
            opt
            for param in command.params
            if not getattr(param, "hidden", False)
            for opt in (*param.opts, *getattr(param, "secondary_opts", ()))
        }
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"{page}: batchpilot {args}: {word}"
