#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite: pytest, ruff, mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The HTML report is checked in a real headless browser: Chromium from Debian's packages.
if ! command -v chromium >/dev/null 2>&1; then
  echo "Installing Chromium (Debian package chromium) for the report's browser test" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/pytest
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
