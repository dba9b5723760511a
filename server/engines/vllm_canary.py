"""Canaries on vLLM: what a canary is made of, and the lifetime of a second ``AsyncLLM``.

* A LoRA canary is one more adapter in the engine that serves the active policy (vLLM picks the
  adapter per request), on the base weights; an in-place full-weight swap of the active policy
  ends it, since it changes the weights under the adapter.
* A full-weight canary is a second ``AsyncLLM`` in this process, started from the checkpoint with
  the GPU memory the first leaves (``canary_memory_share``: 0.10 beside the default 0.85; vLLM
  runs several instances on one GPU when their ``gpu_memory_utilization`` shares add up to less
  than one), and shut down after the canary ends and its last request finished. Promoting it
  makes it the main engine without a reload, so the replica then serves with the canary's
  smaller KV cache (fewer concurrent sequences) until it restarts. We chose this over
  replica-level canaries (whole replicas on the candidate) because the contract serves a
  fraction on every replica, sticky per user, which one replica can only do with both versions
  loaded. A canary whose engine does not fit in the memory left is refused with ``SwapError``;
  the active version serves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from server.engines.base import SwapError

log = logging.getLogger(__name__)

MIN_CANARY_MEMORY = 0.05  # below this a second instance has no room for a KV cache worth having
MEMORY_HEADROOM = 0.05  # CUDA contexts and allocator slack of two processes on one GPU


@dataclass(frozen=True)
class Canary:
    """The canary's version and where it runs: an adapter, or an engine of its own."""

    version: str
    lora: Any | None = None  # LoRARequest requests carry (a LoRA canary, or None)
    llm: Any | None = None  # its own AsyncLLM (a full-weight canary), else the main engine
    weights_path: str = ""


def canary_memory_share(active_share: float) -> float:
    """The GPU memory share of a full-weight canary's engine: what the active one leaves."""
    return max(MIN_CANARY_MEMORY, round(1.0 - active_share - MEMORY_HEADROOM, 2))


def canary_engine_args(engine_args: Mapping[str, Any], path: str, tokenizer: str,
                       memory_share: float) -> dict[str, Any]:
    """``AsyncEngineArgs`` kwargs of a full-weight canary's engine."""
    return dict(engine_args, model=path, tokenizer=tokenizer, gpu_memory_utilization=memory_share)


async def build_canary_engine(build: Callable[[dict[str, Any]], Any], args: dict[str, Any],
                              version: str) -> Any:
    """Build an ``AsyncLLM`` on a worker thread (the loop keeps serving) labelled ``version``.

    ``AsyncLLM`` starts its output handler on the first request when built outside a loop
    (vllm/v1/engine/async_llm.py ``__init__``), so building it on a thread is safe.
    """
    try:
        llm = await asyncio.to_thread(build, args)
    except Exception as exc:
        raise SwapError(f"vLLM could not start an engine for canary {version} from "
                        f"{args['model']} (gpu_memory_utilization "
                        f"{args.get('gpu_memory_utilization')}): {exc}") from exc
    try:
        await llm.update_weight_version(version)
    except Exception as exc:
        llm.shutdown()
        raise SwapError(f"could not label the engine of canary {version}: {exc}") from exc
    return llm


class Leases:
    """Requests in flight per ``AsyncLLM`` and per version; a retired engine shuts down after
    its last request."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._retired: dict[int, Any] = {}
        self.by_version: dict[str, int] = {}

    @property
    def running(self) -> int:
        return sum(self._count.values())

    @contextmanager
    def hold(self, llm: Any, version: str) -> Iterator[None]:
        key = id(llm)
        self._count[key] = self._count.get(key, 0) + 1
        self.by_version[version] = self.by_version.get(version, 0) + 1
        try:
            yield
        finally:
            self._count[key] -= 1
            self.by_version[version] -= 1
            if not self.by_version[version]:
                del self.by_version[version]
            if not self._count[key]:
                del self._count[key]
                self._shutdown_if_drained(key)

    def retire(self, llm: Any) -> None:
        """No new request goes to ``llm``: shut it down now, or after its last request."""
        self._retired[id(llm)] = llm
        self._shutdown_if_drained(id(llm))

    @property
    def retiring(self) -> int:
        return len(self._retired)

    def shutdown_all(self) -> None:
        for key in list(self._retired):
            self._shutdown(key)

    def _shutdown_if_drained(self, key: int) -> None:
        if key in self._retired and not self._count.get(key):
            self._shutdown(key)

    def _shutdown(self, key: int) -> None:
        llm = self._retired.pop(key)
        try:
            llm.shutdown()
            log.info("a retired vLLM engine drained and was shut down")
        except Exception:
            log.exception("could not shut down a retired vLLM engine")
