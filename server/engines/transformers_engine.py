"""The Hugging Face ``transformers`` engine: continuous batching on one decode thread, CPU or GPU.

The event loop side (this module) validates and tokenises, hands requests to the decode thread
(``scheduler.py``) and streams back the deltas it posts; weights for a hot swap or a canary are
loaded on a worker thread and handed over between decode steps (``groups.py``). A canary is a
second model beside the active one: both decode every iteration, each in its own batch.
``engine_process.py`` runs the same scheduler in a process of its own (``FLYWHEEL_ENGINE_PROCESS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from server.engines.base import (
    ChoiceDelta,
    EngineError,
    EngineStats,
    SamplingParams,
    SwapError,
)
from server.engines.core_protocol import CoreConfig
from server.engines.model_loading import open_scheduler
from server.engines.prompts import PromptEncoder
from server.engines.request import Request, admissible

logger = logging.getLogger(__name__)

class TransformersEngine:
    """Serves a local Hugging Face causal LM directory (and optionally a canary beside it) with
    continuous batching."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int | None = None,
        served_model_name: str = "flywheel",
        policy_version: str = "policy-0",
        stream_interval_ms: float = 0.0,
        ignore_eos: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        """``ignore_eos`` decodes past EOS up to ``max_tokens`` (benchmarks: fixed lengths).

        ``cpu_threads``: torch intra-op threads of the decode thread on CPU; default one less
        than the cores (at least 1) unless ``OMP_NUM_THREADS`` is set, see ``decode_threads``.
        """
        self.model_name = served_model_name
        config = CoreConfig(model_path, device, dtype, max_batch_size, max_model_len,
                            policy_version, stream_interval_ms, ignore_eos, cpu_threads)
        self._scheduler, info, self._weights = open_scheduler(config)
        self.device, self.dtype = self._weights.device, self._weights.dtype
        self.tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self._vocab_size = info.vocab_size
        self._prompts = PromptEncoder(self.tokenizer, self.max_model_len)
        self._swap_lock: asyncio.Lock | None = None
        self._closing = False

    @property
    def policy_version(self) -> str:
        return self._scheduler.version

    @property
    def canary_version(self) -> str | None:
        return self._scheduler.canary_version

    @property
    def model(self) -> Any:
        """The model new requests run on (tests and benchmarks use it for reference passes)."""
        return self._scheduler.model

    @property
    def canary_model(self) -> Any:
        """The model new canary requests run on (None without a canary)."""
        return self._scheduler.canary_model

    async def start(self) -> None:
        self._closing = False
        self._scheduler.start()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let running ones finish in ``drain_timeout_s``, abort the rest."""
        self._closing = True
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while self._scheduler.running_sequences or self._scheduler.waiting:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._scheduler.stop)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._prompts.encode_chat(messages)

    def encode_text(self, prompt: str) -> list[int]:
        return self._prompts.encode_text(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self._prompts.decode(token_ids)

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
        canary: bool = False,
    ) -> AsyncIterator[ChoiceDelta]:
        """Validate now (``PromptTooLongError`` before any streaming starts), then stream."""
        prompt = list(prompt_token_ids)
        max_new = admissible(prompt, params, self.max_model_len, self._vocab_size)
        if self._closing:
            raise EngineError("The engine is shutting down.")
        return self._stream(request_id, prompt, params, max_new, canary)

    async def _stream(
        self, request_id: str, prompt: list[int], params: SamplingParams, max_new: int,
        canary: bool,
    ) -> AsyncIterator[ChoiceDelta]:
        loop = asyncio.get_running_loop()
        request = Request(request_id, prompt, params, max_new, loop, canary=canary)
        self._scheduler.start()
        self._scheduler.submit(request)
        try:
            async with contextlib.aclosing(request.deltas()) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            if request.unfinished:  # the client went away: free the slots at the next step
                self._scheduler.cancel(request)

    async def swap_weights(self, path: str, version: str) -> None:
        """A new active version; the loaded canary's weights when ``version`` is the canary's."""
        async with self._lock():
            if version == self._scheduler.canary_version:
                await asyncio.wrap_future(self._scheduler.change("promote"))
                logger.info("canary %s promoted to active", version)
                return
            model = await self._load(path, version)
            await asyncio.wrap_future(self._scheduler.install(model, version))
        logger.info("now serving policy %s from %s", version, path)

    async def set_canary(self, path: str, version: str) -> None:
        """Load ``path`` beside the active weights for requests that ask for the canary."""
        async with self._lock():
            if version == self._scheduler.canary_version:
                return
            if version == self._scheduler.version:
                raise SwapError(f"{version} is the active version; it cannot be its own canary")
            model = await self._load(path, version)
            await asyncio.wrap_future(self._scheduler.change("canary", model, version))
        logger.info("serving canary %s from %s beside %s", version, path, self.policy_version)

    async def end_canary(self) -> None:
        """Canary requests go to the active version from now; running ones finish on the canary,
        whose weights the decode thread frees after the last one."""
        async with self._lock():
            ended = self._scheduler.canary_version
            if ended is None:
                return
            await asyncio.wrap_future(self._scheduler.change("end_canary"))
        logger.info("canary %s ended", ended)

    def _lock(self) -> asyncio.Lock:
        """One weight change at a time (created lazily: the engine is built outside a loop)."""
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        return self._swap_lock

    async def _load(self, path: str, version: str) -> Any:
        try:
            return await asyncio.to_thread(self._weights.load_checked, path)
        except Exception as exc:
            raise SwapError(f"could not load policy {version} from {path}: {exc}") from exc

    def stats(self) -> EngineStats:
        s = self._scheduler
        return EngineStats(
            running=s.running_requests,
            waiting=s.waiting,
            extra={
                "running_sequences": s.running_sequences,
                "decode_steps": s.steps,
                "policy_versions": s.group_versions(),  # loaded, oldest first (draining too)
                "active_version": s.version,
                "canary_version": s.canary_version,
                "requests_by_version": dict(s.requests_by_version),
            },
        )
