#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs ruff and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install -q -e ".[dev,lora]"
ruff check .
python -m pytest -q -ra "$@"
