"""Reward-model losses: Bradley-Terry over ranked groups, logistic over lone thumbs.

Scores of a batch are one flat vector ``(N,)``: the answers of each group, best first, group after
group, described by ``group_sizes``. References: InstructGPT (arXiv 2203.02155, section 3.5:
all K-choose-2 pairs of one ranking as one batch element, loss scaled by 1/C(K,2)); TRL
``RewardTrainer.compute_loss`` and OpenRLHF ``PairWiseLoss`` for ``-logsigmoid(r_w - r_l)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Tiers = Sequence[Sequence[int] | None] | None  # per group: each answer's tier, None = strict


def group_pairs(group_sizes: Sequence[int], device: torch.device | str = "cpu",
                tiers: Tiers = None) -> tuple[Tensor, Tensor, Tensor]:
    """All (winner, loser) index pairs within each group, and the group of each pair.

    Answer ``i`` beats answer ``j`` when ``i`` comes first in its group, unless ``tiers`` puts
    them in the same tier: tied answers form no pair. Returns three (P,) long tensors:
    ``winners``, ``losers``, ``pair_group``.
    """
    winners: list[int] = []
    losers: list[int] = []
    pair_group: list[int] = []
    start = 0
    for g, size in enumerate(group_sizes):
        tier = _tiers_of(tiers, g, size)
        for i in range(size):
            for j in range(i + 1, size):
                if tier[i] != tier[j]:
                    winners.append(start + i)
                    losers.append(start + j)
                    pair_group.append(g)
        start += size

    def as_tensor(xs: list[int]) -> Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    return as_tensor(winners), as_tensor(losers), as_tensor(pair_group)


def count_pairs(group_sizes: Sequence[int], tiers: Tiers = None) -> int:
    """How many (winner, loser) pairs ``group_pairs`` finds, without building them."""
    total = 0
    for g, size in enumerate(group_sizes):
        tier = _tiers_of(tiers, g, size)
        total += sum(tier[i] != tier[j] for i in range(size) for j in range(i + 1, size))
    return total


def _tiers_of(tiers: Tiers, g: int, size: int) -> Sequence[int]:
    if tiers is None or tiers[g] is None:
        return range(size)
    if len(tiers[g]) != size:
        raise ValueError(f"group {g} has {size} answers but {len(tiers[g])} tiers")
    return tiers[g]


def bradley_terry_loss(scores: Tensor, group_sizes: Sequence[int], tiers: Tiers = None,
                       weights: Tensor | None = None) -> Tensor:
    """Mean over groups of the mean over each group's pairs of ``-logsigmoid(r_w - r_l)``.

    scores: (N,) best first within each group. Groups without pairs (one answer, or all tied)
    are ignored; with no pairs at all the loss is 0 (still differentiable). ``weights`` (G,)
    scale each group's term; the mean still divides by the number of groups, so down-weighted
    groups pull less, not the others more.
    """
    winners, losers, pair_group = group_pairs(group_sizes, scores.device, tiers)
    if winners.numel() == 0:
        return scores.sum() * 0.0
    pair_loss = -F.logsigmoid(scores[winners] - scores[losers])  # (P,)
    n_groups = len(group_sizes)
    group_sum = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    group_sum = group_sum.index_add(0, pair_group, pair_loss)  # (G,)
    group_count = torch.bincount(pair_group, minlength=n_groups).to(scores.dtype)  # (G,)
    has_pairs = group_count > 0
    group_loss = group_sum[has_pairs] / group_count[has_pairs]  # (G',)
    if weights is not None:
        group_loss = group_loss * weights.to(group_loss)[has_pairs]
    return group_loss.mean()


def pairwise_accuracy(scores: Tensor, group_sizes: Sequence[int],
                      tiers: Tiers = None) -> tuple[float, int]:
    """Share of pairs ranked the right way (equal scores count as wrong), and the number of
    pairs; answers tied by the raters form no pair."""
    winners, losers, _ = group_pairs(group_sizes, scores.device, tiers)
    if winners.numel() == 0:
        return 0.0, 0
    correct = (scores[winners] > scores[losers]).float()  # (P,)
    return correct.mean().item(), int(winners.numel())


def pointwise_logistic_loss(scores: Tensor, labels: Tensor,
                            weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of ``sigmoid(score)`` against thumbs up (1) / down (0), averaged
    (each term times its weight, when given).

    scores: (N,), labels: (N,), weights: (N,). With no examples the loss is 0. (Meta RLUF's
    ``P[Love]``-style pointwise RM; it anchors a score of 0 at even odds of a thumbs up.)
    """
    if scores.numel() == 0:
        return scores.sum() * 0.0
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype),
                                              weight=None if weights is None
                                              else weights.to(scores))
