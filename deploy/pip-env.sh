# Sourced by the Dockerfile's pip steps: with wheels in $WHEELS (deploy/wheels, copied to /wheels),
# pip installs from them alone and never reaches an index (build isolation's setuptools too).
if ls "${WHEELS:-/wheels}"/*.whl >/dev/null 2>&1; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELS:-/wheels}"
fi
