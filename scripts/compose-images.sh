#!/usr/bin/env bash
# Builds the images of docker-compose.yml's CPU stack without a registry, then prints the .env
# lines that make the compose file use them (`bash scripts/compose-images.sh >> .env`):
#   local/python:3.11-bookworm   Debian bookworm by debootstrap (python3, venv, CA certificates)
#   local/postgres, local/redis, local/nginx   Debian's postgresql, redis-server, nginx on it
#   flywheel:cpu                 the Dockerfile's cpu target on that base, from a wheelhouse of
#                                this machine's pip (the CPU torch wheel, then every dependency)
# Cached between runs under $FLYWHEEL_CACHE (~/.cache/flywheel): the base's tarball and the
# wheelhouse; the engine's layer cache makes a rebuild with unchanged inputs take seconds.
# Needs root (debootstrap, on first run), a running Docker engine and python3 >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=local/python:3.11-$suite
torch=torch==${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}  # not .venv's: scripts/test.sh may be installing into it meanwhile
export DOCKER_BUILDKIT=0  # the engine's own classic builder: no frontend image to pull
start=$(date +%s)
log() { echo "compose-images: [$(( $(date +%s) - start )) s] $*" >&2; }

base_image() {
  docker image inspect "$base" >/dev/null 2>&1 && return
  local tarball=$cache/$suite-python.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    local rootfs
    rootfs=$(mktemp -d)
    log "debootstrap $suite into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$suite" "$rootfs" "$mirror" >&2
    # Services are never started by package scripts inside an image (as in Debian's images).
    printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
    chmod +x "$rootfs/usr/sbin/policy-rc.d"
    echo 'APT::Install-Recommends "false";' > "$rootfs/etc/apt/apt.conf.d/90no-recommends"
    # This machine's CA bundle, so that TLS through its proxy, if any, works in builds too.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  log "importing $tarball as $base"
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$tarball" "$base" >/dev/null
}

wheelhouse() {
  # One wheelhouse per dependency list, resolved by the image's own Python (its version decides
  # environment markers), with the CPU torch wheel that this machine's pip finds put in first.
  # deploy/wheels (the build context) gets hard links to it.
  local key dir
  key=$( (echo "$torch"; "$python" deploy/requirements.py "${EXTRAS:-}") | sha256sum | cut -c1-12)
  dir=$cache/wheels-$key
  if [ ! -f "$dir/.complete" ]; then
    mkdir -p "$dir"
    log "wheelhouse $dir"
    "$python" -m pip download -q --no-deps -d "$dir" "$torch"
    if ! ls "$dir"/torch-*+cpu-*.whl >/dev/null 2>&1; then
      log "pip found no CPU build of $torch: add the PyTorch CPU index" \
          "(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or the wheel to find-links"
      exit 1
    fi
    docker run --rm -v "$dir:/wheels" -v "$PWD/deploy:/deploy:ro" \
      -v "$PWD/pyproject.toml:/src/pyproject.toml:ro" \
      -e PIP_CERT=/etc/ssl/certs/ca-certificates.crt -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
      -e TORCH="$torch" -e EXTRAS="${EXTRAS:-}" "$base" sh -ec '
        python3 /deploy/requirements.py "$EXTRAS" /src/pyproject.toml > /tmp/requirements.txt
        python3 -m venv /tmp/venv
        /tmp/venv/bin/pip wheel -q -w /wheels --find-links /wheels "$TORCH" \
          -r /tmp/requirements.txt "setuptools>=69" wheel' >&2
    touch "$dir/.complete"
  fi
  find deploy/wheels -name '*.whl' -delete
  cp -l "$dir"/*.whl deploy/wheels/ 2>/dev/null || cp "$dir"/*.whl deploy/wheels/
}

mkdir -p "$cache"
# One build at a time per cache (.ci/run starts one in the background; the compose test runs
# this script again, and then waits for it and finds everything built).
exec 9>"$cache/compose-images.lock"
flock 9
base_image
for name in postgres redis nginx; do
  log "building local/$name"
  docker build -q --force-rm --build-arg BASE_IMAGE="$base" -t "local/$name:$suite" \
    "deploy/images/$name" >/dev/null
done
wheelhouse
log "building flywheel:cpu"
docker build -q --force-rm --target cpu --build-arg PYTHON_IMAGE="$base" -t flywheel:cpu . >/dev/null
log "done"
cat <<ENV
PYTHON_IMAGE=$base
POSTGRES_IMAGE=local/postgres:$suite
REDIS_IMAGE=local/redis:$suite
NGINX_IMAGE=local/nginx:$suite
ENV
