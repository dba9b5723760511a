"""Training the demo model: a small LlamaForCausalLM, next-token loss on assistant turns only."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flywheel.hf_progress import tqdm

STEPS_ENV = "FLYWHEEL_DEMO_STEPS"


@dataclass(frozen=True)
class Preset:
    """Model size and training budget."""

    hidden_size: int
    layers: int
    heads: int  # head_dim = hidden_size / heads = 64, a size every vLLM attention backend has
    intermediate_size: int
    vocab_size: int  # BPE target; the corpus may yield fewer tokens
    steps: int
    batch_size: int
    lr: float  # small models take a large rate; AdamW with warmup and cosine decay
    tokenizer_conversations: int  # corpus sample the BPE merges are learned from
    max_positions: int = 512  # longer than any demo chat, room for multi-turn requests
    # Fixed torch threads, so that the same seed gives the same bits on the same machine.
    # One for tiny models: their small ops gain nothing from a second thread and stall badly
    # when the cores are shared.
    threads: int = 2


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 1, 128, 512, steps=200, batch_size=16, lr=3e-3,
                   tokenizer_conversations=1000, threads=1),
    # 1,000 steps (it was 1,300): the judge's approval of sampled answers held (0.33 against
    # 0.29 over 400 prompts; the style mix alike) and the build fits a first answer within two
    # minutes of `flywheel up` on 2 cores (docs/benchmarks.md, "The first answer").
    "demo": Preset(128, 4, 2, 384, 2048, steps=1000, batch_size=32, lr=3e-3,
                   tokenizer_conversations=8000),
}


def resolve_steps(preset: Preset) -> int:
    """The preset's steps, unless FLYWHEEL_DEMO_STEPS overrides them."""
    override = os.environ.get(STEPS_ENV, "").strip()
    return int(override) if override else preset.steps


def model_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A Llama config sized by the preset, with the tokenizer's EOS and PAD ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=preset.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def make_batches(
    examples: list[tuple[list[int], list[bool]]], batch_size: int, pad_id: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of similar length (less padding), in a seeded random order."""
    rng = random.Random(seed)
    chunk = batch_size * 32
    groups: list[list[tuple[list[int], list[bool]]]] = []
    for start in range(0, len(examples), chunk):
        part = sorted(examples[start:start + chunk], key=lambda e: len(e[0]))
        groups += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    return [_collate(group, pad_id) for group in groups]


def _collate(group: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in group)
    input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(group), width), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(group), width), dtype=torch.long)  # (B, T)
    for row, (ids, learn) in enumerate(group):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        labels[row, :n] = torch.where(torch.tensor(learn), torch.tensor(ids), -100)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay towards zero.

    Decaying fully averages the last steps' updates, so the learned style mix (the first answer
    token) follows the corpus mix rather than the last few batches.
    """
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summed_token_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the learned (assistant) tokens of a batch."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def train_model(
    model: LlamaForCausalLM,
    batches: list[dict[str, torch.Tensor]],
    lr: float,
    progress: bool,
) -> list[float]:
    """Plain AdamW loop over ``batches``; returns the mean token loss per step.

    The summed loss is divided by one constant, the mean learned tokens per batch, not by each
    batch's own count: with length-bucketed batches a per-batch mean would weigh the tokens of
    long chats (the rambling style) less and skew the style mix the model learns.
    """
    counts = [int((b["labels"] != -100).sum()) for b in batches]
    norm = max(1.0, sum(counts) / max(1, len(counts)))
    optimizer = torch.optim.AdamW(  # fused: one kernel for all parameters (3 of 80 ms a step)
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01, fused=True
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(total=len(batches), desc="demo model", disable=not progress, unit="step")
    for step, (batch, count) in enumerate(zip(batches, counts, strict=True)):
        # 1. set this step's learning rate
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, len(batches), lr)
        # 2. next-token loss on the assistant tokens
        loss_sum = summed_token_loss(model, batch)
        # 3. clipped gradient step
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / norm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss_sum.item() / max(1, count))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    model.eval()
    return losses
