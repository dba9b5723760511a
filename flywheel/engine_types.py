"""The engine values the server and the trainer's rollout engine share: the sampling parameters
a request asks for and the two errors an engine raises. ``server.engines.base`` re-exports them
beside the engine interface; the vLLM adapter both sides use (``flywheel.vllm``) takes them from
here, so that neither side imports the other."""

from __future__ import annotations

from dataclasses import dataclass


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


class EngineError(RuntimeError):
    """A request the engine cannot serve (the API layer maps it to an error envelope)."""


class SwapError(RuntimeError):
    """New weights could not be loaded; the engine keeps serving the old ones."""
