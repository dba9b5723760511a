"""Group commit of ratings: thumbs that arrive while earlier ones are being written wait, then go
together in one INSERT of arrays (``Store.add_feedbacks``; server/group_commit.py)."""

from __future__ import annotations

from typing import Any

from feedback_store import Store
from feedback_store.errors import StoreError
from server.group_commit import GroupCommit

FEEDBACK_WRITES = 2  # batches of ratings written at once; ratings arriving meanwhile wait
FEEDBACK_BATCH = 256  # most ratings in one batch

# A rating's outcome: `add_feedback`'s (record, created), or the StoreError it would raise.
Outcome = tuple[dict[str, Any], bool] | StoreError
FeedbackWrites = GroupCommit[dict[str, Any], Outcome]


def feedback_writes(store: Store) -> FeedbackWrites:
    """Ratings (`add_feedback`'s keyword arguments) written in batches; a database that is
    unavailable raises StoreUnavailableError for the whole batch."""
    return GroupCommit(store.add_feedbacks, name="feedback-writes",
                       concurrency=FEEDBACK_WRITES, batch_size=FEEDBACK_BATCH)
