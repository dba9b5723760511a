"""How the transformers engine reaches its core (model, scheduler, decode loop): one interface,
two transports.

``thread_core.ThreadCore`` runs the scheduler on a decode thread in this process;
``process_core.ProcessCore`` runs it in an engine process of its own behind two pipes (vLLM's
``InprocClient`` and ``SyncMPClient``, ``vllm/v1/engine/core_client.py``, split the same way).
``transformers_engine.py`` holds what both share: validation, streaming, encode and decode, and
the swap bookkeeping. Torch-free: the API side of the process transport never imports torch, so
the in-process one is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from server.engines.base import EngineStats, SamplingParams, SwapError
from server.engines.core_protocol import CoreConfig, CoreInfo
from server.engines.request import Request

LoadKind = Literal["activate", "canary"]  # new weights: the active version, or the canary
SwitchKind = Literal["promote", "end_canary"]  # a change of the loaded weights' roles


class CoreTransport(Protocol):
    """What the engine asks of its core, wherever the core runs."""

    info: CoreInfo

    @property
    def version(self) -> str:
        """The active version new requests run on."""
        ...

    @property
    def canary_version(self) -> str | None: ...

    @property
    def model(self) -> Any:
        """The active model, where it lives in this process (``AttributeError`` elsewhere)."""
        ...

    @property
    def canary_model(self) -> Any: ...

    def refusal(self) -> str | None:
        """Why the core takes no new request (it died or stopped), or None."""
        ...

    async def start(self, died: Callable[[str], None]) -> None:
        """Start serving; ``died(reason)`` if the core dies (it does not come back)."""
        ...

    def busy(self) -> bool:
        """Whether requests are still running or waiting (``stop`` drains them)."""
        ...

    async def stop(self) -> None:
        """Abort what is left and stop the core."""
        ...

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, max_new: int,
               canary: bool, tenant: str = "") -> Request:
        """Queue a validated request (on the running loop); its deltas reach ``Request.deltas``.
        ``tenant``: whose it is (the scheduler's fair share). ``EngineError`` when the core is
        gone."""
        ...

    def cancel(self, request: Request) -> None:
        """The reader went away: free the request's slots at the next step."""
        ...

    async def load(self, kind: LoadKind, path: str, version: str,
                   sha256: str | None = None) -> None:
        """Load, check and install ``path`` as ``version`` (``SwapError``: nothing changed),
        its files held to ``sha256`` as they are read (``model_loading.load_model``)."""
        ...

    async def switch(self, kind: SwitchKind) -> None:
        """Promote the canary or end it; returns once new requests are admitted accordingly."""
        ...

    def stats(self) -> EngineStats: ...


def open_core(config: CoreConfig, own_process: bool) -> CoreTransport:
    """The core serving ``config``, loaded (blocking), in this process or in one of its own."""
    if own_process:
        from server.engines.process_core import ProcessCore

        return ProcessCore(config)
    from server.engines.thread_core import ThreadCore  # imports torch

    return ThreadCore(config)


def load_failed(path: str, version: str, error: BaseException) -> SwapError:
    """The one wording of a checkpoint that could not become ``version``."""
    return SwapError(f"could not load policy {version} from {path}: {error}")

