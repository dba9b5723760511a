"""Model runtimes behind one interface (``base.Engine``); heavy imports happen only when chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engines.base import Engine

if TYPE_CHECKING:
    from flywheel.settings import Settings


def unavailable(settings: Settings) -> str | None:
    """Why the engine ``settings.engine`` names cannot run here (one line), or None."""
    if settings.engine == "vllm":
        from server.engines.vllm_bindings import MISSING_VLLM, vllm_installed

        return None if vllm_installed() else MISSING_VLLM
    return None


def own_process(settings: Settings) -> bool:
    """Whether the transformers engine runs in a process of its own (``engine_process.py``):
    as ``settings.engine_process`` says, by default on CPU."""
    if settings.engine_process is not None:
        return settings.engine_process
    from server.engines.transformers_engine import resolve_device

    return resolve_device(settings.device).type == "cpu"


def create_engine(
    settings: Settings, *, model_path: str | None = None, policy_version: str = "policy-0"
) -> Engine:
    """The engine ``settings.engine`` names, serving ``model_path`` (default: the base model)."""
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
        )
    if settings.engine == "vllm":
        from server.engines.vllm_engine import VLLMEngine  # imports vLLM (an extra) on start

        return VLLMEngine(settings, model_path=path, policy_version=policy_version)
    raise ValueError(f"unknown engine {settings.engine!r}")
