"""Reward training examples from the store's records: token sequences, splits, padding."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from feedback_store.types import PreferenceGroup, ThumbExample

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One batch element: a ranked group (``label`` None) or a lone thumb (``label`` 0/1)."""

    sequences: list[list[int]]  # prompt + answer token ids; best first for a group
    label: float | None = None


def strip_eos(answer: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    """The answer before its first EOS.

    The RM scores content only, whether or not a stored answer kept its EOS token; PPO's
    missing-EOS penalty handles answers that never stop.
    """
    eos = set(eos_token_ids)
    for i, token in enumerate(answer):
        if token in eos:
            return list(answer[:i])
    return list(answer)


def rm_sequence(prompt: Sequence[int], answer: Sequence[int], eos_token_ids: Sequence[int],
                max_length: int) -> list[int]:
    """Prompt + answer content, keeping the last ``max_length`` tokens (the prompt loses first)."""
    return (list(prompt) + strip_eos(answer, eos_token_ids))[-max_length:]


def group_example(group: PreferenceGroup, eos: Sequence[int], max_length: int) -> Example:
    seqs = [rm_sequence(group.prompt_token_ids, a, eos, max_length) for a in group.answers]
    return Example(sequences=seqs)


def thumb_example(thumb: ThumbExample, eos: Sequence[int], max_length: int) -> Example:
    seq = rm_sequence(thumb.prompt_token_ids, thumb.answer_token_ids, eos, max_length)
    return Example(sequences=[seq], label=1.0 if thumb.label else 0.0)


def split_holdout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Shuffle and hold out ``fraction`` of the items (none when fewer than two items)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_holdout = round(len(items) * fraction) if len(items) >= 2 else 0
    n_holdout = min(n_holdout, len(items) - 1) if items else 0
    holdout = [items[i] for i in order[:n_holdout]]
    train = [items[i] for i in order[n_holdout:]]
    return train, holdout


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int = 0,
              device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both (N, T)."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)
