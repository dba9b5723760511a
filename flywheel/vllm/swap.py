"""The weight-swap sequence on a live vLLM ``AsyncLLM`` (0.33), kept apart from serving code.

Full weights are reloaded in place from the checkpoint directory::

    pause_generation(mode="keep", clear_cache=True)      vllm/v1/engine/async_llm.py:989
    collective_rpc("reload_weights", kwargs=...)         async_llm.py:1249 -> gpu_worker.py:636
                                                         -> gpu_model_runner.py:5226
    update_weight_version(version)                       async_llm.py:1438
    resume_generation()                                  async_llm.py:1026, always

``keep`` freezes in-flight requests instead of aborting them (``abort`` is vLLM's default);
``clear_cache=True`` drops the prefix cache computed with the old weights, so frozen requests are
re-prefilled on the new weights when generation resumes (vllm/v1/engine/core.py:948).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flywheel.engine_types import SwapError
from flywheel.vllm.worker_ext import REPACK

log = logging.getLogger(__name__)


class DegradedEngineError(SwapError):
    """A failed swap left the engine unsound: torn weights (the rollback failed too) or paused."""


class SwapTarget(Protocol):
    """The ``AsyncLLM`` methods the swap uses (a stand-in implements them in tests)."""

    async def pause_generation(self, *, mode: Any = ..., clear_cache: bool = ...) -> None: ...

    async def resume_generation(self) -> None: ...

    async def collective_rpc(
        self, method: str, timeout: float | None = ..., args: tuple = ...,
        kwargs: dict | None = ...,
    ) -> Any: ...

    async def update_weight_version(self, new_version: str) -> None: ...


async def reload_weights(llm: SwapTarget, path: str, *, repack: bool = False) -> None:
    """Every worker reloads its weights in place from the Hugging Face directory ``path``.

    `GPUModelRunner.reload_weights(weights_iterator=None, weights_path=None,
    is_checkpoint_format=True)`: from disk it points the worker's ``model_config.model`` at
    ``path`` and streams the files through the default loader's ``get_all_weights``; checkpoint
    format runs the layerwise reload, which copies into the original storage so CUDA graphs
    stay valid (vllm/model_executor/model_loader/reload/inplace.py).
    """
    await llm.collective_rpc(
        "reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True}
    )
    if repack:  # vLLM's CPU backend: a tied LM head is stale until repacked (worker_ext)
        await llm.collective_rpc(REPACK)


async def swap_in_place(
    llm: SwapTarget, path: str, version: str, *, previous_path: str, previous_version: str,
    then: Callable[[], Awaitable[None]] | None = None, repack: bool = False,
) -> None:
    """Pause, reload ``path``, run ``then`` (paused), label outputs ``version``, resume.
    ``repack``: the engine runs vLLM's CPU backend with ``worker_ext`` (each reload repacks
    the embeddings).

    On failure the previous weights are reloaded: ``SwapError`` when they serve again,
    ``DegradedEngineError`` when they could not be restored or generation could not resume.
    Generation resumes in every case, so queued requests never hang.
    """
    touched = False
    try:
        await llm.pause_generation(mode="keep", clear_cache=True)
        touched = True  # from here the workers' tensors may hold part of the new checkpoint
        await reload_weights(llm, path, repack=repack)
        if then is not None:
            await then()
        await llm.update_weight_version(version)
    except Exception as exc:
        if not touched:
            # The pause failed before any weight moved: the old weights still serve.
            raise SwapError(f"could not pause the engine for {version}: {exc}") from exc
        await _roll_back(llm, previous_path, previous_version, version, exc, repack)
        raise SwapError(f"could not load {version} from {path}: {exc}; "
                        f"{previous_version} serves again") from exc
    finally:
        # Runs on success, failure and cancellation: a paused engine in "keep" mode queues every
        # request forever, which is worse than serving any weights. (A cancelled swap does not
        # stop the reload already sent to the engine core; it completes before this resume.)
        await _resume(llm)


async def _roll_back(
    llm: SwapTarget, path: str, version: str, failed_version: str, cause: Exception,
    repack: bool,
) -> None:
    """Reload the previous weights after a failed reload (a partial reload is a torn model)."""
    try:
        await reload_weights(llm, path, repack=repack)
        await llm.update_weight_version(version)
    except Exception as exc:
        # Some tensors hold the new checkpoint and some the old: the engine answers, but with
        # a model that was never trained. The caller marks itself degraded (readiness fails).
        log.exception("rollback to %s failed after %s failed to load", version, failed_version)
        raise DegradedEngineError(
            f"could not load {failed_version} ({cause}) nor restore {version} ({exc}); "
            "the served weights are torn"
        ) from exc


async def _resume(llm: SwapTarget) -> None:
    try:
        await llm.resume_generation()
    except Exception as exc:
        # Still paused: requests queue until a later swap's resume succeeds.
        raise DegradedEngineError(f"could not resume generation after a swap: {exc}") from exc


async def add_adapter(llm: Any, request: Any) -> Any:
    """Load the LoRA adapter of ``request`` (a ``LoRARequest`` named after its version, with a
    new path per version, which keeps vLLM's prefix cache, keyed by LoRA name and path, from
    serving stale blocks); returns ``request``."""
    version, path = request.lora_name, request.lora_path
    try:
        added = await llm.add_lora(request)
    except Exception as exc:
        raise SwapError(f"vLLM could not load the adapter of {version}: {exc}") from exc
    if not added:
        raise SwapError(f"vLLM did not load the adapter of {version} from {path}")
    return request
