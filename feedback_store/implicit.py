"""Implicit feedback: what users did with an answer besides rating it (regenerate, edit, copy).

Stored as its own kind of event, never as a thumb: it counts in no approval and, for now, trains
nothing (shown per version in `/v1/policies` and the console).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from feedback_store.base import StoreBase, public_id, storable, unix, utcnow
from feedback_store.errors import InvalidInputError
from feedback_store.feedback import _check_owner, _find_choice
from feedback_store.models import Choice, Completion, ImplicitFeedback
from feedback_store.types import IMPLICIT_SIGNALS, Rater


class ImplicitFeedbackMixin(StoreBase):
    """Writes of the implicit-feedback route, and its counts per version."""

    def add_implicit(self, *, completion_id: str, choice_index: int, signal: str,
                     user: str | None = None, rater: Rater | None = None) -> dict[str, Any]:
        """Store one signal on one answer; returns its record. Only the key the answer was
        served to (or the admin key) may send it, as for thumbs (ForbiddenError otherwise)."""
        if signal not in IMPLICIT_SIGNALS:
            raise InvalidInputError(f"signal must be one of {', '.join(IMPLICIT_SIGNALS)}",
                                    param="signal", code="invalid_signal")
        rater = rater or Rater(user=user)
        with self._tx() as s:
            completion, choice = _find_choice(s, completion_id, choice_index)
            _check_owner(completion, rater.owner_scope)
            row = ImplicitFeedback(
                public_id=public_id("im"), choice_id=choice.id, signal=signal,
                user=storable(rater.user), identity=storable(rater.identity),
                key_scope=rater.key_scope, created_at=utcnow())
            s.add(row)
            s.flush()
            return {"id": row.public_id, "object": "implicit_feedback",
                    "completion_id": completion_id, "choice_index": choice_index,
                    "signal": signal, "user": row.user, "created_at": unix(row.created_at)}

    def implicit_counts(self) -> dict[str, dict[str, int]]:
        """Signals per version of the answers they were sent on: {version: {signal: n}}, every
        signal named (0 when none)."""
        query = (
            sa.select(Completion.policy_version, ImplicitFeedback.signal, sa.func.count())
            .select_from(ImplicitFeedback)
            .join(Choice, Choice.id == ImplicitFeedback.choice_id)
            .join(Completion, Completion.id == Choice.completion_id)
            .group_by(Completion.policy_version, ImplicitFeedback.signal)
        )
        with self._tx(write=False) as s:
            rows = s.execute(query).all()
        counts: dict[str, dict[str, int]] = {}
        for version, signal, n in rows:
            counts.setdefault(version, dict.fromkeys(IMPLICIT_SIGNALS, 0))[signal] = int(n)
        return counts
