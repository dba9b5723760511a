"""A request as the API side and the decode loop share it, torch-free: its admission
(``admissible``), its state and the inbox its deltas reach the reader through.

The API process of the engine-process mode imports this and never ``sequence.py`` (the decode
side's per-choice state, with torch's sampling).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engines.base import ChoiceDelta, EngineError, PromptTooLongError, SamplingParams
from server.engines.bridge import Inbox

DeltaOrError = ChoiceDelta | BaseException


def admissible(prompt: list[int], params: SamplingParams, max_model_len: int,
               vocab_size: int) -> int:
    """The new tokens a request may decode; ``EngineError`` (``PromptTooLongError``) for a
    prompt no engine could serve (raised before any streaming starts)."""
    if not prompt:
        raise EngineError("The prompt is empty.")
    if len(prompt) >= max_model_len:
        raise PromptTooLongError(len(prompt), max_model_len)
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise EngineError(f"Prompt token ids must lie in [0, {vocab_size}).")
    return max(1, min(params.max_tokens, max_model_len - len(prompt)))


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
        tenant: str = "",
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
        self.tenant = tenant  # whose request: the scheduler shares the batch out by it
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
