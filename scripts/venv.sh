# Sourced by up.sh and test.sh: activate .venv, creating it with torch installed first (the CPU
# build 2.13.0 unless an NVIDIA GPU is present), so no later requirement pulls CUDA wheels.
PYTHON=${PYTHON:-python3}
# pip, showing its output only when it fails: no packaging banners on a normal start.
quiet_pip() {
  local log status=0
  log=$(mktemp)
  python -m pip "$@" >"$log" 2>&1 || status=$?
  [ "$status" -eq 0 ] || cat "$log" >&2
  rm -f "$log"
  return "$status"
}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet_pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    quiet_pip install -q torch
  else
    quiet_pip install -q "torch==2.13.0"
  fi
fi
