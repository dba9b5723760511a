"""The Hugging Face ``transformers`` engine: continuous batching on one decode loop, CPU or GPU.

The event loop side (this module) validates and tokenises, hands requests to the core and
streams back the deltas it posts; it serialises weight changes (a hot swap, a canary, its
promotion or end). A canary is a second model beside the active one: both decode every
iteration, in one batch and one forward pass, each row on its own version's weights
(``lanes.py``, ``routing.py``). The core (model, ``scheduler.py``) runs on a decode thread in
this process or in an engine process of its own (``own_process``, ``FLYWHEEL_ENGINE_PROCESS``),
behind one interface (``core_transport.py``). Torch-free: the in-process core brings torch when
chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from flywheel.versions import BASE_POLICY
from server.engines.base import ChoiceDelta, EngineError, EngineStats, SamplingParams, SwapError
from server.engines.core_death import exit_soon
from server.engines.core_protocol import CoreConfig
from server.engines.core_transport import CoreTransport, open_core
from server.engines.prompts import PromptEncoder
from server.engines.request import admissible

logger = logging.getLogger(__name__)


class TransformersEngine:
    """Serves a local Hugging Face causal LM directory (and optionally a canary beside it) with
    continuous batching."""

    hashes_what_it_loads = True  # model_loading.load_model: built from the bytes it hashed

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int | None = None,
        served_model_name: str = "flywheel",
        policy_version: str = BASE_POLICY,
        stream_interval_ms: float = 0.0,
        ignore_eos: bool = False,
        cpu_threads: int | None = None,
        own_process: bool = False,
        fair_share: bool = True,
        max_batch_share: float = 0.75,
        sha256: str | None = None,
    ) -> None:
        """Load the model (blocking); ``EngineError`` when an engine process cannot.

        ``ignore_eos`` decodes past EOS up to ``max_tokens`` (benchmarks: fixed lengths).
        ``cpu_threads``: torch intra-op threads of the decode thread on CPU; default one less
        than the cores (at least 1) unless ``OMP_NUM_THREADS`` is set, see
        ``model_loading.decode_threads``. ``own_process``: the model runs in an engine process
        of its own (``process_core.py``), else on a decode thread here (``thread_core.py``).
        ``fair_share``, ``max_batch_share``: how the scheduler shares the batch between keys
        (``fair_queue.py``). ``sha256``: the digest the model's files were checked against; the
        weights loaded are the bytes hashed against it (``model_loading.load_model``).
        """
        self.model_name = served_model_name
        config = CoreConfig(model_path, device, dtype, max_batch_size, max_model_len,
                            policy_version, stream_interval_ms, ignore_eos, cpu_threads,
                            logging.getLogger().getEffectiveLevel(), fair_share,
                            max_batch_share, sha256)
        self._core: CoreTransport = open_core(config, own_process)
        info = self._core.info
        self.tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.eos_token_ids = info.eos_token_ids
        self._vocab_size = info.vocab_size
        self._prompts = PromptEncoder(self.tokenizer, self.max_model_len)
        self._swap_lock: asyncio.Lock | None = None
        self._closing = False

    @property
    def policy_version(self) -> str:
        return self._core.version

    @property
    def canary_version(self) -> str | None:
        return self._core.canary_version

    @property
    def model(self) -> Any:
        """The model new requests run on (tests and benchmarks use it for reference passes);
        in-process only."""
        return self._core.model

    @property
    def canary_model(self) -> Any:
        """The model new canary requests run on (None without a canary); in-process only."""
        return self._core.canary_model

    async def start(self) -> None:
        self._closing = False
        await self._core.start(self._died)

    def _died(self, reason: str) -> None:
        self.on_death()

    def on_death(self) -> None:
        """What a dead engine process does to this one (``core_death.exit_soon``)."""
        exit_soon()

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, let running ones finish in ``drain_timeout_s``, abort the rest."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout_s
        while self._core.busy() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await self._core.stop()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._prompts.encode_chat(messages)

    def encode_text(self, prompt: str) -> list[int]:
        return self._prompts.encode_text(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self._prompts.decode(token_ids)

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
        canary: bool = False, tenant: str = "",
    ) -> AsyncIterator[ChoiceDelta]:
        """Validate now (``PromptTooLongError`` before any streaming starts), then stream;
        ``tenant``: whose request, for the scheduler's round robin and batch share."""
        prompt = list(prompt_token_ids)
        max_new = admissible(prompt, params, self.max_model_len, self._vocab_size)
        refusal = self._core.refusal()
        if refusal is None and self._closing:
            refusal = "The engine is shutting down."
        if refusal is not None:
            raise EngineError(refusal)
        return self._stream(request_id, prompt, params, max_new, canary, tenant)

    async def _stream(
        self, request_id: str, prompt: list[int], params: SamplingParams, max_new: int,
        canary: bool, tenant: str,
    ) -> AsyncIterator[ChoiceDelta]:
        request = self._core.submit(request_id, prompt, params, max_new, canary, tenant)
        try:
            async with contextlib.aclosing(request.deltas()) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            if request.unfinished:  # the client went away: free the slots at the next step
                self._core.cancel(request)

    async def swap_weights(self, path: str, version: str, sha256: str | None = None) -> None:
        """A new active version; the loaded canary's weights when ``version`` is the canary's."""
        async with self._lock():
            if version == self.canary_version:
                await self._core.switch("promote")
                logger.info("canary %s promoted to active", version)
                return
            await self._core.load("activate", path, version, sha256)
        logger.info("now serving policy %s from %s", version, path)

    async def set_canary(self, path: str, version: str, sha256: str | None = None) -> None:
        """Load ``path`` beside the active weights for requests that ask for the canary."""
        async with self._lock():
            if version == self.canary_version:
                return
            if version == self.policy_version:
                raise SwapError(f"{version} is the active version; it cannot be its own canary")
            await self._core.load("canary", path, version, sha256)
        logger.info("serving canary %s from %s beside %s", version, path, self.policy_version)

    async def end_canary(self) -> None:
        """Canary requests go to the active version from now; running ones finish on the canary,
        whose weights the core frees after the last one."""
        async with self._lock():
            ended = self.canary_version
            if ended is None:
                return
            await self._core.switch("end_canary")
        logger.info("canary %s ended", ended)

    def _lock(self) -> asyncio.Lock:
        """One weight change at a time (created lazily: the engine is built outside a loop)."""
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        return self._swap_lock

    def stats(self) -> EngineStats:
        return self._core.stats()
