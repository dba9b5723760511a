"""Which arm a new request goes to while a canary runs: drawn per request, or sticky per rater.

The unit is the canary's (chosen when it starts, `trainer_worker/promotion.py`): per request when
raters are few, so each rater sees both arms and the judge compares the arms within raters;
sticky per rater when they are many, so nobody's experience flips between versions. Per request,
a request for several answers is split between the arms (`canary_answers`): both versions answer
the same prompt, and what the prompt does to every answer cancels in their comparison.
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

    def canary_answers(self, rater: Rater | str | None, n: int) -> int:
        """How many of a request's `n` answers the canary writes. Sticky per rater: all or none
        (`to_canary`). Per request: the canary's fraction of them, n * fraction rounded down
        or, with the probability of its fractional part, up (at 0.5, one or two of three
        answers; one of one half the time), so that the split follows the fraction and as many
        requests as it allows are answered by both arms."""
        if self.version is None or self.unit != "request":
            return n if self.to_canary(rater) else 0
        exact = n * self.fraction
        whole = int(exact)
        return whole + (random.random() < exact - whole)
