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
import os
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from flywheel.versions import BASE_POLICY
from server.engines.base import (
    ChoiceDelta,
    EngineError,
    EngineStats,
    SamplingParams,
    SwapError,
)
from server.engines.prompts import PromptEncoder
from server.engines.request import Request, admissible
from server.engines.scheduler import Scheduler

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def decode_threads(device: torch.device, requested: int | None) -> int | None:
    """Intra-op threads for the decode thread on CPU (None: leave torch's setting alone).

    The event loop, HTTP handling and database calls share the process with decoding. With as many
    OpenMP threads as cores, every one of their turns stalls an OpenMP barrier in the forward pass;
    on a 2-core machine we measured the HTTP throughput drop tenfold. One core stays theirs. The
    same holds in an engine process of its own: there 2 threads on 2 cores gave 0.68x the tokens/s
    of 1 at 16 streaming clients, for twice the CPU per token (bench/serving.py).
    """
    if device.type != "cpu":
        return None
    if requested is not None:
        return max(1, requested)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


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
        policy_version: str = BASE_POLICY,
        stream_interval_ms: float = 0.0,
        ignore_eos: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        """``ignore_eos`` decodes past EOS up to ``max_tokens`` (benchmarks: fixed lengths).

        ``cpu_threads``: torch intra-op threads of the decode thread on CPU; default one less
        than the cores (at least 1) unless ``OMP_NUM_THREADS`` is set, see ``decode_threads``.
        """
        self.model_name = served_model_name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = self._load_model(model_path)
        config = model.config
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        self.eos_token_ids = eos_token_ids(model_path, config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        pad_id = pad if pad is not None else (self.eos_token_ids or (0,))[0]
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._prompts = PromptEncoder(self.tokenizer, self.max_model_len)
        self._scheduler = Scheduler(
            model,
            policy_version,
            self.tokenizer,
            eos_token_ids=frozenset(() if ignore_eos else self.eos_token_ids),
            pad_token_id=pad_id,
            max_batch_size=max_batch_size,
            stream_interval_s=stream_interval_ms / 1000.0,
            threads=decode_threads(self.device, cpu_threads),
        )
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
            return await asyncio.to_thread(self._load_checked, path)
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

    def _load_model(self, path: str) -> Any:
        return load_model(path, self.device, self.dtype)

    def _load_checked(self, path: str) -> Any:
        return load_checked(path, self.device, self.dtype, self._vocab_size, self.eos_token_ids)


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def load_checked(path: str, device: torch.device, dtype: torch.dtype, vocab_size: int,
                 eos_token_ids: tuple[int, ...]) -> Any:
    """Load new weights and prove they run before anything is handed to the decode thread."""
    model = load_model(path, device, dtype)
    vocab = model.get_input_embeddings().num_embeddings
    if vocab != vocab_size:
        raise ValueError(f"vocabulary size {vocab} differs from the served {vocab_size}")
    with torch.inference_mode():
        probe = torch.tensor([[eos_token_ids[0] if eos_token_ids else 0]])
        logits = model(input_ids=probe.to(device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the new weights produce non-finite logits")
    return model


def eos_token_ids(path: str, config: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id named by the generation config, model config or tokenizer."""
    ids: list[int] = []
    try:
        sources: list[Any] = [GenerationConfig.from_pretrained(path).eos_token_id]
    except OSError:
        sources = []
    sources += [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    for source in sources:
        for token in source if isinstance(source, list | tuple) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)
