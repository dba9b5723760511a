"""The engine interface: what the HTTP layer needs from a model runtime, and nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling parameters after validation (the API layer has checked every bound)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0  # alternatives per position (0..20); the sampled token's is always kept


@dataclass
class ChoiceDelta:
    """New output of one choice since its last delta.

    ``logprobs`` are the log-probabilities of the sampled tokens under the distribution they were
    sampled from (after temperature and top-p), which is what PPO needs as behaviour logprobs.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    policy_version: str
    top_logprobs: list[dict[str, float]] | None = None  # one dict per token when asked for
    finish_reason: FinishReason | None = None  # set on the last delta of the choice


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class EngineError(RuntimeError):
    """A request the engine cannot serve (the API layer maps it to an error envelope)."""


class PromptTooLongError(EngineError):
    def __init__(self, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class SwapError(RuntimeError):
    """New weights could not be loaded; the engine keeps serving the old ones."""


@runtime_checkable
class Engine(Protocol):
    """An async text-generation engine serving one policy version at a time.

    ``generate`` yields deltas for all ``n`` choices of one request, interleaved, until each
    choice has yielded a delta with a ``finish_reason``. Every delta of a request carries the same
    ``policy_version``: the one that was active when the request was admitted. Cancelling the
    iterator (client gone) frees the request's slots.
    """

    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]

    @property
    def policy_version(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat prompt (chat template with the generation prompt appended)."""
        ...

    def encode_text(self, prompt: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[ChoiceDelta]: ...

    async def swap_weights(self, path: str, version: str) -> None:
        """Load the checkpoint at ``path`` beside the current weights and make it the served one.

        Requests admitted after this returns run on the new weights and carry ``version``.
        Requests already running keep the label they were admitted with; the transformers engine
        finishes them on the old weights, while vLLM (which reloads in place, ``mode="keep"``)
        re-prefills them on the new weights. Raises ``SwapError`` and keeps serving the old
        weights on any failure.
        """
        ...

    def stats(self) -> EngineStats: ...
