"""Who gave each piece of feedback, and how much a rater's feedback weighs in training.

A rater is the pair (API key, `user`) (`feedback_store.types.Rater`): every row stores its key's
scope, its `user` and the identity that caps, weights and pooling count as one rater, written
with the row. Rows stored before that carry `user` alone ("user:<user>") or their key's scope
("key:<scope>"); `identity_column` derives the identity of every row in SQL.

A rater's weight follows its agreement with the reward model in service on the feedback it gave
since (`agreement_weight`): the trainer scores each new event once, before training on it.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from feedback_store.base import StoreBase, unix, utcnow
from feedback_store.models import Feedback, Identity, ImplicitFeedback, Ranking
from feedback_store.types import (
    ANONYMOUS,
    Marks,
    PreferenceGroup,
    Rater,
    RewardData,
    ThumbExample,
)
from flywheel.approval import wilson_interval
from flywheel.rater_pooling import capped_masses

log = logging.getLogger(__name__)

CHANCE = 0.5  # agreement of a rater who ignores the answers


def identity_of(user: str | None, key_scope: str | None, *, trusted: bool = False) -> str:
    """The identity of a request's rater (`Rater.identity`)."""
    return Rater(key_scope=key_scope, user=user, trusted=trusted).identity


def identity_column(model: type[Feedback] | type[Ranking] | type[ImplicitFeedback]
                    ) -> sa.ColumnElement[str]:
    """The stored identity of a row; for rows stored before identities were written with every
    row, `user`'s ('user:' || NULL is NULL on both backends), else anonymous."""
    return sa.func.coalesce(model.identity, sa.literal("user:") + model.user,
                            sa.literal(ANONYMOUS))


def agreement_weight(scored: int, agreed: int, disagreeing_weight: float) -> float:
    """1, unless the rater agrees with the RM in service significantly less often than chance
    (the upper end of the Wilson 95% interval of its agreement rate is below 0.5): then
    `disagreeing_weight`.

    With an RM of held-out accuracy a > 0.5, a rater who inverts a share q of its ratings agrees
    at a - q(2a - 1); keeping full weight needs that rate to stay near 0.5 or above, i.e. q <= 1/2:
    at least as many honest ratings as inverted ones, whose effects on the RM then cancel.
    """
    interval = wilson_interval(agreed, scored)
    if interval is None or interval[1] >= CHANCE:
        return 1.0
    return disagreeing_weight


@dataclass(frozen=True)
class Tally:
    """What one cycle learned about one identity's new feedback (or an identity's totals)."""

    events: int = 0  # new events read
    scored: int = 0  # pairs and thumbs the RM in service judged
    agreed: int = 0  # of those, where the RM agreed with the rater

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.events + other.events, self.scored + other.scored,
                     self.agreed + other.agreed)


def limit_identities(data: RewardData, share: float, weights: Mapping[str, float],
                     seed: int, *, equal: bool = False) -> tuple[RewardData, dict[str, float]]:
    """Each identity's examples (groups and lone thumbs, each its weight as it comes: 1, or
    `feedback.implicit_weight` for an implicit signal) cut to its cap
    (`flywheel.rater_pooling.capped_masses`, `equal` shares if asked: new ones kept first, thumbs
    and rankings before implicit signals, then at random) and weighted by its weight; returns
    them and metrics. Anonymous examples are one rater, like any other."""
    items: list[PreferenceGroup | ThumbExample] = [*data.groups, *data.thumbs]
    counts: dict[str, float] = defaultdict(float)
    for item in items:
        counts[item.identity] += item.weight
    caps = capped_masses(counts, share, equal=equal)
    rng = random.Random(seed)
    order = sorted(range(len(items)),
                   key=lambda i: (not items[i].new, _implicit(items[i]), rng.random()))
    kept, taken = set(), defaultdict[str, float](float)
    for i in order:
        if taken[items[i].identity] + items[i].weight <= caps[items[i].identity] + 1e-9:
            taken[items[i].identity] += items[i].weight
            kept.add(i)

    def weighted(item: Any) -> Any:
        return replace(item, weight=item.weight * weights.get(item.identity, 1.0))

    groups = [weighted(g) for i, g in enumerate(data.groups) if i in kept]
    offset = len(data.groups)
    thumbs = [weighted(t) for i, t in enumerate(data.thumbs) if i + offset in kept]
    metrics = {
        "reward/identities": float(len(counts)),
        "reward/identity_cap": float(int(max(caps.values(), default=0) + 1e-9)),
        "reward/capped_examples": float(len(items) - len(kept)),
        "reward/kept_examples": float(len(kept)),
        "reward/down_weighted_identities": float(
            sum(weights.get(name, 1.0) < 1.0 for name in counts)),
    }
    return RewardData(groups=groups, thumbs=thumbs), metrics


def _implicit(item: PreferenceGroup | ThumbExample) -> bool:
    return isinstance(item, ThumbExample) and item.source == "implicit"


class IdentitiesMixin(StoreBase):
    """Identity on the write path; agreement tallies and weights for the trainer and the admin."""

    def identity_standing(self, identities: Iterable[str]) -> dict[str, Tally]:
        """Stored totals of these identities; zero for those never read."""
        wanted = sorted(set(identities))
        found = dict.fromkeys(wanted, Tally())
        with self._tx(write=False) as s:
            for start in range(0, len(wanted), 500):
                for row in s.scalars(sa.select(Identity).where(
                        Identity.identity.in_(wanted[start:start + 500]))):
                    found[row.identity] = Tally(row.events, row.scored, row.agreed)
        return found

    def rater_count(self, until: Marks, at_most: int) -> int:
        """Distinct raters (not anonymous) of the thumbs and rankings up to ``until``'s ids,
        counted up to ``at_most``: how many a reward model trained on them could stand for.

        One row at a time, each of a rater not found yet: a scan that stops at the first row of
        a new rater, where ``SELECT DISTINCT ... LIMIT`` reads every row up to the mark first
        (PostgreSQL 15: 0.5 s at two million rows, against under a millisecond), each cycle and
        review. A query reads past the rows of the raters found before it (at most ``at_most``
        scans a table); with fewer raters than ``at_most`` the last reads to the mark."""
        found: list[str] = []
        with self._tx(write=False) as s:
            for model, table in ((Feedback, "feedback"), (Ranking, "rankings")):
                identity = identity_column(model)
                while len(found) < at_most:
                    rater = s.scalars(
                        sa.select(identity).where(model.id <= until.get(table, 0),
                                                  identity.not_in([ANONYMOUS, *found]))
                        .limit(1)).first()
                    if rater is None:
                        break
                    found.append(rater)
        return len(found)

    def weights_with(self, tallies: Mapping[str, Tally], identities: Iterable[str],
                     disagreeing_weight: float) -> dict[str, float]:
        """The weights these identities would have with `tallies` added to their stored
        totals (`agreement_weight`); nothing is stored."""
        wanted = set(identities)
        standing = self.identity_standing(wanted)
        weights = {}
        for name in wanted:
            total = standing[name] + tallies.get(name, Tally())
            weights[name] = agreement_weight(total.scored, total.agreed, disagreeing_weight)
        return weights

    def identity_weights(self, identities: Iterable[str]) -> dict[str, float]:
        """Stored weights of these identities; 1 for those never scored."""
        wanted = sorted(set(identities))
        weights = dict.fromkeys(wanted, 1.0)
        with self._tx(write=False) as s:
            for start in range(0, len(wanted), 500):
                rows = s.execute(sa.select(Identity.identity, Identity.weight)
                                 .where(Identity.identity.in_(wanted[start:start + 500])))
                weights.update(rows.all())
        return weights

    def record_tallies(self, tallies: Mapping[str, Tally], disagreeing_weight: float
                       ) -> dict[str, float]:
        """Add one cycle's tallies to each identity's totals and recompute its weight (one
        transaction); returns the new weights."""
        now, weights = utcnow(), {}
        names = sorted(tallies)
        with self._tx() as s:
            stored = {row.identity: row for start in range(0, len(names), 500)
                      for row in s.scalars(sa.select(Identity).where(
                          Identity.identity.in_(names[start:start + 500]))
                          .order_by(Identity.identity).with_for_update())}
            for name in names:
                tally = tallies[name]
                row = stored.get(name)
                if row is None:
                    row = Identity(identity=name, events=0, scored=0, agreed=0, weight=1.0)
                    s.add(row)
                row.events += tally.events
                row.scored += tally.scored
                row.agreed += tally.agreed
                row.weight = agreement_weight(row.scored, row.agreed, disagreeing_weight)
                row.updated_at = now
                weights[name] = row.weight
        return weights

    def list_identities(self, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Identities the trainer has read, the least trusted first, then the most active."""
        with self._tx(write=False) as s:
            rows = s.scalars(sa.select(Identity).order_by(
                Identity.weight, Identity.events.desc(), Identity.identity,
            ).limit(max(0, limit)).offset(max(0, offset)))
            return [_identity_record(row) for row in rows]


def _identity_record(row: Identity) -> dict[str, Any]:
    interval = wilson_interval(row.agreed, row.scored)
    return {
        "object": "identity",
        "identity": row.identity,
        "weight": row.weight,
        "events": row.events,
        "scored": row.scored,
        "agreed": row.agreed,
        "agreement": row.agreed / row.scored if row.scored else None,
        "agreement_interval": list(interval) if interval is not None else None,
        "updated_at": unix(row.updated_at),
    }
