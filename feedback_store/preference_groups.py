"""How stored feedback becomes the reward model's examples: rankings with each text once,
thumbs paired into preferences (one up and one down by the same rater on the same prompt),
lone thumbs and implicit signals as weighted labels, balanced so that neither class dominates.
Pure functions over rows that `training_data.py` reads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from feedback_store.feedback_reads import Answer, RankedRow, Signal, Thumb
from feedback_store.implicit import signal_examples
from feedback_store.types import Marks, PreferenceGroup, RewardData, ThumbExample


@dataclass(frozen=True)
class DistinctRanking:
    """A stored ranking as it trains: each text once, tiers renumbered (`distinct_ranking`)."""

    ranking_id: int
    prompt_id: int
    identity: str
    answers: list[Answer]  # best first, no two with the same text
    tiers: list[int]  # of each answer: non-decreasing from 0, at least two distinct

    def pairs(self) -> Iterator[tuple[Answer, Answer]]:
        """(better, worse) for every two answers in different tiers, best first."""
        for i, better in enumerate(self.answers):
            for j in range(i + 1, len(self.answers)):
                if self.tiers[i] < self.tiers[j]:
                    yield better, self.answers[j]


@dataclass(frozen=True)
class RatedAnswers:
    """Rated answers read in one transaction, with the rankings that rank the paired thumbs."""

    prompts: dict[int, Any]  # id -> Prompt row, or its token ids only
    rankings: list[DistinctRanking]
    thumbs: list[Thumb]
    ranked_choices: dict[int, set[tuple[int, str]]]  # choice -> {(ranking id, identity)}
    signals: list[Signal] = field(default_factory=list)  # implicit ones, when trained on


def reward_data_of(data: RatedAnswers, old: Marks, implicit_weight: float = 0.0) -> RewardData:
    """Groups and lone thumbs (implicit signals last); `new` marks events with ids above
    `old`."""
    groups = [
        PreferenceGroup(
            prompt_token_ids=list(data.prompts[r.prompt_id]),
            answers=[list(a.token_ids) for a in r.answers],
            source="ranking",
            # None for a strict order, as PreferenceGroup defines it.
            tiers=None if len(set(r.tiers)) == len(r.tiers) else list(r.tiers),
            identity=r.identity,
            new=r.ranking_id > old["rankings"],
        )
        for r in data.rankings
    ]
    pairs, singles = pair_thumbs(data.thumbs, data.ranked_choices)
    groups += [
        PreferenceGroup(
            prompt_token_ids=list(data.prompts[up.prompt_id]),
            answers=[list(up.answer.token_ids), list(down.answer.token_ids)],
            source="thumbs",
            identity=up.identity,
            new=max(up.feedback_id, down.feedback_id) > old["feedback"],
        )
        for up, down in pairs
    ]
    thumbs = [
        ThumbExample(
            prompt_token_ids=list(data.prompts[t.prompt_id]),
            answer_token_ids=list(t.answer.token_ids),
            label=t.up,
            identity=t.identity,
            new=t.feedback_id > old["feedback"],
        )
        for t in singles
    ]
    thumbs += signal_examples(data.signals, data.prompts, old.get("implicit", 0),
                              implicit_weight)
    return RewardData(groups=groups, thumbs=thumbs)


def balance_thumbs(thumbs: list[ThumbExample]) -> list[ThumbExample]:
    """Lone thumbs weighted so that ups and downs weigh the same in total (each class
    n / (2 n_class)): a stream of mostly-up thumbs must not teach "everything is good".
    Thumbs and implicit signals are balanced each on their own, in that order (copies, by far
    the most common signal, must not outweigh the thumbs down)."""
    explicit = [t for t in thumbs if t.source == "thumbs"]
    implicit = [t for t in thumbs if t.source == "implicit"]
    return _balanced(explicit) + _balanced(implicit)


def _balanced(thumbs: list[ThumbExample]) -> list[ThumbExample]:
    ups = sum(t.label for t in thumbs)
    downs = len(thumbs) - ups
    if not ups or not downs:
        return thumbs
    scale = {True: len(thumbs) / (2 * ups), False: len(thumbs) / (2 * downs)}
    return [replace(t, weight=t.weight * scale[t.label]) for t in thumbs]


def distinct_ranking(rows: list[RankedRow]) -> DistinctRanking | None:
    """A stored ranking's rows (best first) with each text once; None without a pair.

    Of answers with the same text only the first (best placed) stays. Moving the later one into
    the first one's tier instead would invent preferences the user did not state (with A > B > A',
    A' would come to beat B); dropping it loses only pairs that restate a kept one or contradict
    it (B > A' against A > B). Tiers are renumbered 0, 1, ... over what is left.
    """
    seen: set[str] = set()
    kept: list[RankedRow] = []
    for row in rows:
        if row.answer.text not in seen:
            seen.add(row.answer.text)
            kept.append(row)
    dense = {tier: rank for rank, tier in enumerate(sorted({row.tier for row in kept}))}
    if len(dense) < 2:
        return None
    first = rows[0]
    return DistinctRanking(
        ranking_id=first.ranking_id,
        prompt_id=first.prompt_id,
        identity=first.identity,
        answers=[row.answer for row in kept],
        tiers=[dense[row.tier] for row in kept],
    )


def pair_thumbs(thumbs: list[Thumb], ranked: dict[int, set[tuple[int, str]]] | None = None
                ) -> tuple[list[tuple[Thumb, Thumb]], list[Thumb]]:
    """Pair each down with an unused up by the same identity on the same prompt and an answer of
    different text (equal texts teach nothing), one of the same request first; returns the
    (up, down) pairs and the thumbs left over, in feedback order.

    A pair whose two answers one ranking by the same identity also ranks (`ranked`: choice ->
    {(ranking id, identity)}) is that ranking's echo: it counts once, as the ranking, and its
    thumbs are neither a pair nor lone labels.
    """
    ranked = ranked or {}
    by_rater: dict[tuple[int, str], tuple[list[Thumb], list[Thumb]]] = defaultdict(
        lambda: ([], []))
    for t in thumbs:
        by_rater[(t.prompt_id, t.identity)][0 if t.up else 1].append(t)
    pairs: list[tuple[Thumb, Thumb]] = []
    singles: list[Thumb] = []
    for ups, downs in by_rater.values():
        for down in downs:
            options = [u for u in ups if u.answer.text != down.answer.text]
            up = next((u for u in options if u.completion_id == down.completion_id),
                      options[0] if options else None)
            if up is None:
                singles.append(down)
                continue
            ups.remove(up)
            common = ranked.get(up.answer.choice_id, set()) & ranked.get(down.answer.choice_id,
                                                                           set())
            if not any(identity == up.identity for _, identity in common):
                pairs.append((up, down))
        singles.extend(ups)
    return pairs, sorted(singles, key=lambda t: t.feedback_id)
