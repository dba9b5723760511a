"""A minimal deterministic engine for benches that measure the server, not a model.

A trimmed copy of ``tests/server/fake_engine.py`` (benches do not import tests): characters are
tokens and every answer is four words drawn from a seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

from server.engines.base import ChoiceDelta, EngineStats, SamplingParams, SwapError

EOS = 0
WORDS = ("yes", "no", "maybe", "sure", "ok")


class FakeEngine:
    """Streams one character per delta; never swaps weights."""

    model_name = "fake"
    eos_token_ids = (EOS,)

    def __init__(self, max_model_len: int = 512, policy_version: str = "policy-0") -> None:
        self.max_model_len = max_model_len
        self._version = policy_version

    @property
    def policy_version(self) -> str:
        return self._version

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.encode_text(text)

    def encode_text(self, prompt: str) -> list[int]:
        return [ord(c) for c in prompt]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != EOS)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[ChoiceDelta]:
        for index in range(params.n):
            rng = random.Random(f"{params.seed}-{index}" if params.seed is not None
                                else request_id + str(index))
            text = " ".join(rng.choice(WORDS) for _ in range(4)) + "."
            for count, char in enumerate(text[: params.max_tokens], start=1):
                done = count >= params.max_tokens
                yield ChoiceDelta(index, char, [ord(char)], [-0.5], self._version,
                                  finish_reason="length" if done else None)
                if done:
                    break
            else:
                yield ChoiceDelta(index, "", [EOS], [-0.1], self._version, finish_reason="stop")

    async def swap_weights(self, path: str, version: str) -> None:
        raise SwapError("the bench engine does not swap weights")

    def stats(self) -> EngineStats:
        return EngineStats(running=0)
