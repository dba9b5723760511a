#!/usr/bin/env bash
# Installs Flywheel into .venv and runs `flywheel up` (arguments are passed on). The install
# (an editable one: code changes need none) runs only when pyproject.toml or the venv recipe
# changed since the last one, so a normal start runs no pip at all.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.flywheel-up-installed
want=$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/flywheel ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  . .venv/bin/activate
else
  echo "up.sh: installing Flywheel into .venv (a first install takes a few minutes)" >&2
  . scripts/venv.sh
  quiet_pip install -q -e .
  echo "$want" > "$stamp"
fi
exec flywheel up "$@"
