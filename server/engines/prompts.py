"""Prompts as the engines tokenise them: one chat rendering and one context bound for both.

The vLLM engine renders chats with the same template call as the transformers engine, so stored
prompts do not depend on the engine; ``max_token_bytes`` lets either refuse a text that cannot
fit the context before tokenising it (``base.refuse_unfittable``).
"""

from __future__ import annotations

import json
from typing import Any

from server.engines.base import refuse_unfittable


class PromptEncoder:
    """A tokenizer's prompts under a context of ``max_model_len`` tokens (settable: vLLM knows
    its own only once started)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.token_bytes = max_token_bytes(tokenizer)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
            refuse_unfittable(text, self.max_model_len, self.token_bytes)
            return list(tokenizer.encode(text, add_special_tokens=False))
        # A base model without a chat template: a plain transcript ending with the answer's cue.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_text(text)

    def encode_text(self, prompt: str) -> list[int]:
        refuse_unfittable(prompt, self.max_model_len, self.token_bytes)
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


# Unicode normalisation maps at most 4 bytes to 1 (NFKC: U+1D400 to "A"), lower-casing 3 to 1
# (U+212A KELVIN SIGN to "k"); a replacement by a shorter string shrinks by its ratio.
_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 3, "Prepend": 1}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation",
                           "UnicodeScripts"}


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of prompt text one token can stand for; None when there is no sure
    bound (then prompts are only measured by tokenising them).

    Byte-level BPE (GPT-2, Llama 3, Qwen) spells a token with at least one character per byte it
    covers, and SentencePiece BPE with byte fallback (Llama 2) with at least as many bytes, so the
    longest vocabulary entry bounds a token's text, times what the normaliser may shrink. What can
    drop text (whitespace-splitting pre-tokenisers, stripping, fused unknowns, WordPiece, added
    tokens that swallow spaces) has no bound.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _pre_tokenizer_keeps_text(spec.get("pre_tokenizer")):
        return None
    longest = max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=0)
    return max(longest, 4) * shrink  # an unknown character (<= 4 bytes) is one token


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers") or []:
            shrink = _normalizer_shrink(part)
            if shrink is None:
                return None
            factor *= shrink
        return factor
    if kind == "Replace":
        pattern, content = (spec.get("pattern") or {}).get("String"), spec.get("content") or ""
        if not pattern or not content:
            return None  # a regular expression or a deletion: no bound
        return max(1, -(-len(pattern.encode()) // len(content.encode())))
    return _SHRINK.get(kind or "")


def _pre_tokenizer_keeps_text(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_text(p) for p in spec.get("pretokenizers") or [])
    return kind in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"
