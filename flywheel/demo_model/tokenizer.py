"""The demo tokenizer: byte-level BPE trained on the corpus, with a small chat template.

A chat renders as ``<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>``; the
end-of-turn token is the EOS token, so generation stops at the end of the assistant's turn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flywheel.demo_model.corpus import Message

END = "<|end|>"
PAD = "<|pad|>"
ROLE_MARKERS: dict[str, str] = {
    "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
}
SPECIAL_TOKENS: tuple[str, ...] = (PAD, END, *ROLE_MARKERS.values())

# Jinja, as transformers and vLLM render it; the generation prompt ends with the assistant marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it with the special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    # Hyphens split first, so a spelling like "r-o-a-d" is one token per letter.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("-", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_MARKERS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def encode_chats(
    tokenizer: PreTrainedTokenizerFast, chats: Sequence[Sequence[Message]]
) -> list[tuple[list[int], list[bool]]]:
    """Per chat, its token ids and, per token, whether it is assistant output to learn.

    Equal to ``apply_chat_template(chat)`` token for token: special tokens split the text, so
    each message's content tokenizes on its own (all contents in one batch call, for speed).
    """
    contents = [m["content"] for chat in chats for m in chat]
    encoded = iter(tokenizer.backend_tokenizer.encode_batch(contents, add_special_tokens=False))
    end_id = tokenizer.convert_tokens_to_ids(END)
    markers = {role: tokenizer.convert_tokens_to_ids(tok) for role, tok in ROLE_MARKERS.items()}
    out = []
    for chat in chats:
        ids: list[int] = []
        learn: list[bool] = []
        for message in chat:
            content = next(encoded).ids
            is_answer = message["role"] == "assistant"
            ids += [markers[message["role"]], *content, end_id]
            learn += [False] + [is_answer] * (len(content) + 1)
        out.append((ids, learn))
    return out


def encode_chat(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[Message]
) -> tuple[list[int], list[bool]]:
    """One chat's token ids and learn mask (see ``encode_chats``)."""
    return encode_chats(tokenizer, [messages])[0]
