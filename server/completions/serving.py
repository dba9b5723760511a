"""Completion logic: validate against the model, run the engine, shape OpenAI responses, store."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from anyio import to_thread

from feedback_store import NewChoice, NewCompletion
from feedback_store.errors import StoreError
from server.completions.protocol import ChatCompletionRequest, CompletionRequest
from server.engines.base import ChoiceDelta, PromptTooLongError, SamplingParams
from server.errors import APIError
from server.limits import admit
from server.state import AppState

log = logging.getLogger(__name__)

Kind = Literal["chat", "text"]


@dataclass
class CompletionJob:
    """A validated request, ready for the engine."""

    kind: Kind
    id: str
    created: int
    prompt_ids: list[int]
    prompt_text: str
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    logprobs: bool
    include_usage: bool
    user: str | None
    request_params: dict[str, Any]


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


def _max_tokens(state: AppState, prompt_len: int, requested: int | None) -> int:
    limit = state.engine.max_model_len
    if prompt_len >= limit:
        raise APIError(400, str(PromptTooLongError(prompt_len, limit)), param="messages",
                       code="context_length_exceeded")
    room = limit - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int,
              top_logprobs: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        n=req.n,
        stop=req.stop_list(),
        seed=req.seed,
        top_logprobs=top_logprobs,
    )


def _check_model(state: AppState, requested: str | None) -> None:
    if requested is not None and requested != state.settings.served_model_name:
        raise APIError(404, f"The model `{requested}` does not exist.", param="model",
                       code="model_not_found")


def _request_params(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    keep = ("max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs",
            "top_logprobs", "max_completion_tokens")
    return {k: v for k in keep if (v := getattr(req, k, None)) is not None}


async def _encode(param: str, encode: Any, prompt: Any) -> list[int]:
    """Tokenise on a worker thread: megabytes took the tokenizer seconds, every route stalled."""
    try:
        return list(await to_thread.run_sync(encode, prompt))
    except PromptTooLongError as exc:  # refused before tokenising (``refuse_unfittable``)
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc


async def prepare_chat(state: AppState, req: ChatCompletionRequest) -> CompletionJob:
    _check_model(state, req.model)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    admit(state)
    prompt_ids = await _encode("messages", state.engine.encode_chat, messages)
    max_tokens = _max_tokens(state, len(prompt_ids), req.requested_max_tokens())
    top = (req.top_logprobs or 0) if req.logprobs else 0
    return CompletionJob(
        kind="chat", id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
        prompt_ids=prompt_ids,
        prompt_text="\n".join(f"{m['role']}: {m['content']}" for m in messages),
        messages=messages, params=_sampling(req, max_tokens, top), logprobs=req.logprobs,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user, request_params=_request_params(req),
    )


async def prepare_text(state: AppState, req: CompletionRequest) -> CompletionJob:
    _check_model(state, req.model)
    text = req.prompt_text()
    admit(state)
    prompt_ids = await _encode("prompt", state.engine.encode_text, text)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    max_tokens = _max_tokens(state, len(prompt_ids), req.requested_max_tokens())
    if req.max_tokens is None:
        max_tokens = min(max_tokens, 16)  # OpenAI's default for text completions
    return CompletionJob(
        kind="text", id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
        prompt_ids=prompt_ids, prompt_text=text, messages=None,
        params=_sampling(req, max_tokens, req.logprobs or 0), logprobs=req.logprobs is not None,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user, request_params=_request_params(req),
    )


# --- response shapes -------------------------------------------------------------------------

def _token_text(state: AppState, token_id: int) -> str:
    return state.engine.decode([token_id])


def _chat_logprobs(state: AppState, token_ids: list[int], logprobs: list[float],
                   tops: list[dict[str, float]]) -> dict[str, Any]:
    content = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
        token = _token_text(state, tid)
        alternatives = tops[i] if i < len(tops) else {}
        content.append({
            "token": token, "logprob": lp, "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                             for t, v in alternatives.items()],
        })
    return {"content": content}


def _text_logprobs(state: AppState, token_ids: list[int], logprobs: list[float],
                   tops: list[dict[str, float]], offset: int) -> dict[str, Any]:
    tokens = [_token_text(state, t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": tops or None, "text_offset": offsets}


def _usage(job: CompletionJob, choices: dict[int, ChoiceState]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices.values())
    prompt = len(job.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _full_choice(state: AppState, job: CompletionJob, index: int,
                 choice: ChoiceState) -> dict[str, Any]:
    logprobs = None
    if job.kind == "chat":
        if job.logprobs:
            logprobs = _chat_logprobs(state, choice.token_ids, choice.logprobs,
                                      choice.top_logprobs)
        return {"index": index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": logprobs, "finish_reason": choice.finish_reason}
    if job.logprobs:
        logprobs = _text_logprobs(state, choice.token_ids, choice.logprobs, choice.top_logprobs,
                                  len(job.prompt_text))
    return {"index": index, "text": choice.text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason}


def _envelope(state: AppState, job: CompletionJob, policy: str, chunk: bool) -> dict[str, Any]:
    if job.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created,
            "model": state.settings.served_model_name, "system_fingerprint": policy}


def _chunk(state: AppState, job: CompletionJob, delta: ChoiceDelta, first: bool) -> dict:
    body = _envelope(state, job, delta.policy_version, chunk=True)
    tops = delta.top_logprobs or []
    if job.kind == "chat":
        message: dict[str, Any] = {"content": delta.text} if delta.text or first else {}
        if first:
            message["role"] = "assistant"
        logprobs = (_chat_logprobs(state, delta.token_ids, delta.logprobs, tops)
                    if job.logprobs else None)
        choice = {"index": delta.index, "delta": message, "logprobs": logprobs,
                  "finish_reason": delta.finish_reason}
    else:
        logprobs = (_text_logprobs(state, delta.token_ids, delta.logprobs, tops, 0)
                    if job.logprobs else None)
        choice = {"index": delta.index, "text": delta.text, "logprobs": logprobs,
                  "finish_reason": delta.finish_reason}
    body["choices"] = [choice]
    return body


# --- running ---------------------------------------------------------------------------------

async def _store(state: AppState, job: CompletionJob, policy: str,
                 choices: dict[int, ChoiceState]) -> None:
    record = NewCompletion(
        id=job.id, kind=job.kind, prompt_text=job.prompt_text, prompt_token_ids=job.prompt_ids,
        messages=job.messages, model=state.settings.served_model_name, policy_version=policy,
        params=job.request_params, user=job.user, created_at=float(job.created),
        choices=[NewChoice(index=i, text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                           finish_reason=c.finish_reason or "length")
                 for i, c in sorted(choices.items())],
    )
    try:
        await to_thread.run_sync(state.store.record_completion, record)
    except StoreError as exc:
        # Serving goes on without the database; this completion cannot receive feedback.
        state.metrics.unstored.inc()
        log.warning("completion %s served but not stored: %s", job.id, exc)


class Run:
    """One engine request, with metrics; iterate it for deltas."""

    def __init__(self, state: AppState, job: CompletionJob, route: str) -> None:
        admit(state)  # the queue bound, checked where the engine takes the request (no await)
        self.state, self.job, self.route = state, job, route
        self.started = time.perf_counter()
        self.choices: dict[int, ChoiceState] = {i: ChoiceState() for i in range(job.params.n)}
        self.policy = state.engine.policy_version
        self._it = state.engine.generate(job.prompt_ids, job.params, job.id,
                                         canary=state.split.to_canary(job.user))
        self._first = True
        state.metrics.in_flight.inc()
        state.metrics.prompt_tokens.inc(len(job.prompt_ids))

    async def next(self) -> ChoiceDelta | None:
        try:
            delta = await self._it.__anext__()
        except StopAsyncIteration:
            return None
        if self._first:
            self._first = False
            self.policy = delta.policy_version
            self.state.metrics.ttft.labels(self.route).observe(time.perf_counter() - self.started)
        self.choices[delta.index].add(delta)
        if delta.token_ids:
            self.state.metrics.generation_tokens.labels(self.policy).inc(len(delta.token_ids))
        return delta

    async def close(self) -> None:
        self.state.metrics.in_flight.dec()
        self.state.metrics.latency.labels(self.route).observe(time.perf_counter() - self.started)
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


async def complete(state: AppState, job: CompletionJob, route: str) -> tuple[dict, str]:
    """Run to the end; returns the response body and the policy version that produced it."""
    run = Run(state, job, route)
    try:
        while await run.next() is not None:
            pass
    finally:
        await run.close()
    await _store(state, job, run.policy, run.choices)
    body = _envelope(state, job, run.policy, chunk=False)
    body["choices"] = [_full_choice(state, job, i, c) for i, c in sorted(run.choices.items())]
    body["usage"] = _usage(job, run.choices)
    return body, run.policy


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def start_stream(state: AppState, job: CompletionJob,
                       route: str) -> tuple[str, AsyncIterator[bytes]]:
    """Wait for the first delta (it fixes the policy version for the headers), then stream."""
    run = Run(state, job, route)
    try:
        first = await run.next()
    except BaseException:
        await run.close()
        raise
    return run.policy, _stream_events(state, job, run, first)


async def _stream_events(state: AppState, job: CompletionJob, run: Run,
                         first: ChoiceDelta | None) -> AsyncIterator[bytes]:
    started: set[int] = set()
    completed = False
    try:
        delta = first
        while delta is not None:
            yield _sse(_chunk(state, job, delta, first=delta.index not in started))
            started.add(delta.index)
            delta = await run.next()
        completed = True
    except Exception as exc:  # after the 200 status, an error can only travel in the stream
        log.exception("stream %s failed", job.id)
        yield _sse({"error": {"message": str(exc) or "generation failed",
                              "type": "server_error", "param": None, "code": "internal_error"}})
    finally:
        await run.close()
    if not completed:
        return
    await _store(state, job, run.policy, run.choices)
    if job.include_usage:
        usage = _envelope(state, job, run.policy, chunk=True)
        usage.update(choices=[], usage=_usage(job, run.choices))
        yield _sse(usage)
    yield _sse("[DONE]")
