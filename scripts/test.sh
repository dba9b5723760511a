#!/usr/bin/env bash
# Installs what the tests need (CPU torch first, so nothing pulls CUDA wheels), then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -d .venv ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,lora]"
ruff check .
python -m pytest -q -ra "$@"
