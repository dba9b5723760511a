#!/usr/bin/env bash
# Installs what the tests need into .venv, then runs ruff and the whole suite; then the tests
# that run real vLLM, in a venv of their own (scripts/vllm-venv.sh). FLYWHEEL_TEST_VLLM=0 skips
# those; with arguments only the suite's pytest runs, with them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install -q -e ".[dev,lora]"
ruff check .
VLLM_TESTS=(tests/server/test_vllm_real.py tests/test_up_vllm.py tests/trainer_worker/test_rollout_vllm_real.py)
if [ "${FLYWHEEL_TEST_VLLM:-1}" != 0 ] && [ $# -eq 0 ]; then
  # The vLLM venv first: the suite checks what it installed (tests/test_install.py). The
  # real-vLLM tests run once, in the venv that has vLLM, not skipped in this one.
  . scripts/vllm-venv.sh
  python -m pytest -q -ra "${VLLM_TESTS[@]/#/--ignore=}"
  "$VLLM_PYTHON" -m pytest -q -ra "${VLLM_TESTS[@]}"
else
  python -m pytest -q -ra "$@"
fi
