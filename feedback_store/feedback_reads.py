"""Streamed reads of rated answers, and uniform samples of rows drawn by id in SQL.

Every read names its rows (an id range, the newest N, or a list of drawn ids) and goes through a
server-side cursor on PostgreSQL (`yield_per`), so that what a cycle holds is what it asked for,
whatever the size of the tables.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_store.identities import identity_column
from feedback_store.models import (
    Choice,
    Completion,
    Feedback,
    ImplicitFeedback,
    Prompt,
    Ranking,
    RankingItem,
)

BATCH = 1_000  # rows per fetch of a streamed read
IN_CHUNK = 500  # ids per IN (...) clause, well under every backend's parameter limit
SAMPLE_ROUNDS = 8  # draws of ids before a sample settles for what it found


@dataclass(frozen=True)
class Answer:
    choice_id: int
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Thumb:
    feedback_id: int
    prompt_id: int
    completion_id: str
    identity: str
    answer: Answer
    up: bool


@dataclass(frozen=True)
class Signal:
    """An implicit signal on an answer (feedback_store/implicit.py)."""

    signal_id: int
    prompt_id: int
    identity: str
    answer: Answer
    signal: str  # "regenerate", "edit" or "copy"


@dataclass(frozen=True)
class RankedRow:
    ranking_id: int
    prompt_id: int
    identity: str
    tier: int
    answer: Answer


def read_thumbs(s: Session, held: bool | None, where: sa.ColumnElement[bool],
                newest: int | None = None) -> list[Thumb]:
    """Thumbs matching `where` on the wanted side of the split; the `newest` N only, if given."""
    query = (
        sa.select(Feedback.id, Feedback.rating, Completion.prompt_id, Completion.id,
                  identity_column(Feedback), Choice.id, Choice.text, Choice.token_ids)
        .join(Choice, Choice.id == Feedback.choice_id)
        .join(Completion, Completion.id == Choice.completion_id)
        .where(where, Feedback.replaced_by.is_(None))  # a rater's later vote replaced it
    )
    if held is not None:
        query = query.join(Prompt, Prompt.id == Completion.prompt_id).where(
            Prompt.holdout == held)
    query = query.order_by(Feedback.id.desc() if newest is not None else Feedback.id)
    if newest is not None:
        query = query.limit(newest)
    thumbs = [
        Thumb(fid, pid, cid, identity, Answer(choice, text, token_ids), rating == "up")
        for fid, rating, pid, cid, identity, choice, text, token_ids in _stream(s, query)
    ]
    return sorted(thumbs, key=lambda t: t.feedback_id)


def read_implicit(s: Session, held: bool | None, where: sa.ColumnElement[bool],
                  newest: int | None = None) -> list[Signal]:
    """Implicit signals matching `where` on the wanted side of the split, but none on an answer
    its rater also gave a live thumb (the thumb says it better); the `newest` N only, if
    given."""
    rater = identity_column(ImplicitFeedback)
    thumbed = sa.exists().where(Feedback.choice_id == ImplicitFeedback.choice_id,
                                Feedback.replaced_by.is_(None),
                                identity_column(Feedback) == rater)
    query = (
        sa.select(ImplicitFeedback.id, ImplicitFeedback.signal, Completion.prompt_id, rater,
                  Choice.id, Choice.text, Choice.token_ids)
        .join(Choice, Choice.id == ImplicitFeedback.choice_id)
        .join(Completion, Completion.id == Choice.completion_id)
        .where(where, ~thumbed)
    )
    if held is not None:
        query = query.join(Prompt, Prompt.id == Completion.prompt_id).where(
            Prompt.holdout == held)
    query = query.order_by(ImplicitFeedback.id.desc() if newest is not None
                           else ImplicitFeedback.id)
    if newest is not None:
        query = query.limit(newest)
    signals = [
        Signal(sid, pid, identity, Answer(choice, text, token_ids), signal)
        for sid, signal, pid, identity, choice, text, token_ids in _stream(s, query)
    ]
    return sorted(signals, key=lambda x: x.signal_id)


def read_rankings(s: Session, held: bool | None, where: sa.ColumnElement[bool],
                  newest: int | None = None) -> list[list[RankedRow]]:
    """Live rankings (not replaced by a later one of the same voter) matching `where`, each as
    its rows best first; the `newest` N only, if given."""
    where = sa.and_(where, Ranking.replaced_by.is_(None))
    if newest is not None:  # pick the rankings first: LIMIT counts rankings, not their items
        ids = sa.select(Ranking.id).where(where)
        if held is not None:
            ids = ids.join(Prompt, Prompt.id == Ranking.prompt_id).where(Prompt.holdout == held)
        where = Ranking.id.in_(
            ids.order_by(Ranking.id.desc()).limit(newest).scalar_subquery())
    query = (
        sa.select(Ranking.id, Ranking.prompt_id, identity_column(Ranking), RankingItem.tier,
                  Choice.id, Choice.text, Choice.token_ids)
        .join(RankingItem, RankingItem.ranking_id == Ranking.id)
        .join(Choice, Choice.id == RankingItem.choice_id)
        .where(where)
        .order_by(Ranking.id, RankingItem.position)
    )
    if held is not None:
        query = query.join(Prompt, Prompt.id == Ranking.prompt_id).where(Prompt.holdout == held)
    rankings: dict[int, list[RankedRow]] = {}
    for rid, pid, identity, tier, choice, text, token_ids in _stream(s, query):
        rankings.setdefault(rid, []).append(
            RankedRow(rid, pid, identity, tier, Answer(choice, text, token_ids)))
    return list(rankings.values())


def rankings_of_choices(s: Session, choice_ids: Sequence[int]) -> dict[int, set[tuple[int, str]]]:
    """For each choice, the (ranking id, identity) of every stored ranking that ranks it."""
    found: dict[int, set[tuple[int, str]]] = {}
    wanted = sorted(set(choice_ids))
    for start in range(0, len(wanted), IN_CHUNK):
        query = (sa.select(RankingItem.choice_id, Ranking.id, identity_column(Ranking))
                 .join(Ranking, Ranking.id == RankingItem.ranking_id)
                 .where(RankingItem.choice_id.in_(wanted[start:start + IN_CHUNK]),
                        Ranking.replaced_by.is_(None)))
        for choice, rid, identity in _stream(s, query):
            found.setdefault(choice, set()).add((rid, identity))
    return found


def sample_by_id(read: Callable[[sa.ColumnElement[bool]], list[Any]], id_column: Any,
                 key: Callable[[Any], int], high: int, k: int, rng: random.Random) -> list[Any]:
    """Up to `k` of the rows `read` finds with ids in [1, `high`], uniformly at random.

    Small ranges are read whole; large ones by drawing ids at random and reading the rows they
    name (ids missing or on the other side of a filter find nothing), in a few rounds sized by
    the rate of hits so far. The work is O(k), however many rows there are. The same seed and
    data give the same sample.
    """
    if k <= 0 or high <= 0:
        return []
    if high <= 2 * k + IN_CHUNK:
        rows = read(sa.and_(id_column >= 1, id_column <= high))
        return rng.sample(rows, min(k, len(rows)))
    found: list[Any] = []
    tried: set[int] = set()
    rate = 1.0
    for _ in range(SAMPLE_ROUNDS):
        need = k - len(found)
        left = high - len(tried)
        if need <= 0 or left <= 0:
            break
        size = min(left, math.ceil(1.25 * need / max(rate, 0.02)) + 16)
        draw = [i for i in rng.sample(range(1, high + 1), min(high, size + len(tried)))
                if i not in tried][:size]
        tried.update(draw)
        hits = [row for start in range(0, len(draw), IN_CHUNK)
                for row in read(id_column.in_(draw[start:start + IN_CHUNK]))]
        position = {i: n for n, i in enumerate(draw)}
        hits.sort(key=lambda row: position[key(row)])  # in the order drawn
        found += hits[:need]
        rate = max(len(hits) / len(draw), 1.0 / len(draw)) if draw else rate
    return found


def _stream(s: Session, query: sa.Select[Any]) -> Iterator[sa.Row[Any]]:
    """Rows of `query` fetched BATCH at a time (a server-side cursor on PostgreSQL)."""
    result = s.execute(query.execution_options(yield_per=BATCH))
    for partition in result.partitions():
        yield from partition
