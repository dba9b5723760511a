"""The rollout's records: the serving state (active and canary), the canary's lifecycle and
evidence, and the live thumbs counters per version."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from feedback_store.base import StoreBase
from feedback_store.errors import ConflictError, InvalidInputError, NotFoundError
from feedback_store.identities import identity_column
from feedback_store.models import (
    Choice,
    Completion,
    Feedback,
    PolicyRatings,
    PolicyVersion,
    answer_version,
)
from feedback_store.policy_versions import (
    _begin_canary,
    _check_servable,
    _leave_candidacy,
    _policy_record,
)
from feedback_store.types import PooledLive, RaterThumbs
from flywheel.rater_pooling import Clustered, PairedThumbs, Shared, canary_unit

_Found = TypeVar("_Found")  # what a reader finds among a canary's thumbs
RECENT_THUMBS = 2_000  # the thumbs whose raters decide a canary's unit ("auto")


class RolloutMixin(StoreBase):
    """What the servers serve and what users think of it."""

    def serving_state(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(active, canary) rows, read in one transaction."""
        with self._tx(write=False) as s:
            rows = s.scalars(
                sa.select(PolicyVersion).where(PolicyVersion.status.in_(("active", "canary")))
            ).all()
            by_status = {r.status: _policy_record(r) for r in rows}
        return by_status.get("active"), by_status.get("canary")

    def start_canary(self, id: str, fraction: float, *, force: bool = False,
                     unit: str = "user") -> dict[str, Any]:
        """Serve stored version `id` to `fraction` of new requests beside the active one,
        assigned per `unit` ("request": each rater sees both arms; "user": sticky per rater).

        Its live evidence counts feedback stored from now on, on answers produced from now on.
        """
        if not 0.0 < fraction < 1.0:
            raise InvalidInputError("fraction must lie strictly between 0 and 1",
                                    param="fraction", code="invalid_fraction")
        with self._tx() as s:
            # Locked in id order, as every activation does: two writers never deadlock.
            rows = {p.id: p for p in s.scalars(
                sa.select(PolicyVersion).order_by(PolicyVersion.id).with_for_update())}
            target = rows.get(id)
            if target is None:
                raise NotFoundError(f"No policy version '{id}'", code="policy_not_found")
            running = next((r for r in rows.values() if r.status == "canary"), None)
            if running is not None:
                raise ConflictError(f"Policy '{running.id}' is on canary already; end it first",
                                    param="id", code="canary_running")
            if target.status == "active":
                raise ConflictError(f"Policy '{id}' is already active", param="id",
                                    code="policy_active")
            _check_servable(target, force=force)
            _begin_canary(s, target, fraction, unit)
            s.flush()
            return _policy_record(target)

    def end_canary(self, status: str, metrics: dict[str, Any] | None = None,
                   *, id: str | None = None) -> dict[str, Any]:
        """End the running canary (of version `id`, when given) with a new status
        ("rejected", or "candidate" when aborted or out of time) and its evidence merged into
        `metrics`. NotFoundError when no canary runs (or another one does): the operator's call;
        the worker ends canaries with `end_canary_if`, which never raises on a lost race."""
        if status not in ("rejected", "candidate", "retired"):
            raise InvalidInputError("a canary ends as rejected, candidate or retired",
                                    param="status")
        with self._tx() as s:
            row = s.scalar(sa.select(PolicyVersion).where(PolicyVersion.status == "canary")
                           .with_for_update())
            if row is None or (id is not None and row.id != id):
                raise NotFoundError("No canary is running" if row is None else
                                    f"Policy '{id}' is not on canary ('{row.id}' is)",
                                    code="no_canary")
            _leave_candidacy(row)
            row.status = status
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            s.flush()
            return _policy_record(row)

    def live_ratings(self) -> dict[str, tuple[int, int]]:
        """Thumbs (up, down) on the answers of each version, from the maintained counters."""
        with self._tx(write=False) as s:
            return {v: (up, down) for v, up, down in s.execute(
                sa.select(PolicyRatings.policy_version, PolicyRatings.up, PolicyRatings.down))}

    def pooled_live(self) -> dict[str, PooledLive]:
        """Each version's thumbs pooled across raters, as `record_pooled_live` last stored them
        (versions never pooled are absent)."""
        with self._tx(write=False) as s:
            rows = s.execute(sa.select(
                PolicyRatings.policy_version, PolicyRatings.pooled_up, PolicyRatings.pooled_down,
                PolicyRatings.pooled_variance, PolicyRatings.raters, PolicyRatings.pooled_at,
            ).where(PolicyRatings.pooled_at.is_not(None)))
            return {version: PooledLive(float(up or 0.0), float(down or 0.0),
                                        float(variance or 0.0), int(raters or 0),
                                        at.timestamp())
                    for version, up, down, variance, raters, at in rows}

    def record_pooled_live(self, pooled: Mapping[str, PooledLive]) -> None:
        """Store these versions' pooled thumbs (one transaction; the counters are untouched)."""
        with self._tx() as s:
            for version, live in sorted(pooled.items()):
                row = s.get(PolicyRatings, version, with_for_update=True)
                if row is None:
                    row = PolicyRatings(policy_version=version, up=0, down=0)
                    s.add(row)
                row.pooled_up, row.pooled_down = live.up, live.down
                row.pooled_variance, row.raters = live.variance, live.raters
                row.pooled_at = datetime.fromtimestamp(live.at, timezone.utc)

    def canary_evidence(self) -> dict[str, RaterThumbs] | None:
        """Thumbs per arm and rater during the running canary: feedback stored since it began,
        on answers produced since it began, by the active version or the canary, as
        {version: {identity: (up, down)}}. A bounded range scan of the feedback primary key;
        None when no canary runs."""
        found = self._during_canary(_thumbs_by_rater)
        return None if found is None else {v: found[1].get(v, {}) for v in found[0]}

    def canary_requests(self) -> PairedThumbs | None:
        """The same thumbs as `canary_evidence`, summed request by request (for a canary
        compared within raters: a request's answers are alike, their thumbs not independent),
        with the sums of requests answered by both arms; None when no canary runs."""
        found = self._during_canary(_paired_by_rater)
        return None if found is None else found[1]

    def _during_canary(self, read: Callable[..., _Found]) -> tuple[tuple[str, str], _Found] | None:
        """(active, canary) and what `read` finds among the thumbs counted for the running
        canary, or None when none runs."""
        active, canary = self.serving_state()
        if canary is None or active is None:
            return None
        arms = (active["id"], canary["id"])
        with self._tx(write=False) as s:
            row = s.get(PolicyVersion, canary["id"])
            assert row is not None
            return arms, read(s, arms, Feedback.id > (row.canary_feedback_after or 0),
                              Completion.created_at >= row.canary_started_at)

    def thumbs_by_rater(self, versions: Iterable[str]) -> dict[str, RaterThumbs]:
        """All thumbs on the answers of these versions, as {version: {identity: (up, down)}}.
        A scan of their completions: for confirming a decision, not for every poll."""
        wanted = tuple(sorted(set(versions)))
        with self._tx(write=False) as s:
            found = _thumbs_by_rater(s, wanted)
        return {v: found.get(v, {}) for v in wanted}


    def recent_raters(self, thumbs: int = RECENT_THUMBS) -> int:
        """Distinct raters among the newest `thumbs` live thumbs."""
        with self._tx(write=False) as s:
            newest = (sa.select(identity_column(Feedback).label("identity"))
                      .where(Feedback.replaced_by.is_(None))
                      .order_by(Feedback.id.desc()).limit(thumbs).subquery())
            return int(s.scalar(sa.select(sa.func.count(sa.distinct(newest.c.identity)))) or 0)

    def canary_unit(self, setting: str, sticky_raters: int) -> str:
        """What a canary starting now assigns to an arm (`flywheel.rater_pooling.canary_unit`,
        with the raters of the newest thumbs)."""
        raters = self.recent_raters() if setting == "auto" else 0
        return canary_unit(setting, raters, sticky_raters)

    def note_canary(self, id: str, metrics: dict[str, Any]) -> bool:
        """Merge `metrics` into version `id`'s while it is on canary (e.g. why it waits);
        returns whether it was."""
        with self._tx() as s:
            row = s.scalar(sa.select(PolicyVersion).where(PolicyVersion.id == id,
                                                          PolicyVersion.status == "canary")
                           .with_for_update())
            if row is None:
                return False
            row.metrics = {**row.metrics, **metrics}
            return True


def _paired_by_rater(s: Session, arms: tuple[str, str], *where: sa.ColumnElement[bool]
                     ) -> PairedThumbs:
    """Per identity of the rater, its thumbs on each arm (active, canary) summed per request
    (completion) into `Clustered`'s sums, and over the requests both arms answered into
    `Shared`'s, over feedback matching `where` (which may name `Completion`): one grouping per
    request, then one per rater, in the database."""
    rater = identity_column(Feedback).label("rater")
    up = Feedback.rating == "up"

    def arm(version: str, *, up_only: bool = False) -> sa.ColumnElement[int]:
        on = sa.and_(answer_version == version, up) if up_only else answer_version == version
        return sa.func.sum(sa.case((on, 1), else_=0))

    active, canary = arms
    per_request = (
        sa.select(rater, arm(active, up_only=True).label("ua"), arm(active).label("na"),
                  arm(canary, up_only=True).label("uc"), arm(canary).label("nc"))
        .select_from(Feedback)
        .join(Choice, Choice.id == Feedback.choice_id)
        .join(Completion, Completion.id == Choice.completion_id)
        .where(answer_version.in_(arms), Feedback.replaced_by.is_(None), *where)
        .group_by(rater, Completion.id)
        .subquery()
    )
    c = per_request.c

    def clustered(u: sa.ColumnElement[int], n: sa.ColumnElement[int]) -> list[Any]:
        return [sa.func.sum(u), sa.func.sum(n), sa.func.sum(u * u), sa.func.sum(u * n),
                sa.func.sum(n * n), sa.func.sum(sa.case((n > 0, 1), else_=0))]

    both = sa.case((sa.and_(c.na > 0, c.nc > 0), 1), else_=0)
    rows = s.execute(sa.select(
        c.rater, *clustered(c.ua, c.na), *clustered(c.uc, c.nc),
        sa.func.sum(c.uc * c.ua), sa.func.sum(c.uc * c.na), sa.func.sum(c.nc * c.ua),
        sa.func.sum(c.nc * c.na), sa.func.sum(both),
    ).group_by(c.rater))
    found = PairedThumbs(arms)
    for identity, *sums in rows:
        ints = [int(x or 0) for x in sums]
        active, canary, shared = Clustered(*ints[:6]), Clustered(*ints[6:12]), Shared(*ints[12:])
        if active.n:
            found.active[identity] = active
        if canary.n:
            found.canary[identity] = canary
        if shared.requests:
            found.shared[identity] = shared
    return found


def _thumbs_by_rater(s: Session, versions: tuple[str, ...], *where: sa.ColumnElement[bool]
                     ) -> dict[str, RaterThumbs]:
    """(up, down) per version and identity of the rater, over feedback matching `where`."""
    rater = identity_column(Feedback)
    up = sa.func.sum(sa.case((Feedback.rating == "up", 1), else_=0))
    down = sa.func.sum(sa.case((Feedback.rating == "down", 1), else_=0))
    rows = s.execute(
        sa.select(answer_version, rater, up, down)
        .select_from(Feedback)
        .join(Choice, Choice.id == Feedback.choice_id)
        .join(Completion, Completion.id == Choice.completion_id)
        .where(answer_version.in_(versions), Feedback.replaced_by.is_(None), *where)
        .group_by(answer_version, rater)
    )
    found: dict[str, RaterThumbs] = {}
    for version, identity, n_up, n_down in rows:
        found.setdefault(version, {})[identity] = (int(n_up or 0), int(n_down or 0))
    return found
