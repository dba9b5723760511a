"""One choice of a request being decoded, on the decode side: its sampling row, text stream
and stop strings."""

from __future__ import annotations

from typing import Any

from server.engines.base import ChoiceDelta, FinishReason
from server.engines.detokenize import IncrementalDecoder, StopMatcher
from server.engines.request import Request
from server.engines.sampling import RowParams, choice_generator


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
