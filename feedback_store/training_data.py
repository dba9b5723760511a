"""Feedback turned into training data: reward-model groups, TRL exports, PPO prompts."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase
from feedback_store.models import (
    RUN_FINISHED,
    Choice,
    Completion,
    Feedback,
    Prompt,
    Ranking,
    RankingItem,
    TrainingRun,
)
from feedback_store.types import PreferenceGroup, PromptRecord, RewardData, ThumbExample

HOLDOUT_PERCENT = 20  # share of prompts kept out of training, to evaluate candidates on
Split = Literal["train", "holdout", "all"]
_SPLITS: dict[str, bool | None] = {"train": False, "holdout": True, "all": None}
_IN_CHUNK = 500  # ids per IN (...) clause, well under every backend's parameter limit


@dataclass(frozen=True)
class _Answer:
    choice_id: int
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class _Thumb:
    feedback_id: int
    prompt_id: int
    answer: _Answer
    up: bool


@dataclass(frozen=True)
class _Ranking:
    prompt_id: int
    answers: list[_Answer]  # best first, no two with the same text
    tiers: list[int]  # of each answer: non-decreasing from 0, at least two distinct

    def pairs(self) -> Iterator[tuple[_Answer, _Answer]]:
        """(better, worse) for every two answers in different tiers, best first."""
        for i, better in enumerate(self.answers):
            for j in range(i + 1, len(self.answers)):
                if self.tiers[i] < self.tiers[j]:
                    yield better, self.answers[j]


@dataclass(frozen=True)
class _Feedback:
    """Everything rated, read in one transaction."""

    prompts: dict[int, Prompt]
    rankings: list[_Ranking]
    thumbs: list[_Thumb]


class TrainingDataMixin(StoreBase):
    """Reads for the trainer worker and the export route."""

    def feedback_watermark(self) -> dict[str, int]:
        """The highest feedback and ranking ids now stored; a run records what it consumed."""
        with self._tx(write=False) as s:
            return {
                "feedback": s.scalar(sa.select(sa.func.max(Feedback.id))) or 0,
                "rankings": s.scalar(sa.select(sa.func.max(Ranking.id))) or 0,
            }

    def new_feedback_count(self) -> int:
        """Thumbs plus rankings stored after the watermark of the newest finished run."""
        with self._tx(write=False) as s:
            mark = s.execute(
                sa.select(TrainingRun.feedback_watermark, TrainingRun.rankings_watermark)
                .where(
                    TrainingRun.status.in_(RUN_FINISHED),
                    TrainingRun.feedback_watermark.is_not(None),
                )
                .order_by(TrainingRun.id.desc())
                .limit(1)
            ).first()
            after_feedback, after_rankings = (mark[0] or 0, mark[1] or 0) if mark else (0, 0)
            thumbs = s.scalar(sa.select(sa.func.count()).where(Feedback.id > after_feedback))
            rankings = s.scalar(sa.select(sa.func.count()).where(Ranking.id > after_rankings))
        return (thumbs or 0) + (rankings or 0)

    def reward_data(self, split: Split = "train") -> RewardData:
        """Rankings and up/down pairs as preference groups; unpaired thumbs as pointwise labels.

        `split` picks feedback by its prompt's stored `holdout` flag: "train" (the default) never
        includes held-out feedback, so the reward model cannot learn what later judges it.
        """
        data = self._read_feedback(split)
        groups = [
            PreferenceGroup(
                prompt_token_ids=list(data.prompts[r.prompt_id].prompt_token_ids),
                answers=[list(a.token_ids) for a in r.answers],
                source="ranking",
                # None for a strict order, as PreferenceGroup defines it.
                tiers=None if len(set(r.tiers)) == len(r.tiers) else list(r.tiers),
            )
            for r in data.rankings
        ]
        pairs, singles = pair_thumbs(data.thumbs)
        groups += [
            PreferenceGroup(
                prompt_token_ids=list(data.prompts[up.prompt_id].prompt_token_ids),
                answers=[list(up.answer.token_ids), list(down.answer.token_ids)],
                source="thumbs",
            )
            for up, down in pairs
        ]
        thumbs = [
            ThumbExample(
                prompt_token_ids=list(data.prompts[t.prompt_id].prompt_token_ids),
                answer_token_ids=list(t.answer.token_ids),
                label=t.up,
            )
            for t in singles
        ]
        return RewardData(groups=groups, thumbs=thumbs)

    def export_preferences(self) -> Iterator[dict[str, Any]]:
        """TRL rows of all feedback: ranked and up/down pairs as prompt/chosen/rejected (none for
        tied answers or answers of equal text), every thumb as prompt/completion/label. Read
        eagerly, so a database error raises here, not mid-stream."""
        data = self._read_feedback("all")
        rows: list[dict[str, Any]] = []
        for ranking in data.rankings:
            prompt = data.prompts[ranking.prompt_id]
            rows += [_pair_row(prompt, better, worse) for better, worse in ranking.pairs()]
        pairs, _ = pair_thumbs(data.thumbs)
        rows += [
            _pair_row(data.prompts[up.prompt_id], up.answer, down.answer) for up, down in pairs
        ]
        for t in data.thumbs:
            prompt = data.prompts[t.prompt_id]
            rows.append(
                {
                    "prompt": _trl_prompt(prompt),
                    "completion": _trl_answer(prompt, t.answer),
                    "label": t.up,
                }
            )
        return iter(rows)

    def sample_prompts(self, n: int, *, seed: int, holdout: bool = False) -> list[PromptRecord]:
        """Up to n distinct stored prompts, the same for the same seed and data, from the
        held-out split (`holdout=True`) or the training one; [] when that side is empty (never
        the other side: a gate must not judge on training prompts)."""
        with self._tx(write=False) as s:
            ids = list(
                s.scalars(sa.select(Prompt.id).where(Prompt.holdout == holdout).order_by(Prompt.id))
            )
            chosen = random.Random(seed).sample(ids, min(max(n, 0), len(ids)))
            rows = _prompts_by_id(s, chosen)
        return [
            PromptRecord(
                id=i,
                prompt_token_ids=list(rows[i].prompt_token_ids),
                prompt_text=rows[i].prompt_text,
                messages=rows[i].messages,
            )
            for i in chosen
        ]

    def holdout_prompt_count(self) -> int:
        """Stored prompts in the held-out split."""
        with self._tx(write=False) as s:
            return s.scalar(sa.select(sa.func.count()).where(Prompt.holdout == sa.true())) or 0

    def _read_feedback(self, split: Split) -> _Feedback:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, not {split!r}")
        held = _SPLITS[split]
        ranked_query = (
            sa.select(
                Ranking.id, Ranking.prompt_id, RankingItem.tier, Choice.id, Choice.text,
                Choice.token_ids,
            )
            .join(RankingItem, RankingItem.ranking_id == Ranking.id)
            .join(Choice, Choice.id == RankingItem.choice_id)
            .order_by(Ranking.id, RankingItem.position)
        )
        rated_query = (
            sa.select(
                Feedback.id,
                Feedback.rating,
                Completion.prompt_id,
                Choice.id,
                Choice.text,
                Choice.token_ids,
            )
            .join(Choice, Choice.id == Feedback.choice_id)
            .join(Completion, Completion.id == Choice.completion_id)
            .order_by(Feedback.id)
        )
        if held is not None:
            ranked_query = ranked_query.join(Prompt, Prompt.id == Ranking.prompt_id).where(
                Prompt.holdout == held
            )
            rated_query = rated_query.join(Prompt, Prompt.id == Completion.prompt_id).where(
                Prompt.holdout == held
            )
        with self._tx(write=False) as s:
            ranked = s.execute(ranked_query).all()
            rated = s.execute(rated_query).all()
            prompts = _prompts_by_id(s, {r[1] for r in ranked} | {r[2] for r in rated})
        stored: dict[int, tuple[int, list[tuple[int, _Answer]]]] = {}
        for rid, pid, tier, cid, text, token_ids in ranked:
            stored.setdefault(rid, (pid, []))[1].append((tier, _Answer(cid, text, token_ids)))
        rankings = [
            ranking
            for pid, items in stored.values()
            if (ranking := _distinct_ranking(pid, items)) is not None
        ]
        thumbs = [
            _Thumb(fid, pid, _Answer(cid, text, token_ids), rating == "up")
            for fid, rating, pid, cid, text, token_ids in rated
        ]
        return _Feedback(prompts=prompts, rankings=rankings, thumbs=thumbs)


def _distinct_ranking(prompt_id: int, items: list[tuple[int, _Answer]]) -> _Ranking | None:
    """A stored ranking (tier, answer) best first, with each text once; None without a pair.

    Of answers with the same text only the first (best placed) stays. Moving the later one into
    the first one's tier instead would invent preferences the user did not state (with A > B > A',
    A' would come to beat B); dropping it loses only pairs that restate a kept one or contradict
    it (B > A' against A > B). Tiers are renumbered 0, 1, ... over what is left.
    """
    seen: set[str] = set()
    kept: list[tuple[int, _Answer]] = []
    for tier, answer in items:
        if answer.text not in seen:
            seen.add(answer.text)
            kept.append((tier, answer))
    dense = {tier: rank for rank, tier in enumerate(sorted({tier for tier, _ in kept}))}
    if len(dense) < 2:
        return None
    return _Ranking(
        prompt_id=prompt_id,
        answers=[answer for _, answer in kept],
        tiers=[dense[tier] for tier, _ in kept],
    )


def pair_thumbs(thumbs: list[_Thumb]) -> tuple[list[tuple[_Thumb, _Thumb]], list[_Thumb]]:
    """Pair each down with an unused up on the same prompt and an answer of different text, in
    order (equal texts teach nothing and are no export row); returns the (up, down) pairs and
    the thumbs left over, in feedback order."""
    by_prompt: dict[int, tuple[list[_Thumb], list[_Thumb]]] = defaultdict(lambda: ([], []))
    for t in thumbs:
        by_prompt[t.prompt_id][0 if t.up else 1].append(t)
    pairs: list[tuple[_Thumb, _Thumb]] = []
    singles: list[_Thumb] = []
    for ups, downs in by_prompt.values():
        for down in downs:
            up = next((u for u in ups if u.answer.text != down.answer.text), None)
            if up is None:
                singles.append(down)
            else:
                ups.remove(up)
                pairs.append((up, down))
        singles.extend(ups)
    return pairs, sorted(singles, key=lambda t: t.feedback_id)


def is_holdout_hash(sha256: str) -> bool:
    """Whether a prompt (by the SHA-256 of its text) is in the held-out split: stable across
    processes, databases and re-imports, since it depends on the text alone."""
    return int(sha256[:16], 16) % 100 < HOLDOUT_PERCENT


def _prompts_by_id(s: Session, ids: Iterable[int]) -> dict[int, Prompt]:
    wanted = sorted(set(ids))
    found: dict[int, Prompt] = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        found.update((p.id, p) for p in s.scalars(sa.select(Prompt).where(Prompt.id.in_(chunk))))
    return found


def _trl_prompt(prompt: Prompt) -> Any:
    """TRL's conversational form (the message list) for chat prompts, else the text."""
    return prompt.messages if prompt.messages is not None else prompt.prompt_text


def _trl_answer(prompt: Prompt, answer: _Answer) -> Any:
    if prompt.messages is not None:
        return [{"role": "assistant", "content": answer.text}]
    return answer.text


def _pair_row(prompt: Prompt, chosen: _Answer, rejected: _Answer) -> dict[str, Any]:
    return {
        "prompt": _trl_prompt(prompt),
        "chosen": _trl_answer(prompt, chosen),
        "rejected": _trl_answer(prompt, rejected),
    }
