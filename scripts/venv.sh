# Sourced by up.sh and test.sh: activate .venv, creating it with torch installed first (the CPU
# build 2.13.0 unless an NVIDIA GPU is present), so no later requirement pulls CUDA wheels.
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
