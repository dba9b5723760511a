# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target cpu -t flywheel:cpu .   python:3.11-slim, CPU torch, transformers engine
#   docker build --target gpu -t flywheel:gpu .   vllm/vllm-openai:v0.33.0, vLLM engine, CUDA
# Both run `flywheel` (default command: `serve`) as an unprivileged user.
# --build-arg EXTRAS=lora adds optional dependency groups of pyproject.toml (comma-separated).

ARG PYTHON_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

# ---- CPU: transformers engine, demo model, migrations -------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG EXTRAS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel first, so the dependencies below find torch satisfied and skip the CUDA build.
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
# Dependencies in their own layer: code changes do not reinstall them.
COPY pyproject.toml .
RUN python3 - "${EXTRAS}" > /tmp/requirements.txt <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [name for name in sys.argv[1].split(",") if name]
print("\n".join(project["dependencies"]
                + [dep for name in extras for dep in project["optional-dependencies"][name]]))
PY
RUN python3 -m pip install -r /tmp/requirements.txt
COPY . .
RUN python3 -m pip install --no-deps . \
    && useradd --create-home --uid 10001 flywheel \
    && mkdir -p /data/checkpoints /models \
    && chown -R flywheel:flywheel /data /models
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
WORKDIR /src
# Pin everything the image ships (torch, vLLM, transformers, fastapi, ...): pip may only add.
RUN python3 -m pip list --format=freeze > /tmp/constraints.txt
COPY pyproject.toml .
RUN python3 - "${EXTRAS}" > /tmp/requirements.txt <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [name for name in sys.argv[1].split(",") if name]
print("\n".join(project["dependencies"]
                + [dep for name in extras for dep in project["optional-dependencies"][name]]))
PY
RUN python3 -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY . .
RUN python3 -m pip install --no-deps . \
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
