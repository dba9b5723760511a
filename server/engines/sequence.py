"""Request and sequence state shared by the async API side and the decode thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from server.engines.base import ChoiceDelta, FinishReason, SamplingParams
from server.engines.bridge import Inbox
from server.engines.detokenize import IncrementalDecoder, StopMatcher
from server.engines.sampling import RowParams, choice_generator

DeltaOrError = ChoiceDelta | BaseException


class Request:
    """One ``generate`` call: prompt, parameters, and the inbox its deltas are posted to.

    ``cancelled`` is written by the event loop and read by the decode thread; a plain attribute is
    enough, the thread only needs to see it by its next step.
    """

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        loop: asyncio.AbstractEventLoop,
        canary: bool = False,
    ) -> None:
        self.id = request_id
        self.prompt = prompt
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.loop = loop
        # A reader that falls behind (a slow stream client) gets merged deltas, one per choice,
        # so what waits for it is at most its own answer, however many steps it misses.
        self.inbox: Inbox[DeltaOrError] = Inbox(coalesce, limit=2 * (params.n + 1))
        self.cancelled = False
        self.canary = canary  # asks for the canary arm (the active one while none is loaded)
        self.policy_version = ""  # set by the decode thread when it admits the request
        self.submitted_step = 0  # the decode step count when it was queued
        self.unfinished = params.n  # choices whose final delta the reader has not taken yet

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """The deltas posted to the inbox, until every choice has had its final one; raises the
        error the engine posted instead. While ``unfinished`` is above 0 after the reader
        stopped, it left early: the engine should free the request's slots."""
        while self.unfinished:
            items = await self.inbox.take_all()
            for item in coalesce(items) if len(items) > 1 else items:
                if isinstance(item, BaseException):
                    self.unfinished = 0
                    raise item
                if item.finish_reason is not None:
                    self.unfinished -= 1
                yield item


class Sequence:
    """One choice of a request being decoded: its text stream, stop strings and unsent output.

    Token ids and logprobs of a finished sequence include its EOS token (PPO needs to see that the
    answer ended); the text never does. Text held back as a possible stop-string prefix, or as an
    incomplete character, is sent with a later delta.
    """

    def __init__(
        self, request: Request, index: int, tokenizer: Any, eos_token_ids: frozenset[int]
    ) -> None:
        params = request.params
        self.request = request
        self.index = index
        self.row = RowParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_logprobs=params.top_logprobs,
            generator=choice_generator(params.seed, index),
        )
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self._eos = eos_token_ids
        self._decoder = IncrementalDecoder(tokenizer)
        self._decoded_chars = 0
        self._stop = StopMatcher(params.stop)
        self._ids: list[int] = []
        self._logprobs: list[float] = []
        self._top: list[dict[str, float]] | None = [] if params.top_logprobs else None
        self._text = ""
        self._last_sent = float("-inf")

    def append(self, token: int, logprob: float, top: dict[str, float] | None) -> None:
        """Record one sampled token and decide whether the sequence has finished."""
        self.generated += 1
        self._ids.append(token)
        self._logprobs.append(logprob)
        if self._top is not None and top is not None:
            self._top.append(top)
        if token in self._eos:
            self._finish("stop")
            return
        piece = self._decoder.push(token)
        self._decoded_chars += len(piece)
        self._text += self._stop.feed(piece)
        if self._stop.stopped:
            self.finish_reason = "stop"
        elif self.generated >= self.request.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: FinishReason) -> None:
        # Bytes the streaming decoder still holds (an incomplete character) come out here, so the
        # streamed text always adds up to decoding the token ids at once.
        tail = self._decoder.full_text()[self._decoded_chars :]
        self._text += self._stop.feed(tail)
        if self._stop.stopped:
            reason = "stop"
        else:
            self._text += self._stop.flush()
        self.finish_reason = reason

    def take_delta(self, now: float, interval_s: float) -> ChoiceDelta | None:
        """The unsent output as a delta when it is due: at the end, else when it has text and
        ``interval_s`` has passed since the last one."""
        if self.finish_reason is None and (
            not self._text or not self._ids or now - self._last_sent < interval_s
        ):
            return None
        delta = ChoiceDelta(
            index=self.index,
            text=self._text,
            token_ids=self._ids,
            logprobs=self._logprobs,
            policy_version=self.request.policy_version,
            top_logprobs=self._top,
            finish_reason=self.finish_reason,
        )
        self._text, self._ids, self._logprobs = "", [], []
        self._top = [] if self._top is not None else None
        self._last_sent = now
        return delta


def coalesce(items: list[DeltaOrError]) -> list[DeltaOrError]:
    """Merge queued deltas of the same choice (the consumer fell behind); an error ends the list."""
    out: list[DeltaOrError] = []
    open_deltas: dict[int, ChoiceDelta] = {}
    for item in items:
        if isinstance(item, BaseException):
            out.append(item)
            break
        prev = open_deltas.get(item.index)
        if prev is None:
            open_deltas[item.index] = item
            out.append(item)
            continue
        prev.text += item.text
        prev.token_ids += item.token_ids
        prev.logprobs += item.logprobs
        if prev.top_logprobs is not None and item.top_logprobs is not None:
            prev.top_logprobs += item.top_logprobs
        prev.finish_reason = item.finish_reason
    return out
