"""The transformers engine's core in this process: the scheduler's decode thread (torch).

Requests reach the decode thread directly and their deltas come back through ``bridge.Mailbox``;
weights for a hot swap or a canary are loaded on a worker thread and handed over between decode
steps (``groups.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from server.engines.base import EngineStats, SamplingParams
from server.engines.core_protocol import CoreConfig, engine_stats
from server.engines.core_transport import LoadKind, SwitchKind, load_failed
from server.engines.model_loading import open_scheduler
from server.engines.request import Request


class ThreadCore:
    """``core_transport.CoreTransport`` over a scheduler in this process."""

    def __init__(self, config: CoreConfig) -> None:
        self._scheduler, self.info, self._weights = open_scheduler(config)

    @property
    def version(self) -> str:
        return self._scheduler.version

    @property
    def canary_version(self) -> str | None:
        return self._scheduler.canary_version

    @property
    def model(self) -> Any:
        return self._scheduler.model

    @property
    def canary_model(self) -> Any:
        return self._scheduler.canary_model

    def refusal(self) -> str | None:
        return None  # the decode thread restarts on the next request

    async def start(self, died: Callable[[str], None]) -> None:
        self._scheduler.start()

    def busy(self) -> bool:
        return bool(self._scheduler.running_sequences or self._scheduler.waiting)

    async def stop(self) -> None:
        await asyncio.to_thread(self._scheduler.stop)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, max_new: int,
               canary: bool, tenant: str = "") -> Request:
        request = Request(request_id, prompt, params, max_new, asyncio.get_running_loop(),
                          canary=canary, tenant=tenant)
        self._scheduler.start()
        self._scheduler.submit(request)
        return request

    def cancel(self, request: Request) -> None:
        self._scheduler.cancel(request)

    async def load(self, kind: LoadKind, path: str, version: str,
                   sha256: str | None = None) -> None:
        try:
            model = await asyncio.to_thread(self._weights.load_checked, path, sha256)
        except Exception as exc:
            raise load_failed(path, version, exc) from exc
        # Off the event loop: the scheduler probes the model beside the served ones first.
        done = await asyncio.to_thread(self._scheduler.change, kind, model, version)
        await asyncio.wrap_future(done)

    async def switch(self, kind: SwitchKind) -> None:
        await asyncio.wrap_future(self._scheduler.change(kind))

    def stats(self) -> EngineStats:
        return engine_stats(self._scheduler.counts())
