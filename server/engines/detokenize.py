"""Incremental detokenisation and stop strings for one generated sequence."""

from __future__ import annotations

from typing import Any

try:  # tokenizers >= 0.21: Rust-side streaming decode, a few microseconds per token
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None


class IncrementalDecoder:
    """Text of each new token, never splitting a multi-byte character.

    Uses ``tokenizers``' ``DecodeStream`` for fast tokenizers, else the prefix/read-offset method
    of vLLM and TGI (decode a short window twice and emit the difference).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if DecodeStream is not None else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_id: int) -> str:
        """Append a token; returns the text it completes ('' while a character is incomplete)."""
        self._ids.append(token_id)
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._push_windowed()

    def _push_windowed(self) -> str:
        ids, decode = self._ids, self._tokenizer.decode
        prefix = decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def full_text(self) -> str:
        """Every pushed token decoded at once: what the streamed pieces must add up to."""
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)


class StopMatcher:
    """Holds back text that may be the start of a stop string; finds the first complete one.

    The text handed out never contains a stop string or any part of one that later completes,
    because every suffix that is a prefix of some stop string stays held until it is decided.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add new text; returns what can be emitted now. Sets ``stopped`` on a complete match."""
        if not self._stop:
            return text
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return held[:cut]
        keep = self._longest_stop_prefix_suffix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The held text, released when the sequence ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


class ChoiceTexts:
    """The text of each choice's streamed token ids, for an engine asked for ids only (vLLM
    with ``detokenize=False``): what a position's delta adds, and at the end whatever bytes of an
    incomplete character are left, so the pieces add up to decoding all ids at once."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._choices: dict[int, tuple[IncrementalDecoder, list[int]]] = {}

    def text(self, index: int, token_ids: list[int], finished: bool) -> str:
        decoder, chars = self._choices.get(index) or self._choices.setdefault(
            index, (IncrementalDecoder(self._tokenizer), [0]))
        text = "".join([decoder.push(t) for t in token_ids])
        chars[0] += len(text)
        if finished:
            text += decoder.full_text()[chars[0]:]
        return text
