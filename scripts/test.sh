#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite: pytest, ruff, mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pytest
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
