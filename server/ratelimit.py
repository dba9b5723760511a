"""Per-identity rate limit on the feedback routes: 429 with ``Retry-After`` past it.

A token bucket per rater identity (`Rater.identity`: an untrusted key's users share one),
refilled at ``feedback.rate_per_minute`` up to ``feedback.rate_burst``; off when the rate is 0
(the default, and `flywheel up`). Buckets live in each replica's memory: behind N replicas an
identity may post up to N times the rate, so set it per replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from fastapi import Request

from feedback_store.types import Rater
from server.errors import APIError
from server.state import AppState

MAX_BUCKETS = 100_000  # identities tracked at once; full buckets are forgotten first


class RateLimiter:
    """Token buckets by identity; `take` spends one token or says how long to wait."""

    def __init__(self, per_minute: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, identity: str) -> float:
        """0 when a post may go now (a token is spent), else the seconds until one may."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(identity, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[identity] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_BUCKETS:
                self._forget_full(now)
            return 0.0
        self._buckets[identity] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        for identity, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[identity]


def feedback_limiter(request: Request, state: AppState) -> RateLimiter:
    """The app's limiter, built from the settings on first use."""
    limiter = getattr(request.app.state, "feedback_limiter", None)
    if limiter is None:
        cfg = state.settings.feedback
        limiter = request.app.state.feedback_limiter = RateLimiter(cfg.rate_per_minute,
                                                                   cfg.rate_burst)
    return limiter


def check_feedback_rate(request: Request, state: AppState, rater: Rater) -> None:
    """Raise 429 (with ``Retry-After``) when this rater has used up its feedback rate."""
    limiter = feedback_limiter(request, state)
    if not limiter.enabled:
        return
    identity = rater.identity
    wait = limiter.take(identity)
    if wait > 0:
        raise APIError(429, f"Too much feedback from {identity}: at most "
                       f"{limiter.rate * 60:g} a minute; retry later.",
                       code="feedback_rate_limited", retry_after=math.ceil(wait))
