"""Completion logic: validate against the model, run the engine, shape OpenAI responses, store."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from anyio import to_thread

from feedback_store import NewChoice, NewCompletion
from feedback_store.errors import StoreError
from feedback_store.types import Rater
from server.completions.bounds import check_requested, known_tokens
from server.completions.budget import bound_request_cost, default_budget
from server.completions.protocol import ChatCompletionRequest, CompletionRequest
from server.completions.responses import (
    ChoiceState,
    CompletionJob,
    chunk_choice,
    envelope,
    full_choice,
    usage,
)
from server.engines.base import ChoiceDelta, PromptTooLongError, SamplingParams
from server.errors import APIError
from server.limits import admit
from server.state import AppState

log = logging.getLogger(__name__)


def _max_tokens(state: AppState, prompt_len: int, requested: int | None,
                param: str = "messages") -> int:
    """What a prompt of ``prompt_len`` tokens may generate: ``requested`` (checked against what
    no prompt changes, ``check_requested``) or the room left, whichever is smaller: like a
    default, an answer ends where the context does (finish_reason "length")."""
    limit = state.engine.max_model_len
    if prompt_len >= limit:
        raise APIError(400, str(PromptTooLongError(prompt_len, limit)), param=param,
                       code="context_length_exceeded")
    room = limit - prompt_len
    return room if requested is None else min(requested, room)


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


# Prompts up to this many characters are tokenised on the event loop (the demo model's chat
# template and tokenizer: ~150 us for a question), where the hop to a worker thread and back cost
# as much again; longer ones on a worker thread: megabytes took the tokenizer seconds, during
# which every route stalled.
INLINE_TOKENIZE_CHARS = 4096
# What a chat message costs the template beyond its content (role markers, separators): many
# empty messages are rendered off the loop too.
TEMPLATE_CHARS_PER_MESSAGE = 32


async def _encode(param: str, encode: Any, prompt: Any, chars: int) -> list[int]:
    """Token ids of ``prompt`` (``chars`` long), on the loop when it is short."""
    try:
        if chars <= INLINE_TOKENIZE_CHARS:
            return list(encode(prompt))
        return list(await to_thread.run_sync(encode, prompt))
    except PromptTooLongError as exc:  # refused before tokenising (``refuse_unfittable``)
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc


async def prepare_chat(state: AppState, req: ChatCompletionRequest,
                       rater: Rater | None = None, tenant: str = "") -> CompletionJob:
    _check_model(state, req.model)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    check_requested(state, req, 1)  # before tokenising: the resolved value is no larger
    requested = req.requested_max_tokens()
    admit(state, tenant)
    chars = sum(len(m["content"]) + TEMPLATE_CHARS_PER_MESSAGE for m in messages)
    prompt_ids = await _encode("messages", state.engine.encode_chat, messages, chars)
    max_tokens = _max_tokens(state, len(prompt_ids), requested)
    if requested is None:
        max_tokens = min(max_tokens, default_budget(state, 1, req.n))
    bound_request_cost(state, req, 1, max_tokens)
    top = (req.top_logprobs or 0) if req.logprobs else 0
    return CompletionJob(
        kind="chat", id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
        prompt_ids=prompt_ids,
        prompt_text="\n".join(f"{m['role']}: {m['content']}" for m in messages),
        messages=messages, params=_sampling(req, max_tokens, top), logprobs=req.logprobs,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        user=req.user, request_params=_request_params(req), rater=rater or Rater(user=req.user),
        tenant=tenant,
    )


async def prepare_text(state: AppState, req: CompletionRequest,
                       rater: Rater | None = None, tenant: str = "") -> list[CompletionJob]:
    """One job per prompt (see ``CompletionJob``), all checked before any runs."""
    _check_model(state, req.model)
    prompts = req.prompts()
    check_requested(state, req, len(prompts))  # before tokenising: resolved values are no larger
    job_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    jobs = []
    for i, prompt in enumerate(prompts):
        admit(state, tenant)
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(prompt, str):
            text = prompt
            prompt_ids = await _encode(param, state.engine.encode_text, prompt, len(prompt))
        else:
            prompt_ids = known_tokens(state, prompt, param)
            text = await _decode(state, prompt_ids, param)
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        max_tokens = _max_tokens(state, len(prompt_ids), req.requested_max_tokens(), param)
        if req.max_tokens is None:  # OpenAI's default for text completions, within the budget
            max_tokens = min(max_tokens, 16, default_budget(state, len(prompts), req.n))
        jobs.append(CompletionJob(
            kind="text", id=job_id, created=created, prompt_ids=prompt_ids, prompt_text=text,
            messages=None, params=_sampling(req, max_tokens, req.logprobs or 0),
            logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            user=req.user, request_params=_request_params(req), index_base=i * req.n,
            rater=rater or Rater(user=req.user), tenant=tenant,
            store_id=job_id if len(prompts) == 1 else f"{job_id}-{i}",
            echo=text if req.echo else None,
        ))
    bound_request_cost(state, req, len(jobs), max(j.params.max_tokens for j in jobs))
    return jobs


async def _decode(state: AppState, prompt_ids: list[int], param: str) -> str:
    try:
        return await to_thread.run_sync(state.engine.decode, prompt_ids)
    except (ValueError, OverflowError, IndexError) as exc:  # an id the tokenizer cannot spell
        raise APIError(400, f"The prompt holds a token id out of vocabulary ({exc}).",
                       param=param, code="invalid_value") from exc


# --- running ---------------------------------------------------------------------------------

def split_by_arm(state: AppState, job: CompletionJob) -> list[tuple[CompletionJob, bool]]:
    """The job as the engine runs it, with whether on the canary: whole on one arm, or, when a
    canary assigned per request gives it only some of the answers (`CanarySplit.
    canary_answers`), as two jobs, one per arm, in random order (which answers a user reads
    first says nothing of the arm).

    Never split: a request with a `seed` (each arm would sample its answers from the same
    seeded streams, so the two arms' first answers would repeat each other), and any request
    while this replica has no canary loaded (both arms would be the active version)."""
    n = job.params.n
    if job.params.seed is not None or state.engine.canary_version is None:
        return [(job, state.split.canary_answers(job.rater, 1) == 1)]  # one draw, all answers
    on_canary = state.split.canary_answers(job.rater, n)
    if on_canary in (0, n):
        return [(job, on_canary == n)]
    arms = [(on_canary, True), (n - on_canary, False)]
    random.shuffle(arms)
    parts, first = [], 0
    for size, canary in arms:
        parts.append((replace(job, params=replace(job.params, n=size),
                              index_base=job.index_base + first, first_stored=first,
                              engine_id=f"{job.store_id}-{'canary' if canary else 'active'}"),
                      canary))
        first += size
    return parts


async def _store(runs: list[Run]) -> None:
    """One stored completion from the runs of one prompt (one, or one per arm), each answer
    with the version that wrote it."""
    state, job = runs[0].state, runs[0].job
    record = NewCompletion(
        id=job.store_id, kind=job.kind, prompt_text=job.prompt_text,
        prompt_token_ids=job.prompt_ids, messages=job.messages,
        model=state.settings.served_model_name, policy_version=runs[0].policy,
        params=job.request_params, user=job.user, created_at=job.made_at,
        key_scope=job.rater.key_scope,
        choices=[NewChoice(index=run.job.first_stored + i, text=c.text, token_ids=c.token_ids,
                           logprobs=c.logprobs, finish_reason=c.finish_reason or "length",
                           policy_version=run.policy)
                 for run in runs for i, c in sorted(run.choices.items())],
    )
    try:
        error = await state.completion_writes.add(record)
    except StoreError as unavailable:
        error = unavailable
    if error is not None:
        # Serving goes on without the database; this completion cannot receive feedback.
        state.metrics.unstored.inc()
        log.warning("completion %s served but not stored: %s", job.store_id, error)


class Run:
    """One engine request, with metrics; iterate it for deltas.

    ``counted``: the prompt's first engine request, which is admitted against the queue bounds,
    waits in its key's share and enters the request metrics; the second arm of a request a
    canary split (`split_by_arm`) is none of these, its prompt already counted once."""

    def __init__(self, state: AppState, job: CompletionJob, route: str, *,
                 canary: bool = False, counted: bool = True) -> None:
        if counted:
            admit(state, job.tenant)  # the queue bounds, where the engine takes it (no await)
        self.state, self.job, self.route, self.counted = state, job, route, counted
        self.started = time.perf_counter()
        self.choices: dict[int, ChoiceState] = {i: ChoiceState() for i in range(job.params.n)}
        engine = state.engine
        # The version it will run on, for a stream's headers before its first delta (which
        # says for sure: a swap may come in between).
        self.policy = (engine.canary_version if canary and engine.canary_version
                       else engine.policy_version)
        self._it = engine.generate(job.prompt_ids, job.params, job.engine_id,
                                   canary=canary, tenant=job.tenant)
        self._waiting = counted  # counted in its key's share until its first token
        self._tokens: Any = None  # the generation-token counter of its policy, from the first
        if counted:
            state.shares.enter(job.tenant)
            state.metrics.in_flight.inc()
            state.metrics.prompt_tokens.inc(len(job.prompt_ids))

    async def next(self) -> ChoiceDelta | None:
        try:
            delta = await self._it.__anext__()
        except StopAsyncIteration:
            return None
        if self._tokens is None:
            self._started()
            self.policy = delta.policy_version
            if self.counted:
                self.state.metrics.ttft.labels(self.route).observe(
                    time.perf_counter() - self.started)
            self._tokens = self.state.metrics.generation_tokens.labels(self.policy)
        self.choices[delta.index].add(delta)
        if delta.token_ids:
            self._tokens.inc(len(delta.token_ids))
        return delta

    def _started(self) -> None:
        if self._waiting:
            self._waiting = False
            self.state.shares.leave(self.job.tenant)

    async def close(self) -> None:
        self._started()
        if self.counted:
            self.state.metrics.in_flight.dec()
            self.state.metrics.latency.labels(self.route).observe(
                time.perf_counter() - self.started)
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


class Runs:
    """The engine requests of one API request (one per prompt, and per arm where a canary
    splits it), their deltas merged in the order they come; ``next`` returns (run, delta), or
    None once all ended."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self._queue: asyncio.Queue[tuple[Run, ChoiceDelta | BaseException | None]] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._live = len(self.runs)

    @classmethod
    async def start(cls, state: AppState, jobs: list[CompletionJob], route: str) -> Runs:
        runs: list[Run] = []
        try:
            for job in jobs:
                for part, canary in split_by_arm(state, job):
                    runs.append(Run(state, part, route, canary=canary,
                                    counted=part.first_stored == 0))
        except BaseException:
            for run in runs:  # the engine took these (a later one got 429): free them
                await run.close()
            raise
        return cls(runs)

    @property
    def policy(self) -> str:
        return self.runs[0].policy

    async def next(self) -> tuple[Run, ChoiceDelta] | None:
        if len(self.runs) == 1:  # no task, no queue on the usual path
            delta = await self.runs[0].next()
            return None if delta is None else (self.runs[0], delta)
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=len(self.runs))
            self._pumps = [asyncio.ensure_future(self._pump(run)) for run in self.runs]
        while self._live:
            run, item = await self._queue.get()
            if item is None:
                self._live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return run, item
        return None

    async def _pump(self, run: Run) -> None:
        assert self._queue is not None
        try:
            while (delta := await run.next()) is not None:
                await self._queue.put((run, delta))
        except Exception as exc:
            await self._queue.put((run, exc))
            return
        await self._queue.put((run, None))

    async def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for run in self.runs:
            await run.close()

    async def store(self) -> None:
        prompts: dict[str, list[Run]] = {}
        for run in self.runs:
            prompts.setdefault(run.job.store_id, []).append(run)
        for runs in prompts.values():
            await _store(runs)


def _choices(state: AppState, runs: Runs) -> list[dict[str, Any]]:
    return sorted((full_choice(state, run.job, i, c, run.policy) for run in runs.runs
                   for i, c in run.choices.items()), key=lambda choice: choice["index"])


def _usage(runs: Runs) -> dict[str, int]:
    return usage([run.job for run in runs.runs], [run.choices for run in runs.runs])


async def complete(state: AppState, jobs: list[CompletionJob], route: str) -> tuple[dict, str]:
    """Run to the end; returns the response body and the policy version that produced it."""
    runs = await Runs.start(state, jobs, route)
    try:
        while await runs.next() is not None:
            pass
    finally:
        await runs.close()
    await runs.store()
    body = envelope(state, jobs[0], runs.policy, chunk=False)
    body["choices"] = _choices(state, runs)
    body["usage"] = _usage(runs)
    return body, runs.policy


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Chunks:
    """The stream events of one response: every chunk shares its envelope (id, object, created,
    model, policy), so that is serialised once per run and policy, and each token's event
    serialises only its choice (``chunk_choice``)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._prefixes: dict[tuple[int, str], bytes] = {}

    def event(self, run: Run, delta: ChoiceDelta, first: bool) -> bytes:
        key = (id(run), delta.policy_version)
        prefix = self._prefixes.get(key)
        if prefix is None:
            head = envelope(self.state, run.job, delta.policy_version, chunk=True)
            head["choices"] = []
            prefix = self._prefixes[key] = _sse(head)[:-4]  # up to the list's "]}"
        choice = chunk_choice(self.state, run.job, delta, first)
        return prefix + json.dumps(choice, separators=(",", ":")).encode() + b"]}\n\n"


async def start_stream(state: AppState, jobs: list[CompletionJob],
                       route: str) -> tuple[str, AsyncIterator[bytes]]:
    """Wait for the first delta (it fixes the policy version for the headers), then stream."""
    runs = await Runs.start(state, jobs, route)
    try:
        first = await runs.next()
    except BaseException:
        await runs.close()
        raise
    return runs.policy, _stream_events(state, jobs[0], runs, first)


async def _stream_events(state: AppState, job: CompletionJob, runs: Runs,
                         first: tuple[Run, ChoiceDelta] | None) -> AsyncIterator[bytes]:
    started: set[tuple[int, int]] = set()
    chunks = _Chunks(state)
    completed = False
    try:
        item = first
        while item is not None:
            run, delta = item
            key = (run.job.index_base, delta.index)
            yield chunks.event(run, delta, first=key not in started)
            started.add(key)
            item = await runs.next()
        completed = True
    except Exception as exc:  # after the 200 status, an error can only travel in the stream
        log.exception("stream %s failed", job.id)
        yield _sse({"error": {"message": str(exc) or "generation failed",
                              "type": "server_error", "param": None, "code": "internal_error"}})
    finally:
        await runs.close()
    if not completed:
        return
    await runs.store()
    if job.include_usage:
        body = envelope(state, job, runs.policy, chunk=True)
        body.update(choices=[], usage=_usage(runs))
        yield _sse(body)
    yield _sse("[DONE]")
