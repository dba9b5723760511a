"""A deterministic engine without a model: for fast tests and benchmarks of the HTTP layer.

Characters are tokens and every answer is four words drawn from a seeded generator. The real
engines (transformers, vLLM) are tested on their own. A canary is only a second label: requests
that ask for it carry its version, with the same answers.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

from flywheel.versions import BASE_POLICY
from server.engines.base import (
    ChoiceDelta,
    EngineStats,
    SamplingParams,
    SwapError,
    refuse_unfittable,
)

EOS = 0


class FakeEngine:
    """Characters are tokens; answers are made of words drawn from a seeded generator."""

    model_name = "fake"
    eos_token_ids = (EOS,)
    hashes_what_it_loads = False  # it loads nothing
    vocab_size = 0x110000  # the code points: what `decode` spells

    def __init__(self, max_model_len: int = 512, policy_version: str = BASE_POLICY,
                 answer_words: int = 4) -> None:
        """``answer_words``: the length of every answer (long ones for slow-reader tests)."""
        self.max_model_len = max_model_len
        self.answer_words = answer_words
        self._version = policy_version
        self._canary: str | None = None
        self.swaps: list[tuple[str, str]] = []  # every swap_weights call, promotions included
        self.loads: list[tuple[str, str]] = []  # every directory read (swaps and canaries)
        self.running: dict[str, int] = {}  # requests running per version

    @property
    def policy_version(self) -> str:
        return self._version

    @property
    def canary_version(self) -> str | None:
        return self._canary

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.encode_text(text)

    def encode_text(self, prompt: str) -> list[int]:
        refuse_unfittable(prompt, self.max_model_len, 4)  # a token is a character: <= 4 bytes
        return [ord(c) for c in prompt]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != EOS)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, *, canary: bool = False,
                       tenant: str = "") -> AsyncIterator[ChoiceDelta]:
        version = self._canary if canary and self._canary is not None else self._version
        self.running[version] = self.running.get(version, 0) + 1
        try:
            for index in range(params.n):
                rng = random.Random(f"{params.seed}-{index}" if params.seed is not None
                                    else request_id + str(index))
                words = [rng.choice(["yes", "no", "maybe", "sure", "ok"])
                         for _ in range(self.answer_words)]
                text = " ".join(words) + "."
                async for delta in self._stream(index, text, params, version):
                    yield delta
        finally:
            self.running[version] -= 1
            if not self.running[version] and version not in (self._version, self._canary):
                del self.running[version]  # drained: its "weights" are freed

    async def _stream(self, index: int, text: str, params: SamplingParams,
                      version: str) -> AsyncIterator[ChoiceDelta]:
        produced = ""
        for count, char in enumerate(text, start=1):
            await asyncio.sleep(0)
            candidate = produced + char
            for stop in params.stop:
                if stop in candidate:
                    yield ChoiceDelta(index, "", [], [], version, finish_reason="stop")
                    return
            produced = candidate
            done = count >= params.max_tokens
            yield ChoiceDelta(index, char, [ord(char)], [-0.5], version,
                              top_logprobs=[{char: -0.5}] if params.top_logprobs else None,
                              finish_reason="length" if done else None)
            if done:
                return
        yield ChoiceDelta(index, "", [EOS], [-0.1], version,
                          top_logprobs=[{"": -0.1}] if params.top_logprobs else None,
                          finish_reason="stop")

    async def swap_weights(self, path: str, version: str, sha256: str | None = None) -> None:
        if version != self._canary:
            self._load(path)
            self.loads.append((path, version))
        else:
            self._canary = None  # promoted: the canary's weights become the active ones
        self.swaps.append((path, version))
        self._version = version

    async def set_canary(self, path: str, version: str, sha256: str | None = None) -> None:
        if version == self._canary:
            return
        if version == self._version:
            raise SwapError(f"{version} is the active version; it cannot be its own canary")
        self._load(path)
        self.loads.append((path, version))
        self._canary = version

    async def end_canary(self) -> None:
        self._canary = None

    def _load(self, path: str) -> None:
        if not Path(path).is_dir():
            raise SwapError(f"{path} is not a directory")

    def stats(self) -> EngineStats:
        loaded = {self._version: 0, **({self._canary: 0} if self._canary else {}), **self.running}
        return EngineStats(running=sum(self.running.values()),
                           extra={"active_version": self._version,
                                  "canary_version": self._canary,
                                  "requests_by_version": loaded})
