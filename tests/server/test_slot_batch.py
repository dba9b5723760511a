"""The slot KV cache (``slot_batch.py``) against a forward pass without any cache and against the
``DynamicCache`` batch it replaces: rows of different lengths joining and leaving mid-decode, on
small random models of the families the engine serves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

from server.engines.batch import PaddedBatch
from server.engines.slot_batch import SlotBatch, slots_fit
from server.engines.slot_cache import MIN_COLUMNS

VOCAB = 97
CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                               bos_token_id=0, eos_token_id=0),
}

Batch = SlotBatch | PaddedBatch


def _model(family: str, attention: str = "sdpa") -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attention)
    return model.eval()


def _prompt(length: int, seed: int) -> list[int]:
    return [(seed * 31 + 7 * i) % (VOCAB - 1) + 1 for i in range(length)]


class Script:
    """Greedy decoding through ``kind`` batches, every step's logits checked against a forward
    pass of each row's whole sequence; the greedy tokens and their logprobs recorded."""

    def __init__(self, model: Any, kind: str) -> None:
        self.model, self.kind = model, kind
        self.rows: list[list[int]] = []  # each row's tokens, prompt and fed tokens
        self.batch: Batch | None = None
        self.tokens: list[list[int]] = []  # per step, each row's greedy token
        self.logprobs: list[list[float]] = []

    def join(self, prompts: list[list[int]], order: list[int] | None = None,
             repeat: list[int] | None = None) -> None:
        """Prefill ``prompts`` (their rows repeated as ``repeat`` says, as ``n`` > 1 does) and
        merge them in ``order``."""
        joining, logits = PaddedBatch.prefill(self.model, prompts, 0)
        rows = [list(p) for p in prompts]
        if repeat is not None:
            joining.select(repeat)
            logits = logits[repeat]
            rows = [list(rows[i]) for i in repeat]
        self._check(rows, logits)
        joining.tokens = self._feed(rows, logits)
        if self.batch is None:
            self.batch = SlotBatch.adopt(joining) if self.kind == "slot" else joining
            self.rows = rows
        else:
            self.batch.merge(joining, order)
            merged = self.rows + rows
            self.rows = [merged[i] for i in order] if order is not None else merged

    def leave(self, keep: list[int]) -> None:
        assert self.batch is not None
        self.batch.select(keep)
        self.rows = [self.rows[i] for i in keep]

    def decode(self, steps: int) -> None:
        assert self.batch is not None
        for _ in range(steps):
            logits = self.batch.decode(self.model)
            self._check(self.rows, logits)
            self.batch.tokens = self._feed(self.rows, logits)

    def _feed(self, rows: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
        self.tokens.append(tokens.tolist())
        self.logprobs.append(logprobs.tolist())
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.append(token)
        return tokens[:, None]

    def _check(self, rows: list[list[int]], logits: torch.Tensor) -> None:
        want = torch.stack([self.model(input_ids=torch.tensor([row]), use_cache=False)
                            .logits[0, -1] for row in rows])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def _play(model: Any, kind: str) -> Script:
    """Two rows; two join between them; the first leaves; one joins twice (``n`` = 2); rows
    leave from the middle and the end; one joins at the front."""
    script = Script(model, kind)
    script.join([_prompt(7, 1), _prompt(3, 2)])
    script.decode(3)
    script.join([_prompt(5, 3), _prompt(2, 4)], order=[0, 2, 1, 3])
    script.decode(2)
    script.leave([1, 2, 3])
    script.decode(2)
    script.join([_prompt(9, 5)], repeat=[0, 0])
    script.decode(3)
    script.leave([0, 2, 4])
    script.decode(1)
    script.join([_prompt(4, 6)], order=[3, 0, 1, 2])
    script.decode(3)
    return script


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_slots_match_a_forward_pass_and_the_dynamic_cache(family: str, attention: str) -> None:
    model = _model(family, attention)
    with torch.inference_mode():
        assert slots_fit(model)
        slots = _play(model, "slot")
        padded = _play(model, "padded")
    assert slots.tokens == padded.tokens
    for mine, theirs in zip(slots.logprobs, padded.logprobs, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)


def test_slots_and_columns_grow_past_their_first_allocation() -> None:
    model = _model("llama")
    with torch.inference_mode():
        script = Script(model, "slot")
        script.join([_prompt(3, 1)])
        script.join([_prompt(6, 2), _prompt(2, 3), _prompt(8, 4)])  # 1 slot, then 4
        script.decode(MIN_COLUMNS + 3 - 8)  # past the first columns' allocation
        assert isinstance(script.batch, SlotBatch)
        assert script.batch.cache.columns > MIN_COLUMNS and script.batch.cache.slots >= 4


def test_a_sliding_window_model_keeps_the_dynamic_cache() -> None:
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        assert not slots_fit(model)
