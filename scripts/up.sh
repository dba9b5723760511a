#!/usr/bin/env bash
# Installs Flywheel into .venv and runs `flywheel up` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install -q -e .
exec flywheel up "$@"
