"""Model runtimes behind one interface (``base.Engine``); heavy imports happen only when chosen."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.versions import BASE_POLICY
from server.engines.base import Engine

if TYPE_CHECKING:
    from flywheel.settings import Settings


def unavailable(settings: Settings) -> str | None:
    """Why the engine ``settings.engine`` names cannot run here (one line), or None."""
    if settings.engine == "vllm":
        from flywheel.vllm.bindings import MISSING_VLLM, vllm_installed

        return None if vllm_installed() else MISSING_VLLM
    return None


def own_process(settings: Settings) -> bool:
    """Whether the transformers engine runs in a process of its own (``process_core.py``):
    as ``settings.engine_process`` says, by default on CPU. Told without importing torch when
    the device is ``cpu``, or ``auto`` with a torch built for no GPU: that API process stays
    torch-free."""
    if settings.engine_process is not None:
        return settings.engine_process
    if settings.device == "cpu" or (settings.device == "auto" and not _torch_has_gpu_build()):
        return True
    from server.engines.model_loading import resolve_device

    return resolve_device(settings.device).type == "cpu"


def _torch_has_gpu_build() -> bool:
    """Whether the installed torch was built for CUDA or ROCm (``torch.version.cuda``, ``.hip``),
    read from its ``version.py`` without importing torch; True when that cannot be read."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return True
    try:
        build = runpy.run_path(str(Path(spec.origin).with_name("version.py")))
    except OSError:
        return True
    return bool(build.get("cuda") or build.get("hip"))


def create_engine(
    settings: Settings, *, model_path: str | None = None, policy_version: str = BASE_POLICY,
    sha256: str | None = None,
) -> Engine:
    """The engine ``settings.engine`` names, serving ``model_path`` (default: the base model),
    checked against ``sha256`` as the transformers engine reads it (``Engine.swap_weights``)."""
    path = str(model_path or settings.model)
    if settings.engine == "transformers":
        if own_process(settings):
            from server.engines.engine_process import TransformersProcessEngine as Transformers
        else:
            from server.engines.transformers_engine import TransformersEngine as Transformers

        return Transformers(
            path,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            max_model_len=settings.max_model_len,
            served_model_name=settings.served_model_name,
            policy_version=policy_version,
            stream_interval_ms=settings.stream_interval_ms,
            fair_share=settings.fair_share,
            max_batch_share=settings.max_batch_share,
            sha256=sha256,
        )
    if settings.engine == "vllm":
        from server.engines.vllm_engine import VLLMEngine  # imports vLLM (an extra) on start

        return VLLMEngine(settings, model_path=path, policy_version=policy_version)
    raise ValueError(f"unknown engine {settings.engine!r}")
