"""OpenAI response bodies and stream chunks of the completion routes, from engine deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from feedback_store.types import Rater
from server.engines.base import ChoiceDelta

if TYPE_CHECKING:
    from server.state import AppState

Kind = Literal["chat", "text"]


@dataclass
class CompletionJob:
    """A validated request for one prompt, ready for the engine.

    A text completion with several prompts is one job per prompt, sharing ``id``: its choices
    are numbered from ``index_base`` (prompt i: i * n) and it is stored as ``store_id``. A
    request split between a canary's arms is one job per arm (`serving.split_by_arm`), sharing
    ``store_id``: its answers are stored from ``first_stored`` on, and the engine knows it as
    ``engine_id``.
    """

    kind: Kind
    id: str
    created: int
    prompt_ids: list[int]
    prompt_text: str
    messages: list[dict[str, Any]] | None
    params: Any  # server.engines.base.SamplingParams
    logprobs: bool
    include_usage: bool
    user: str | None
    request_params: dict[str, Any]
    rater: Rater = field(default_factory=Rater)  # who asked: its key owns the answer
    tenant: str = ""  # whose share of the queue and the batch it takes (``Authenticator.tenant``)
    index_base: int = 0
    store_id: str = ""
    first_stored: int = 0
    engine_id: str = ""
    echo: str | None = None  # text the answers start with (`echo`: the prompt's)
    # When it was made, to the microsecond (`created` is whole seconds, as OpenAI sends it):
    # stored with the answer, which a canary started within the same second must count.
    made_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.store_id = self.store_id or self.id
        self.engine_id = self.engine_id or self.store_id


@dataclass
class ChoiceState:
    """Everything one choice produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.top_logprobs:
            self.top_logprobs.extend(delta.top_logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def token_text(state: AppState, token_id: int) -> str:
    """A sampled token as the engines spell the alternatives in ``top_logprobs``: special
    tokens by name (``<|end|>``, not ``""``), as vLLM's server does. An engine without a
    tokenizer (the fake one) spells it as it decodes it."""
    tokenizer = getattr(state.engine, "tokenizer", None)
    if tokenizer is None:
        return state.engine.decode([token_id])
    return str(tokenizer.decode([token_id]))


def chat_logprobs(state: AppState, token_ids: list[int], logprobs: list[float],
                  tops: list[dict[str, float]]) -> dict[str, Any]:
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        token = token_text(state, tid)
        alternatives = tops[i] if i < len(tops) else {}
        content.append({
            "token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                             for t, v in alternatives.items()],
        })
    return {"content": content}


def text_logprobs(state: AppState, token_ids: list[int], logprobs: list[float],
                  tops: list[dict[str, float]], offset: int) -> dict[str, Any]:
    tokens = [token_text(state, t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": tops or None, "text_offset": offsets}


def usage(jobs: list[CompletionJob], choices: list[dict[int, ChoiceState]]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for per_job in choices for c in per_job.values())
    prompt = sum(len(job.prompt_ids) for job in jobs if job.first_stored == 0)  # once a prompt
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def full_choice(state: AppState, job: CompletionJob, index: int, choice: ChoiceState,
                version: str) -> dict[str, Any]:
    """A choice of a whole response, with the version that wrote it (`policy_version`: a
    response a canary split between its arms has answers from both)."""
    logprobs = None
    if job.kind == "chat":
        if job.logprobs:
            logprobs = chat_logprobs(state, choice.token_ids, choice.logprobs,
                                     choice.top_logprobs)
        return {"index": job.index_base + index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": logprobs, "finish_reason": choice.finish_reason,
                "policy_version": version}
    if job.logprobs:
        logprobs = text_logprobs(state, choice.token_ids, choice.logprobs, choice.top_logprobs,
                                 len(job.prompt_text))
    return {"index": job.index_base + index, "text": (job.echo or "") + choice.text,
            "logprobs": logprobs, "finish_reason": choice.finish_reason,
            "policy_version": version}


def envelope(state: AppState, job: CompletionJob, policy: str, chunk: bool) -> dict[str, Any]:
    if job.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created,
            "model": state.settings.served_model_name, "system_fingerprint": policy}


def chunk_choice(state: AppState, job: CompletionJob, delta: ChoiceDelta,
                 first: bool) -> dict[str, Any]:
    """The one choice of the stream event of ``delta``; ``first``: the first of its choice."""
    tops = delta.top_logprobs or []
    index = job.index_base + delta.index
    if job.kind == "chat":
        message: dict[str, Any] = {"content": delta.text} if delta.text or first else {}
        if first:
            message["role"] = "assistant"
        logprobs = (chat_logprobs(state, delta.token_ids, delta.logprobs, tops)
                    if job.logprobs else None)
        return {"index": index, "delta": message, "logprobs": logprobs,
                "finish_reason": delta.finish_reason}
    logprobs = (text_logprobs(state, delta.token_ids, delta.logprobs, tops, 0)
                if job.logprobs else None)
    text = (job.echo or "") + delta.text if first else delta.text
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": delta.finish_reason}
