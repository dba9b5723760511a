"""Implicit feedback: what users did with an answer besides rating it (regenerate, edit, copy).

Stored as its own kind of event, never as a thumb: it counts in no approval (shown per version
in `/v1/policies` and the console). It trains the reward model only when the setting
`feedback.implicit_weight` is above 0 (off by default): each signal then joins a cycle's window
as a lone thumb of that weight (`signal_examples`), under the same per-rater caps as thumbs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from feedback_store.base import StoreBase, public_id, storable, unix, utcnow
from feedback_store.errors import InvalidInputError
from feedback_store.feedback import _check_owner, _find_choice
from feedback_store.feedback_reads import Signal
from feedback_store.models import Choice, Completion, ImplicitFeedback, answer_version
from feedback_store.types import IMPLICIT_SIGNALS, IMPLICIT_UP, Rater, ThumbExample


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
            sa.select(answer_version, ImplicitFeedback.signal, sa.func.count())
            .select_from(ImplicitFeedback)
            .join(Choice, Choice.id == ImplicitFeedback.choice_id)
            .join(Completion, Completion.id == Choice.completion_id)
            .group_by(answer_version, ImplicitFeedback.signal)
        )
        with self._tx(write=False) as s:
            rows = s.execute(query).all()
        counts: dict[str, dict[str, int]] = {}
        for version, signal, n in rows:
            counts.setdefault(version, dict.fromkeys(IMPLICIT_SIGNALS, 0))[signal] = int(n)
        return counts


def signal_examples(signals: Sequence[Signal], prompts: Mapping[int, Sequence[int]],
                    old: int, weight: float) -> list[ThumbExample]:
    """Implicit signals as lone thumbs of `weight`, new when their id is above `old`: a copied
    answer up, a regenerated one down, and the answer that preceded an edited question down
    (the chat page sends "edit" on it). One per rater, answer and direction: an answer copied
    three times is one weak up."""
    seen: set[tuple[str, int, bool]] = set()
    examples = []
    for x in signals:
        up = x.signal in IMPLICIT_UP
        if (x.identity, x.answer.choice_id, up) in seen:
            continue
        seen.add((x.identity, x.answer.choice_id, up))
        examples.append(ThumbExample(
            prompt_token_ids=list(prompts[x.prompt_id]), answer_token_ids=list(x.answer.token_ids),
            label=up, identity=x.identity, new=x.signal_id > old, weight=weight,
            source="implicit"))
    return examples
