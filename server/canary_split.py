"""Which arm a new request goes to while a canary runs: sticky per user, else at random."""

from __future__ import annotations

import hashlib
import random


class CanarySplit:
    """The canary's version and share of new requests, as the watcher last applied them."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.fraction = 0.0

    def set(self, version: str, fraction: float) -> None:
        self.version, self.fraction = version, fraction

    def clear(self) -> None:
        self.version, self.fraction = None, 0.0

    def to_canary(self, user: str | None) -> bool:
        """Whether a request goes to the canary.

        A named user hashes to a fixed point in [0, 1) per canary version, so every replica sends
        the same users to the canary, each user sees one arm for the canary's whole life, and a
        user who landed on the canary stays there when the fraction grows.
        """
        if self.version is None:
            return False
        if user:
            digest = hashlib.sha256(f"{self.version}\0{user}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = random.random()
        return point < self.fraction
