"""Rankings of answers to one prompt, best first, with tie groups; idempotent retries."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase, public_id, request_hash, storable, unix, utcnow
from feedback_store.errors import InvalidInputError
from feedback_store.feedback import _check_owner, _find_choice, _replayed, scoped_key
from feedback_store.models import Choice, Ranking, RankingItem
from feedback_store.types import Rater

T = TypeVar("T")
# A ranked answer (completion_id, choice_index), or a tie group of them.
RankedEntry = tuple[str, int] | Sequence[tuple[str, int]]


class RankingsMixin(StoreBase):
    """Writes of the ranking route."""

    def add_ranking(
        self,
        *,
        items: Sequence[RankedEntry],
        user: str | None = None,
        idempotency_key: str | None = None,
        idempotency_scope: str | None = None,
        rater: Rater | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store answers to one prompt ordered best first; returns (record, created).

        Each entry of `items` is an answer `(completion_id, choice_index)` or a list of equally
        good answers (a tie group): tied answers form no pair. A key is unique within its scope
        (the caller's API key, see `scoped_key`). `rater` as for `add_feedback`: every answer
        must have been served to its key (ForbiddenError otherwise).
        """
        key = scoped_key(idempotency_key, idempotency_scope)
        rater = rater or Rater(key_scope=idempotency_scope, user=user)
        user = storable(rater.user)
        tiers = _tie_groups(items)
        digest = request_hash({"items": _hashed_tiers(tiers), "user": user})

        def attempt(s: Session) -> tuple[dict[str, Any], bool]:
            if key is not None:
                previous = _replayed(s, Ranking, key, digest)
                if previous is not None:
                    return _ranking_record(s, previous), False
            found = [[_find_choice(s, cid, index) for cid, index in group] for group in tiers]
            for group in found:
                for completion, _ in group:
                    _check_owner(completion, rater.owner_scope)
            if len({completion.prompt_id for group in found for completion, _ in group}) > 1:
                raise InvalidInputError(
                    "Ranked answers must answer the same prompt",
                    param="items",
                    code="different_prompts",
                )
            row = Ranking(
                public_id=public_id("rk"),
                prompt_id=found[0][0][0].prompt_id,
                user=user,
                idempotency_key=key,
                request_hash=digest,
                created_at=utcnow(),
                identity=storable(rater.identity),
                key_scope=rater.key_scope,
                voter=storable(rater.voter),
            )
            s.add(row)
            s.flush()
            flat = [(tier, choice) for tier, group in enumerate(found) for _, choice in group]
            s.add_all(
                RankingItem(ranking_id=row.id, position=pos, tier=tier, choice_id=choice.id)
                for pos, (tier, choice) in enumerate(flat)
            )
            s.flush()
            _replace_earlier_rankings(s, row, [choice.id for _, choice in flat])
            return _ranking_record(s, row), True

        return self._idempotent(attempt, keyed=key is not None)

    def _idempotent(self, attempt: Callable[[Session], T], *, keyed: bool) -> T:
        """Run `attempt` in a transaction; losing a race on the idempotency key replays."""
        try:
            with self._tx() as s:
                return attempt(s)
        except exc.IntegrityError:
            if not keyed:
                raise
        with self._tx() as s:
            return attempt(s)


def _replace_earlier_rankings(s: Session, row: Ranking, choice_ids: list[int]) -> None:
    """One vote per voter per answer: a ranking replaces the same voter's live rankings that
    ranked any of its answers (kept as history, they train nothing). Rankings of other answers
    to the same prompt stay: they are other votes."""
    ranked_here = sa.select(RankingItem.ranking_id).where(RankingItem.choice_id.in_(choice_ids))
    s.execute(sa.update(Ranking).where(
        Ranking.prompt_id == row.prompt_id, Ranking.voter == row.voter,
        Ranking.replaced_by.is_(None), Ranking.id < row.id, Ranking.id.in_(ranked_here),
    ).values(replaced_by=row.id))


def _tie_groups(items: Sequence[RankedEntry]) -> list[list[tuple[str, int]]]:
    """The answers of a ranking request grouped by tier, best first, checked: every answer once,
    no empty tie group, at least 2 answers and 2 tiers (else there is no pair to learn from)."""
    tiers = [
        [(entry[0], int(entry[1]))] if entry and isinstance(entry[0], str)
        else [(str(cid), int(index)) for cid, index in entry]  # type: ignore[misc]
        for entry in items
    ]
    answers = [answer for group in tiers for answer in group]
    if any(not group for group in tiers):
        raise InvalidInputError(
            "A tie group lists at least one answer", param="items", code="empty_tie_group"
        )
    if len(answers) < 2:
        raise InvalidInputError(
            "A ranking needs at least 2 items", param="items", code="too_few_items"
        )
    if len(set(answers)) != len(answers):
        raise InvalidInputError(
            "A ranking lists each answer once", param="items", code="duplicate_items"
        )
    if len(tiers) < 2:
        raise InvalidInputError(
            "A ranking needs answers in at least 2 places: tied answers form no pair",
            param="items",
            code="all_tied",
        )
    return tiers


def _hashed_tiers(tiers: list[list[tuple[str, int]]]) -> list[Any]:
    """The request hash's view of the tiers: a lone answer as `[cid, index]` (as before ties
    existed, so untied retries keep their hash), a tie group as a list of those."""
    return [list(group[0]) if len(group) == 1 else [list(a) for a in group] for group in tiers]


def _ranking_record(s: Session, row: Ranking) -> dict[str, Any]:
    """The stored ranking; `items` best first, a tie group as a list of its answers."""
    items = s.execute(
        sa.select(RankingItem.tier, Choice.completion_id, Choice.index)
        .join(Choice, Choice.id == RankingItem.choice_id)
        .where(RankingItem.ranking_id == row.id)
        .order_by(RankingItem.position)
    ).all()
    entries: list[Any] = []
    for _, group in itertools.groupby(items, key=lambda item: item.tier):
        answers = [{"completion_id": cid, "choice_index": index} for _, cid, index in group]
        entries.append(answers[0] if len(answers) == 1 else answers)
    return {
        "id": row.public_id,
        "object": "ranking",
        "items": entries,
        "user": row.user,
        "created_at": unix(row.created_at),
    }
