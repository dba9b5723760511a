"""The scheduler's waiting requests, by key, taken round robin; and each key's share of the batch.

One client's flood of requests used to sit ahead of everyone else's in one FIFO queue, and hold
every row of the running batch. Here each key (``Request.tenant``: the caller's API key, or its
address on a server without keys) has a FIFO of its own, and the scheduler takes the heads of the
keys in turn (round robin by request, as TGI and vLLM order by priority, without weights). While
several keys are active, one key's rows in the batch are capped (``BatchShare``) so that a
newcomer's request joins within a few steps instead of after a flood's longest answer.

Torch-free and lock-free: the scheduler calls it under its own condition variable.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

# A key counts as active this long after its last request: an interactive client's next turn
# usually comes within half a minute, and should find its share of the batch still kept free.
RECENT_S = 30.0


class Queued(Protocol):
    tenant: str
    cancelled: bool
    submitted_step: int


R = TypeVar("R", bound=Queued)


class FairQueue(Generic[R]):
    """Waiting requests in one FIFO per key, popped round robin between keys (``fair``), or in
    one FIFO for all (``fair=False``: the order before per-key fairness)."""

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        # Keys in turn order: keys not served yet first (in order of arrival), then the others,
        # least recently served first (FQ-CoDel's new and old flows).
        self._queues: OrderedDict[str, deque[R]] = OrderedDict()
        self._fresh: set[str] = set()  # keys at the front that have not been served yet
        self._size = 0

    def _key(self, request: R) -> str:
        return request.tenant if self.fair else ""

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[R]:
        for queue in self._queues.values():
            yield from queue

    def append(self, request: R) -> None:
        key = self._key(request)
        if key not in self._queues:
            self._insert_fresh(key)
        self._queues[key].append(request)
        self._size += 1

    def _insert_fresh(self, key: str) -> None:
        """A key with nothing waiting goes behind the other fresh keys, ahead of those served."""
        served = [k for k in self._queues if k not in self._fresh]
        self._queues[key] = deque()
        for k in served:
            self._queues.move_to_end(k)
        self._fresh.add(key)

    def oldest_step(self) -> int:
        """The decode step at which the longest-waiting request was queued."""
        return min(queue[0].submitted_step for queue in self._queues.values())

    def keys(self) -> list[str]:
        return list(self._queues)

    def drop_cancelled(self) -> None:
        for key in list(self._queues):
            kept = deque(r for r in self._queues[key] if not r.cancelled)
            self._size -= len(self._queues[key]) - len(kept)
            if kept:
                self._queues[key] = kept
            else:
                self._forget(key)

    def _forget(self, key: str) -> None:
        del self._queues[key]
        self._fresh.discard(key)

    def drain(self) -> list[R]:
        """Every waiting request (the queue is left empty)."""
        out = list(self)
        self._queues.clear()
        self._fresh.clear()
        self._size = 0
        return out

    def peek_next(self, allowed: Callable[[R], bool]) -> R | None:
        """The head of the first key in turn whose head ``allowed`` accepts, or None (a key over
        its share is passed over; its own order is kept). Cancelled heads are dropped here."""
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and queue[0].cancelled:
                queue.popleft()
                self._size -= 1
            if not queue:
                self._forget(key)
            elif allowed(queue[0]):
                return queue[0]
        return None

    def take(self, request: R) -> None:
        """Remove ``request``, the head its key's queue (from ``peek_next``); its key goes to the
        back of the turn order."""
        key = self._key(request)
        queue = self._queues[key]
        assert queue[0] is request
        queue.popleft()
        self._size -= 1
        self._fresh.discard(key)
        if queue:
            self._queues.move_to_end(key)
        else:
            self._forget(key)


class BatchShare:
    """The most rows of the running batch one key may take while other keys are active.

    Alone, a key may fill the batch; once another key has requests waiting or running, or sent
    one in the last ``RECENT_S`` seconds, each key is held to ``share`` of the batch, leaving the
    rest free for the others. A key holding no rows may always start one request, however wide
    (as a request wider than the whole batch runs alone).
    """

    def __init__(self, max_batch: int, share: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.cap = max(1, math.ceil(max_batch * share))
        self._max_batch = max_batch
        self._clock = clock
        self._seen: dict[str, float] = {}

    def saw(self, tenant: str) -> None:
        """A request of ``tenant`` arrived."""
        self._seen[tenant] = self._clock()

    def limit(self, busy: set[str]) -> int:
        """The rows one key may hold, ``busy`` being the keys with rows running or waiting."""
        horizon = self._clock() - RECENT_S
        self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
        active = busy | self._seen.keys()
        return self.cap if len(active) > 1 else self._max_batch

    @staticmethod
    def fits(held: int, rows: int, limit: int) -> bool:
        return held == 0 or held + rows <= limit
