"""docs/anchors.md: the lines-of-code column is counted from the page's own script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "docs" / "anchors.md"


def _sections(code: str) -> dict[str, str]:
    parts = re.split(r"^# --- (.+)$", code, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _lines(body: str) -> int:
    """Physical lines of a section's statements (decorators included), print calls left out."""
    count = 0
    for node in ast.parse(body).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "print"
        ):
            continue
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        assert node.end_lineno is not None
        count += node.end_lineno - first + 1
    return count


def test_the_table_counts_the_lines_of_the_script_on_the_page() -> None:
    text = PAGE.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    counted = {title: _lines(body) for title, body in _sections(code).items()}
    assert counted == {
        "1. Lightning's Tuner": 5,
        "2. accelerate's find_executable_batch_size": 6,
        "3. torch-lr-finder": 6,
        "4. batchpilot": 4,
        "then train with it (not counted)": 1,
    }
    rows = r"^\| (Lightning `Tuner`|accelerate|torch-lr-finder|batchpilot)[^|]*\| (\d+) \|"
    table = {name: int(lines) for name, lines in re.findall(rows, text, re.M)}
    assert table == {"Lightning `Tuner`": 5, "accelerate": 6, "torch-lr-finder": 6, "batchpilot": 4}
