"""Delivery from the decode thread to asyncio consumers, with one wake-up per loop per batch.

Waking an event loop from another thread (``call_soon_threadsafe``) writes to a socket and costs
the loop a turn; under load the decode thread would pay it every step for every loop. A
``Mailbox`` collects items for one loop and schedules a single drain, however many steps' worth
arrive before the loop gets to it. Each request reads its items from an ``Inbox``: a deque and at
most one waiting future, lighter than ``asyncio.Queue``, bounded by merging what its reader has not
taken yet (the decode thread serves every request and never waits for a slow one).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items for one consumer; ``put`` runs on the consumer's event loop.

    With ``merge``, more than ``limit`` untaken items are merged into fewer (``merge`` must
    return at most ``limit // 2`` of them, so merging costs O(1) per item).
    """

    def __init__(self, merge: Callable[[list[T]], list[T]] | None = None,
                 limit: int = 0) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._merge = merge
        self._limit = limit

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        self._items.append(item)
        if self._merge is not None and len(self._items) > self._limit:
            self._items = deque(self._merge(list(self._items)))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take_all(self) -> list[T]:
        """Wait for at least one item; return everything queued so far."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


class Mailbox(Generic[T]):
    """Items bound for inboxes on one event loop, posted from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Inbox[T], T]] = []
        self._scheduled = False

    def post(self, items: Iterable[tuple[Inbox[T], T]]) -> bool:
        """Queue items, waking the loop unless a drain is pending; False: the loop is closed."""
        with self._lock:
            self._items.extend(items)
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for inbox, item in items:
            inbox.put(item)
