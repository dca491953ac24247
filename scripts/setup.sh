#!/usr/bin/env bash
# Creates .venv (once) and installs batchpilot with its dev and benchmark extras into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# constraints.txt pins torch==2.13.0 (a CPU build here) so no dependency pulls a multi-GB CUDA torch.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench]" \
  2> >(grep -v "^WARNING: Location" >&2)
