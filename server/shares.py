"""Each key's share of the admission queue (settings ``fair_share``, ``max_waiting_per_key``).

One client's flood used to fill ``max_waiting_requests`` alone, and every other client got 429.
Here the API side counts, by key (the caller's API key, or its address on a server without
keys: ``Authenticator.tenant``), the engine requests it has handed to the engine that have not
produced a first token yet, and refuses a key past its share with 429 ``key_queue_full`` while
other keys are still admitted. The count lives on this side of the engine, so the share holds
for every engine (vLLM's included); the transformers engine also schedules fairly between keys
(``server/engines/fair_queue.py``).
"""

from __future__ import annotations

import math

from server.errors import APIError

# The share of the queue no key may take while alone, kept for the next key to come: an eighth
# (32 of the default 256), so that a client alone still queues nearly as much as before.
NEWCOMER_RESERVE = 1 / 8


class KeyShares:
    """Engine requests waiting for their first token, by key, and each key's share of them."""

    def __init__(self, max_waiting: int, per_key: int | None = None, enabled: bool = True) -> None:
        """``per_key``: a fixed share; None: the queue less ``NEWCOMER_RESERVE``, split evenly
        between the keys with requests waiting (``share``)."""
        self.max_waiting = max_waiting
        self.per_key = per_key
        self.enabled = enabled
        self._waiting: dict[str, int] = {}

    def waiting(self, key: str) -> int:
        return self._waiting.get(key, 0)

    def share(self, key: str) -> int:
        """The requests ``key`` may have waiting now. With the default, the keys together never
        fill the reserve, so a newcomer always finds room; each key that queues shrinks them."""
        if self.per_key is not None:
            return self.per_key
        active = len(self._waiting) + (key not in self._waiting)
        reserve = max(1, math.ceil(self.max_waiting * NEWCOMER_RESERVE))
        return max(1, (self.max_waiting - reserve) // active)

    def admit(self, key: str) -> None:
        """429 with ``Retry-After`` when ``key`` already has its share waiting."""
        if self.enabled and self.waiting(key) >= self.share(key):
            raise APIError(429, "This API key (or client address) has too many requests waiting; "
                           "retry shortly.", code="key_queue_full", retry_after=1)

    def enter(self, key: str) -> None:
        """An engine request of ``key`` was handed to the engine."""
        self._waiting[key] = self._waiting.get(key, 0) + 1

    def leave(self, key: str) -> None:
        """That request produced its first token, or ended without one."""
        left = self._waiting.get(key, 0) - 1
        if left > 0:
            self._waiting[key] = left
        else:
            self._waiting.pop(key, None)
