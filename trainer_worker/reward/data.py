"""Reward training examples from the store's records: token sequences, pair counts, padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from feedback_store.types import PreferenceGroup, ThumbExample
from trainer_worker.reward.losses import count_pairs


@dataclass(frozen=True)
class Example:
    """One batch element: a ranked group (``label`` None) or a lone thumb (``label`` 0/1)."""

    sequences: list[list[int]]  # prompt + answer token ids; best first for a group
    label: float | None = None
    tiers: list[int] | None = None  # a group's tiers: equal tiers are tied (no pair)
    weight: float = 1.0  # loss weight (the rater's weight; class balance for lone thumbs)


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


class RewardDataLike(Protocol):
    groups: list[PreferenceGroup]
    thumbs: list[ThumbExample]


def group_example(group: PreferenceGroup, eos: Sequence[int], max_length: int) -> Example:
    seqs = [rm_sequence(group.prompt_token_ids, a, eos, max_length) for a in group.answers]
    return Example(sequences=seqs, tiers=list(group.tiers) if group.tiers is not None else None,
                   weight=group.weight)


def thumb_example(thumb: ThumbExample, eos: Sequence[int], max_length: int) -> Example:
    seq = rm_sequence(thumb.prompt_token_ids, thumb.answer_token_ids, eos, max_length)
    return Example(sequences=[seq], label=1.0 if thumb.label else 0.0, weight=thumb.weight)


def thumb_pairs(thumbs: Sequence[ThumbExample]) -> list[tuple[ThumbExample, ThumbExample]]:
    """Lone thumbs of one rater paired across prompts, each thumb once: (up, down) in the order
    given. For judging an RM on held-out feedback: it should score what a rater liked above
    what the same rater disliked, whatever the prompts (a rater's pairs on one prompt are
    groups already). A small group's held-out thumbs rarely meet on one prompt; these pairs
    let a few hundred ratings judge a reward model."""
    ups: dict[str, list[ThumbExample]] = {}
    downs: dict[str, list[ThumbExample]] = {}
    for thumb in thumbs:
        (ups if thumb.label else downs).setdefault(thumb.identity, []).append(thumb)
    return [pair for rater in sorted(ups.keys() & downs.keys())
            for pair in zip(ups[rater], downs[rater], strict=False)]


def thumb_pair_example(up: ThumbExample, down: ThumbExample, eos: Sequence[int],
                       max_length: int) -> Example:
    """A held-out pair across prompts as a two-answer group, the liked one first."""
    return Example(sequences=[
        rm_sequence(up.prompt_token_ids, up.answer_token_ids, eos, max_length),
        rm_sequence(down.prompt_token_ids, down.answer_token_ids, eos, max_length)])


def holdout_pairs(data: RewardDataLike) -> int:
    """Held-out pairs the RM is judged on: the groups' pairs and the lone thumbs' (thumb_pairs)."""
    return preference_pairs(data.groups) + len(thumb_pairs(data.thumbs))


def preference_pairs(groups: Sequence[PreferenceGroup]) -> int:
    """Pairs the groups hold: K-choose-2 per ranking less tied pairs, one per thumbs pair."""
    return count_pairs([len(g.answers) for g in groups], [g.tiers for g in groups])


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
