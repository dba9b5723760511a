"""Feedback read for training: reward-model data (made into groups and examples by
`preference_groups.py`), TRL exports, PPO prompts.

A cycle reads a bounded window (`cycle_reward_data`, `holdout_reward_data`): the newest events
since the RM in service and uniform samples of older and held-out ones, drawn by id in SQL and
streamed, so that its time and memory do not grow with history. `reward_data` reads a whole
split, for exports, tests and small stores. Implicit signals join a cycle's window only when
asked (`implicit_weight` > 0, the setting `feedback.implicit_weight`), as weak lone thumbs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase
from feedback_store.feedback_reads import (
    IN_CHUNK,
    Answer,
    RankedRow,
    Signal,
    Thumb,
    rankings_of_choices,
    read_implicit,
    read_rankings,
    read_thumbs,
    sample_by_id,
)
from feedback_store.models import (
    RUN_FINISHED,
    Completion,
    Feedback,
    ImplicitFeedback,
    Prompt,
    Ranking,
    TrainingRun,
)
from feedback_store.preference_groups import (
    RatedAnswers,
    distinct_ranking,
    pair_thumbs,
    reward_data_of,
)
from feedback_store.types import (
    Marks,
    PromptRecord,
    RewardData,
)

HOLDOUT_PERCENT = 20  # share of prompts kept out of training, to evaluate candidates on
Split = Literal["train", "holdout", "all"]
_SPLITS: dict[str, bool | None] = {"train": False, "holdout": True, "all": None}
EXPLICIT = ("feedback", "rankings")  # the tables of thumbs and rankings, as Marks names them
NO_MARKS: Marks = {"feedback": 0, "rankings": 0, "implicit": 0}


class TrainingDataMixin(StoreBase):
    """Reads for the trainer worker and the export route."""

    def feedback_watermark(self) -> Marks:
        """The highest feedback, ranking and implicit-signal ids now stored; a run records what
        it consumed."""
        with self._tx(write=False) as s:
            return {
                "feedback": s.scalar(sa.select(sa.func.max(Feedback.id))) or 0,
                "rankings": s.scalar(sa.select(sa.func.max(Ranking.id))) or 0,
                "implicit": s.scalar(sa.select(sa.func.max(ImplicitFeedback.id))) or 0,
            }

    def new_feedback_count(self) -> int:
        """Thumbs plus rankings stored after the watermark of the newest finished run (implicit
        signals trigger no cycle)."""
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
        """Every ranking and up/down pair of a split as preference groups, unpaired thumbs as
        pointwise labels (all new, weight 1).

        `split` picks feedback by its prompt's stored `holdout` flag: "train" (the default) never
        includes held-out feedback, so the reward model cannot learn what later judges it.
        """
        held = _held(split)
        with self._tx(write=False) as s:
            data = _gather(s, read_thumbs(s, held, sa.true()), read_rankings(s, held, sa.true()),
                           tokens_only=True)
        return reward_data_of(data, NO_MARKS)

    def cycle_reward_data(self, *, since: Marks, until: Marks, new: int, replay: int,
                          seed: int, implicit_weight: float = 0.0) -> RewardData:
        """A cycle's training data, from the train split: the newest `new` events (thumbs and
        rankings, shared in proportion to how many of each arrived) with ids in (`since`,
        `until`], and a uniform sample of `replay` events with ids up to `since` (`new=False`).
        The work and memory are O(new + replay), whatever the size of history.

        With `implicit_weight` > 0, implicit signals share both budgets too (in proportion to
        their ids, as the others), each a lone thumb of that weight (`signal_examples`)."""
        rng = random.Random(seed)
        tables = (*EXPLICIT, "implicit") if implicit_weight > 0 else EXPLICIT
        old = {k: min(since.get(k, 0), until.get(k, 0)) for k in tables}
        fresh = _shares(new, {k: until.get(k, 0) - old[k] for k in tables})
        again = _shares(replay, old)
        with self._tx(write=False) as s:
            thumbs = read_thumbs(s, False, sa.and_(Feedback.id > old["feedback"],
                                                   Feedback.id <= until["feedback"]),
                                 newest=fresh["feedback"])
            rankings = read_rankings(s, False, sa.and_(Ranking.id > old["rankings"],
                                                       Ranking.id <= until["rankings"]),
                                     newest=fresh["rankings"])
            thumbs += _sample_thumbs(s, False, old["feedback"], again["feedback"], rng)
            rankings += _sample_rankings(s, False, old["rankings"], again["rankings"], rng)
            signals: list[Signal] = []
            if "implicit" in tables:
                signals = read_implicit(s, False, sa.and_(
                    ImplicitFeedback.id > old["implicit"],
                    ImplicitFeedback.id <= until.get("implicit", 0)), newest=fresh["implicit"])
                signals += sample_by_id(lambda where: read_implicit(s, False, where),
                                        ImplicitFeedback.id, lambda x: x.signal_id,
                                        old["implicit"], again["implicit"], rng)
            data = _gather(s, thumbs, rankings, tokens_only=True, signals=signals)
        return reward_data_of(data, {**NO_MARKS, **old}, implicit_weight)

    def holdout_reward_data(self, *, until: Marks, size: int, seed: int) -> RewardData:
        """A uniform sample of `size` held-out events with ids up to `until` (all of them when
        there are fewer): what the RM and the evidence check are judged on."""
        rng = random.Random(seed)
        share = _shares(size, {k: until.get(k, 0) for k in EXPLICIT})
        with self._tx(write=False) as s:
            thumbs = _sample_thumbs(s, True, until["feedback"], share["feedback"], rng)
            rankings = _sample_rankings(s, True, until["rankings"], share["rankings"], rng)
            data = _gather(s, thumbs, rankings, tokens_only=True)
        return reward_data_of(data, NO_MARKS)

    def export_preferences(self) -> Iterator[dict[str, Any]]:
        """TRL rows of all feedback: ranked and up/down pairs as prompt/chosen/rejected (none for
        tied answers or answers of equal text, nor for an up/down pair a ranking of the same
        answers by the same identity states), every thumb as prompt/completion/label. Read
        eagerly, so a database error raises here, not mid-stream."""
        with self._tx(write=False) as s:
            data = _gather(s, read_thumbs(s, None, sa.true()), read_rankings(s, None, sa.true()),
                           tokens_only=False)
        rows: list[dict[str, Any]] = []
        for ranking in data.rankings:
            prompt = data.prompts[ranking.prompt_id]
            rows += [_pair_row(prompt, better, worse) for better, worse in ranking.pairs()]
        pairs, _ = pair_thumbs(data.thumbs, data.ranked_choices)
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
        """Up to n distinct stored prompts drawn uniformly in SQL (by id, O(n) work), the same
        for the same seed and data, from the held-out split (`holdout=True`) or the training
        one; [] when that side is empty (never the other side: a gate must not judge on
        training prompts)."""
        with self._tx(write=False) as s:
            high = s.scalar(sa.select(sa.func.max(Prompt.id))) or 0

            def read(where: sa.ColumnElement[bool]) -> list[Prompt]:
                return list(s.scalars(sa.select(Prompt).where(where, Prompt.holdout == holdout)
                                      .order_by(Prompt.id)))

            rows = sample_by_id(read, Prompt.id, lambda p: p.id, high, max(n, 0),
                                random.Random(seed))
            return [
                PromptRecord(id=p.id, prompt_token_ids=list(p.prompt_token_ids),
                             prompt_text=p.prompt_text, messages=p.messages)
                for p in rows
            ]

    def holdout_prompt_count(self) -> int:
        """Stored prompts in the held-out split."""
        with self._tx(write=False) as s:
            return s.scalar(sa.select(sa.func.count()).where(Prompt.holdout == sa.true())) or 0


def _held(split: str) -> bool | None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, not {split!r}")
    return _SPLITS[split]


def _shares(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """`total` split between the tables in proportion to `sizes` (their id ranges): each
    table's share is the difference of the rounded cumulative ones, so they sum to `total`."""
    weight = sum(max(0, v) for v in sizes.values())
    if weight == 0:
        return dict.fromkeys(sizes, 0)
    shares, cumulative, given = {}, 0, 0
    for name in sorted(sizes):
        cumulative += max(0, sizes[name])
        upto = round(total * cumulative / weight)
        shares[name], given = upto - given, upto
    return shares


def _sample_thumbs(s: Session, held: bool, high: int, k: int, rng: random.Random) -> list[Thumb]:
    """About `k` thumbs with ids up to `high`: drawn one by one, then each with the other thumbs
    on its request (up to `high`), whole requests in the order drawn. Drawn alone, the up and
    the down a user gave one request's answers would rarely both be drawn, and their pair lost."""
    drawn = sample_by_id(lambda where: read_thumbs(s, held, where), Feedback.id,
                         lambda t: t.feedback_id, high, k, rng)
    requests = list(dict.fromkeys(t.completion_id for t in drawn))
    together: dict[str, list[Thumb]] = {}
    for start in range(0, len(requests), IN_CHUNK):
        where = sa.and_(Completion.id.in_(requests[start:start + IN_CHUNK]), Feedback.id <= high)
        for t in read_thumbs(s, held, where):
            together.setdefault(t.completion_id, []).append(t)
    thumbs: list[Thumb] = []
    for request in requests:
        if thumbs and len(thumbs) + len(together.get(request, [])) > k:
            break
        thumbs += together.get(request, [])
    return sorted(thumbs, key=lambda t: t.feedback_id)


def _sample_rankings(s: Session, held: bool, high: int, k: int, rng: random.Random
                     ) -> list[list[RankedRow]]:
    return sample_by_id(lambda where: read_rankings(s, held, where), Ranking.id,
                        lambda rows: rows[0].ranking_id, high, k, rng)


def _gather(s: Session, thumbs: list[Thumb], rankings: list[list[RankedRow]], *,
            tokens_only: bool, signals: list[Signal] | None = None) -> RatedAnswers:
    """The rankings (equal texts dropped), their prompts, and which rankings rank each thumb."""
    signals = signals or []
    kept = [r for rows in rankings if (r := distinct_ranking(rows)) is not None]
    ids = ({r.prompt_id for r in kept} | {t.prompt_id for t in thumbs}
           | {x.prompt_id for x in signals})
    prompts = _prompt_tokens(s, ids) if tokens_only else _prompts_by_id(s, ids)
    ranked = rankings_of_choices(s, [t.answer.choice_id for t in thumbs])
    return RatedAnswers(prompts=prompts, rankings=kept, thumbs=thumbs, ranked_choices=ranked,
                     signals=signals)


def is_holdout_hash(sha256: str) -> bool:
    """Whether a prompt (by the SHA-256 of its text) is in the held-out split: stable across
    processes, databases and re-imports, since it depends on the text alone."""
    return int(sha256[:16], 16) % 100 < HOLDOUT_PERCENT


def _prompts_by_id(s: Session, ids: Iterable[int]) -> dict[int, Prompt]:
    wanted = sorted(set(ids))
    found: dict[int, Prompt] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[start : start + IN_CHUNK]
        found.update((p.id, p) for p in s.scalars(sa.select(Prompt).where(Prompt.id.in_(chunk))))
    return found


def _prompt_tokens(s: Session, ids: Iterable[int]) -> dict[int, list[int]]:
    """Token ids of these prompts (their texts are not needed to train on)."""
    wanted = sorted(set(ids))
    found: dict[int, list[int]] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[start : start + IN_CHUNK]
        found.update(s.execute(sa.select(Prompt.id, Prompt.prompt_token_ids)
                               .where(Prompt.id.in_(chunk))).all())
    return found


def _trl_prompt(prompt: Prompt) -> Any:
    """TRL's conversational form (the message list) for chat prompts, else the text."""
    return prompt.messages if prompt.messages is not None else prompt.prompt_text


def _trl_answer(prompt: Prompt, answer: Answer) -> Any:
    if prompt.messages is not None:
        return [{"role": "assistant", "content": answer.text}]
    return answer.text


def _pair_row(prompt: Prompt, chosen: Answer, rejected: Answer) -> dict[str, Any]:
    return {
        "prompt": _trl_prompt(prompt),
        "chosen": _trl_answer(prompt, chosen),
        "rejected": _trl_answer(prompt, rejected),
    }
