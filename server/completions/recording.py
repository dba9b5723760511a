"""Group commit of served completions: what each answer stores before its last chunk goes out.

Every completion is stored (``Store.record_completions``) before its response, or its stream's
final ``[DONE]``, is sent, so feedback on it, on any replica, finds it. Completions that end
while a batch is being written wait, then go together (server/group_commit.py), as ratings do.
"""

from __future__ import annotations

from feedback_store import NewCompletion, Store
from feedback_store.errors import StoreError
from server.group_commit import GroupCommit

COMPLETION_WRITES = 1  # batches written at once; completions ending meanwhile wait for the next
COMPLETION_BATCH = 128  # most completions in one transaction

CompletionWrites = GroupCommit[NewCompletion, StoreError | None]


def completion_writes(store: Store) -> CompletionWrites:
    """Each completion's outcome: None once stored, or the StoreError that refused it alone; a
    database that is unavailable raises StoreUnavailableError for the whole batch."""
    return GroupCommit(store.record_completions, name="completion-writes",
                       concurrency=COMPLETION_WRITES, batch_size=COMPLETION_BATCH)
