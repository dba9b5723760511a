"""Feedback turned into training data: reward-model groups, TRL exports, PPO prompts."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

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

HOLDOUT_PERCENT = 20  # share of prompts kept out of PPO training, to evaluate candidates on
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
class _Feedback:
    """Everything rated, read in one transaction."""

    prompts: dict[int, Prompt]
    rankings: list[tuple[int, list[_Answer]]]  # (prompt id, answers best first)
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

    def reward_data(self) -> RewardData:
        """Rankings and up/down pairs as preference groups; unpaired thumbs as pointwise labels."""
        data = self._read_feedback()
        groups = [
            PreferenceGroup(
                prompt_token_ids=list(data.prompts[pid].prompt_token_ids),
                answers=[list(a.token_ids) for a in answers],
                source="ranking",
            )
            for pid, answers in data.rankings
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
        """TRL rows: ranked and up/down pairs as prompt/chosen/rejected, every thumb as
        prompt/completion/label. Read eagerly, so a database error raises here, not mid-stream."""
        data = self._read_feedback()
        rows: list[dict[str, Any]] = []
        for pid, answers in data.rankings:
            prompt = data.prompts[pid]
            for i, better in enumerate(answers):
                for worse in answers[i + 1 :]:
                    rows.append(_pair_row(prompt, better, worse))
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
        held-out ~20% (`holdout=True`) or the rest; from all prompts when that side is empty."""
        with self._tx(write=False) as s:
            ids = list(s.scalars(sa.select(Prompt.id).order_by(Prompt.id)))
            side = [i for i in ids if is_holdout(i) == holdout] or ids
            chosen = random.Random(seed).sample(side, min(max(n, 0), len(side)))
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

    def _read_feedback(self) -> _Feedback:
        with self._tx(write=False) as s:
            ranked = s.execute(
                sa.select(Ranking.id, Ranking.prompt_id, Choice.id, Choice.text, Choice.token_ids)
                .join(RankingItem, RankingItem.ranking_id == Ranking.id)
                .join(Choice, Choice.id == RankingItem.choice_id)
                .order_by(Ranking.id, RankingItem.position)
            ).all()
            rated = s.execute(
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
            ).all()
            prompts = _prompts_by_id(s, {r[1] for r in ranked} | {r[2] for r in rated})
        rankings: dict[int, tuple[int, list[_Answer]]] = {}
        for rid, pid, cid, text, token_ids in ranked:
            rankings.setdefault(rid, (pid, []))[1].append(_Answer(cid, text, token_ids))
        thumbs = [
            _Thumb(fid, pid, _Answer(cid, text, token_ids), rating == "up")
            for fid, rating, pid, cid, text, token_ids in rated
        ]
        return _Feedback(prompts=prompts, rankings=list(rankings.values()), thumbs=thumbs)


def pair_thumbs(thumbs: list[_Thumb]) -> tuple[list[tuple[_Thumb, _Thumb]], list[_Thumb]]:
    """Pair each down with an unused up on the same prompt and a different answer, in order;
    returns the (up, down) pairs and the thumbs left over, in feedback order."""
    by_prompt: dict[int, tuple[list[_Thumb], list[_Thumb]]] = defaultdict(lambda: ([], []))
    for t in thumbs:
        by_prompt[t.prompt_id][0 if t.up else 1].append(t)
    pairs: list[tuple[_Thumb, _Thumb]] = []
    singles: list[_Thumb] = []
    for ups, downs in by_prompt.values():
        for down in downs:
            up = next((u for u in ups if u.answer.token_ids != down.answer.token_ids), None)
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


def is_holdout(prompt_id: int) -> bool:
    """Whether a prompt belongs to the held-out set: a hash stable across processes and runs."""
    digest = hashlib.sha256(f"prompt:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HOLDOUT_PERCENT


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
