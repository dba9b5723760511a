"""Thumbs per hour, per version or in all, for the console's charts: one bounded, indexed query.

The window is a range of `feedback.created_at` (its index, `ix_feedback_created_at`), so the cost
of a page grows with the feedback inside it, never with the table.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from feedback_store.base import StoreBase
from feedback_store.models import Choice, Completion, Feedback, answer_version

HOUR_S = 3600
MAX_HOURS = 24 * 14  # the widest page: two weeks of hourly buckets


def _hour(session_dialect: str, column: Any) -> Any:
    """Unix hour number (seconds // 3600) of a timestamp column, in SQL."""
    if session_dialect == "sqlite":  # stored as naive UTC text (models.UTCDateTime)
        # `//`: SQLAlchemy 2.1 renders `/` as true division (3600 + 0.0) on SQLite
        return sa.cast(sa.func.strftime("%s", column), sa.Integer) // HOUR_S
    return sa.cast(sa.func.floor(sa.extract("epoch", column) / HOUR_S), sa.BigInteger)


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


class HistoryMixin(StoreBase):
    """Read-only aggregates of stored thumbs over time."""

    def hourly_ratings(self, start: int, end: int, *, by_version: bool
                       ) -> list[dict[str, Any]]:
        """Thumbs stored in [start, end) (unix seconds, whole hours, at most MAX_HOURS apart)
        counted per hour, and per version of the answer rated when ``by_version``; oldest
        first. Each record: ``hour`` (unix seconds), ``up``, ``down`` (and ``version``)."""
        if end <= start or (end - start) > MAX_HOURS * HOUR_S:
            raise ValueError("a window of 1 to MAX_HOURS hours")
        hour = _hour(self.dialect, Feedback.created_at).label("hour")
        up = sa.func.sum(sa.case((Feedback.rating == "up", 1), else_=0)).label("up")
        down = sa.func.sum(sa.case((Feedback.rating == "down", 1), else_=0)).label("down")
        columns: list[Any] = [hour, up, down]
        query = sa.select(*columns).select_from(Feedback)
        if by_version:
            query = (sa.select(hour, answer_version, up, down).select_from(Feedback)
                     .join(Choice, Choice.id == Feedback.choice_id)
                     .join(Completion, Completion.id == Choice.completion_id))
        query = query.where(Feedback.created_at >= _at(start), Feedback.created_at < _at(end))
        groups: list[Any] = [hour, answer_version] if by_version else [hour]
        query = query.group_by(*groups).order_by(*groups)
        with self._tx(write=False) as s:
            rows = s.execute(query).all()
        if by_version:
            return [{"hour": int(h) * HOUR_S, "version": v, "up": int(u), "down": int(d)}
                    for h, v, u, d in rows]
        return [{"hour": int(h) * HOUR_S, "up": int(u), "down": int(d)} for h, u, d in rows]

    def feedback_before(self, moment: int) -> bool:
        """Whether any thumbs were stored before ``moment`` (unix seconds): an earlier page."""
        with self._tx(write=False) as s:
            return s.scalar(sa.select(Feedback.id).where(Feedback.created_at < _at(moment))
                            .limit(1)) is not None
