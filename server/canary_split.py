"""Which arm a new request goes to while a canary runs: drawn per request, or sticky per rater.

The unit is the canary's (chosen when it starts, `trainer_worker/promotion.py`): per request when
raters are few, so each rater sees both arms and the judge compares the arms within raters;
sticky per rater when they are many, so nobody's experience flips between versions.
"""

from __future__ import annotations

import hashlib
import random

from feedback_store.types import ANONYMOUS, Rater


class CanarySplit:
    """The canary's version, share of new requests and unit, as the watcher last applied them."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.fraction = 0.0
        self.unit = "user"

    def set(self, version: str, fraction: float, unit: str = "user") -> None:
        self.version, self.fraction, self.unit = version, fraction, unit

    def clear(self) -> None:
        self.version, self.fraction, self.unit = None, 0.0, "user"

    def to_canary(self, rater: Rater | str | None) -> bool:
        """Whether a request goes to the canary.

        Sticky per rater: a rater's identity (`Rater.identity`, an untrusted key's users sharing
        one) hashes to a fixed point in [0, 1) per canary version, so every replica sends the
        same raters to the canary, each sees one arm for the canary's whole life, and one who
        landed on the canary stays there when the fraction grows. Anonymous requests, and every
        request of a per-request canary, are drawn at random.
        """
        if self.version is None:
            return False
        identity = rater.identity if isinstance(rater, Rater) else (
            None if rater is None else f"user:{rater}")
        if self.unit == "user" and identity not in (None, ANONYMOUS):
            digest = hashlib.sha256(f"{self.version}\0{identity}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        else:
            point = random.random()
        return point < self.fraction
