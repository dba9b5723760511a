# Two images from one file (built by the engine's classic builder too: no BuildKit syntax):
#   docker build --target cpu -t flywheel:cpu .   Debian + CPU torch, transformers engine
#   docker build --target gpu -t flywheel:gpu .   vllm/vllm-openai:v0.33.0, vLLM engine, CUDA
# Both run `flywheel` (default command: `serve`) as an unprivileged user.
# --build-arg PYTHON_IMAGE=... picks the CPU image's base (any Debian-like image with python3 and
# its venv module; scripts/compose-images.sh builds one with debootstrap where no registry is
# reachable). --build-arg EXTRAS=lora adds optional dependency groups of pyproject.toml.
# With wheels in deploy/wheels (scripts/compose-images.sh) pip installs from them alone.

ARG PYTHON_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

# ---- CPU dependencies in a venv, installed from the wheelhouse or the indexes ------------------
FROM ${PYTHON_IMAGE} AS cpu-deps
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG EXTRAS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/flywheel/bin:$PATH
RUN python3 -m venv /opt/flywheel
COPY deploy/pip-env.sh deploy/requirements.py /tmp/
# This stage's layers hold the wheelhouse; the image below copies only the venv.
COPY deploy/wheels/ /wheels/
# The CPU wheel first, so the dependencies below find torch satisfied and skip the CUDA build.
RUN . /tmp/pip-env.sh \
    && if [ -z "${PIP_NO_INDEX:-}" ]; then export PIP_INDEX_URL="${TORCH_INDEX}"; fi \
    && pip install "torch==${TORCH_VERSION}"
# Dependencies in their own layer: code changes do not reinstall them.
COPY pyproject.toml /tmp/
RUN . /tmp/pip-env.sh \
    && python3 /tmp/requirements.py "${EXTRAS}" /tmp/pyproject.toml > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# ---- Flywheel itself as a wheel (both images install it; the sources stay out of them) ----------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
RUN export WHEELS=/src/deploy/wheels && . /src/deploy/pip-env.sh \
    && python3 -m venv /tmp/venv && /tmp/venv/bin/pip wheel --no-deps -w /dist /src

# ---- CPU: transformers engine, demo model, migrations -------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/flywheel/bin:$PATH
COPY --from=cpu-deps /opt/flywheel /opt/flywheel
RUN useradd --create-home --uid 10001 flywheel \
    && mkdir -p /data/checkpoints /models \
    && chown -R flywheel:flywheel /data /models
COPY --from=wheel /dist/ /dist/
RUN pip install --no-deps /dist/*.whl
ENV FLYWHEEL_DATA_DIR=/data FLYWHEEL_CHECKPOINT_DIR=/data/checkpoints \
    FLYWHEEL_HOST=0.0.0.0 FLYWHEEL_PORT=8000 \
    FLYWHEEL_ENGINE=transformers FLYWHEEL_DEVICE=cpu FLYWHEEL_TRAIN__DEVICE=cpu
USER flywheel
WORKDIR /home/flywheel
EXPOSE 8000
ENTRYPOINT ["flywheel"]
CMD ["serve"]

# ---- GPU: vLLM engine and a CUDA trainer --------------------------------------------------------
FROM ${VLLM_IMAGE} AS gpu
ARG EXTRAS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Pin everything the image ships (torch, vLLM, transformers, fastapi, ...): pip may only add.
RUN python3 -m pip list --format=freeze > /tmp/constraints.txt
COPY pyproject.toml deploy/requirements.py /tmp/
RUN python3 /tmp/requirements.py "${EXTRAS}" /tmp/pyproject.toml > /tmp/requirements.txt \
    && python3 -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY --from=wheel /dist/ /dist/
RUN python3 -m pip install --no-deps /dist/*.whl \
    && useradd --create-home --uid 10001 flywheel \
    && mkdir -p /data/checkpoints /models \
    && chown -R flywheel:flywheel /data /models
ENV FLYWHEEL_DATA_DIR=/data FLYWHEEL_CHECKPOINT_DIR=/data/checkpoints \
    FLYWHEEL_HOST=0.0.0.0 FLYWHEEL_PORT=8000 \
    FLYWHEEL_ENGINE=vllm FLYWHEEL_DEVICE=cuda FLYWHEEL_TRAIN__DEVICE=cuda
USER flywheel
WORKDIR /home/flywheel
EXPOSE 8000
# The base image's entrypoint is `vllm serve`; Flywheel embeds vLLM in its own server instead.
ENTRYPOINT ["flywheel"]
CMD ["serve"]
