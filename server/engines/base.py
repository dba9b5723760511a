"""The engine interface: what the HTTP layer needs from a model runtime, and nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# Defined a level down, where the vLLM adapter of the trainer's rollouts reaches them too.
from flywheel.engine_types import EngineError, SamplingParams, SwapError

__all__ = [
    "ChoiceDelta", "Engine", "EngineError", "EngineStats", "FinishReason", "PromptTooLongError",
    "SamplingParams", "SwapError", "refuse_unfittable",
]

FinishReason = Literal["stop", "length"]


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


class PromptTooLongError(EngineError):
    def __init__(self, prompt_tokens: int, max_model_len: int, *, at_least: bool = False) -> None:
        """``at_least``: ``prompt_tokens`` is a lower bound (the prompt was refused untokenised)."""
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, "
            f"but the prompt has {'at least ' if at_least else ''}{prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


def refuse_unfittable(text: str, max_model_len: int, max_token_bytes: int | None) -> None:
    """Raise ``PromptTooLongError`` for a text too long for the context whatever its tokens.

    A tokenizer whose tokens each stand for at most ``max_token_bytes`` bytes of text needs at
    least bytes / max_token_bytes tokens, so this costs one pass over the text instead of a
    tokenisation (a few MB took the tokenizer seconds). ``None``: no sure bound, no check.
    """
    if not max_token_bytes or len(text) * 4 <= max_model_len * max_token_bytes:
        return  # UTF-8 spends at most 4 bytes on a character: surely short enough
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_model_len * max_token_bytes:
        raise PromptTooLongError(-(-size // max_token_bytes), max_model_len, at_least=True)


@runtime_checkable
class Engine(Protocol):
    """An async text-generation engine serving the active policy version and, optionally, a canary.

    ``generate`` yields deltas for all ``n`` choices of one request, interleaved, until each
    choice has yielded a delta with a ``finish_reason``. Every delta of a request carries the same
    ``policy_version``: the one whose weights the request was admitted to (the canary's when it
    asked for the canary and one was loaded, else the active one). Cancelling the iterator
    (client gone) frees the request's slots. Which requests go to the canary is the server's
    decision; the engine serves the arm it is told.
    """

    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    # True when ``swap_weights`` and ``set_canary`` hash every file they load and refuse any
    # that does not make ``sha256``: the server then checks a checkpoint's manifest without
    # hashing its contents first (``check_servable(..., contents=False)``), each byte hashed once.
    hashes_what_it_loads: bool

    @property
    def policy_version(self) -> str: ...

    @property
    def canary_version(self) -> str | None:
        """The canary's version; None when no canary is loaded."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat prompt (chat template with the generation prompt appended).

        Both encoders block (the server calls them on a worker thread) and raise
        ``PromptTooLongError`` before tokenising a text that cannot fit the context
        (``refuse_unfittable``).
        """
        ...

    def encode_text(self, prompt: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
        canary: bool = False, tenant: str = "",
    ) -> AsyncIterator[ChoiceDelta]:
        """``canary=True`` runs on the canary when one is loaded, else on the active version.
        ``tenant`` names the caller (its key, or its address): an engine that schedules may share
        its batch out by it (the transformers engine does; vLLM and the fake engine ignore it)."""
        ...

    async def swap_weights(self, path: str, version: str, sha256: str | None = None) -> None:
        """Load the checkpoint at ``path`` beside the current weights and make it the served one.

        Requests admitted after this returns run on the new weights and carry ``version``.
        Requests already running keep the label they were admitted with; the transformers engine
        finishes them on the old weights, while vLLM (which reloads in place, ``mode="keep"``)
        re-prefills them on the new weights. Raises ``SwapError`` and keeps serving the old
        weights on any failure.

        When ``version`` is the canary's, its loaded weights are promoted without a reload: the
        canary ends (``canary_version`` becomes None) and canary requests go to the active one.

        ``sha256``: the digest the caller checked the directory against. The transformers engine
        loads the bytes it hashes against it, so a file replaced after the check is refused;
        vLLM reads the directory itself and cannot (docs/design.md, "Checking the files").
        """
        ...

    async def set_canary(self, path: str, version: str, sha256: str | None = None) -> None:
        """Load ``path`` beside the active weights and serve it to requests that ask for the canary.

        Replaces a previous canary (its in-flight requests finish on it); the version already
        loaded as the canary is a no-op. Raises ``SwapError`` and changes nothing on any failure
        (the same checks as ``swap_weights``, ``sha256`` as there).
        """
        ...

    async def end_canary(self) -> None:
        """New requests stop going to the canary; in-flight ones finish on it; then its weights
        are freed (after this returns, once the last of them ends). No canary: a no-op."""
        ...

    def stats(self) -> EngineStats: ...
