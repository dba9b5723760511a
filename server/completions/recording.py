"""Group commit of served completions: what each answer stores before its last chunk goes out.

Every completion is stored (``Store.record_completions``) before its response, or its stream's
final ``[DONE]``, is sent, so feedback on it, on any replica, finds it. Completions that end
while a batch is being written wait, then go together: one thread hand-off, one transaction and
one commit for all of them, as the feedback route batches ratings (server/feedback/api_router.py).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from feedback_store import NewCompletion, Store
from feedback_store.errors import StoreError

COMPLETION_WRITES = 1  # batches written at once; completions ending meanwhile wait for the next
COMPLETION_BATCH = 128  # most completions in one transaction

Pending = tuple[NewCompletion, "asyncio.Future[StoreError | None]"]


class CompletionWrites:
    """The completions of one store, written in batches from the event loop that adds them."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[Pending] = []
        self._writing = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = ThreadPoolExecutor(COMPLETION_WRITES,
                                           thread_name_prefix="completion-writes")

    def add(self, record: NewCompletion) -> asyncio.Future[StoreError | None]:
        """Resolves once ``record`` is stored (None) or refused (its StoreError); a database
        that is unavailable resolves it with StoreUnavailableError."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop (tests run several): nothing pending is ours
            self._loop, self._pending, self._writing = loop, [], 0
        future: asyncio.Future[StoreError | None] = loop.create_future()
        self._pending.append((record, future))
        if self._writing < COMPLETION_WRITES:
            self._write(loop)
        return future

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending[:COMPLETION_BATCH]
        del self._pending[:COMPLETION_BATCH]
        self._writing += 1
        write = loop.run_in_executor(self._threads, self._store.record_completions,
                                     [record for record, _ in batch])
        write.add_done_callback(functools.partial(self._written, loop, batch))

    def _written(self, loop: asyncio.AbstractEventLoop, batch: list[Pending],
                 write: asyncio.Future[list[StoreError | None]]) -> None:
        if loop is not self._loop:
            return
        self._writing -= 1
        if self._pending:
            self._write(loop)
        error = None if write.cancelled() else write.exception()
        for i, (_, future) in enumerate(batch):
            if future.done():  # its request was cancelled
                continue
            if write.cancelled():
                future.cancel()
            elif isinstance(error, StoreError):  # e.g. StoreUnavailableError: the whole batch
                future.set_result(error)
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(write.result()[i])
