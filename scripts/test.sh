#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs ruff and the whole suite; then the tests
# that run real vLLM, in a venv of their own (scripts/vllm-venv.sh). FLYWHEEL_TEST_VLLM=0 skips
# those; with arguments only the suite's pytest runs, with them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install -q -e ".[dev,lora]"
ruff check .
python -m pytest -q -ra "$@"
if [ "${FLYWHEEL_TEST_VLLM:-1}" != 0 ] && [ $# -eq 0 ]; then
  . scripts/vllm-venv.sh
  "$VLLM_PYTHON" -m pytest -q -ra tests/server/test_vllm_real.py tests/test_up_vllm.py
fi
