"""The trust weight's targets for 3, 10 and 100 raters, honest, hostile and minted, by
simulation (tests/simulated_trust.py; `bench/trust_weights.py` prints the whole table). Below
four raters no one is judged: `test_rater_review.py` and `test_cycle_judges.py` check that on
the store and the worker's own code."""

from __future__ import annotations

import pytest

from tests.simulated_trust import TrustCrowd, rates

RUNS = 200


@pytest.mark.parametrize("n", [10, 100])
def test_honest_raters_keep_their_weight(n: int) -> None:
    """Only an honest rater whose own taste the model in service inverts can lose weight: 1-2%
    of them at the floor's accuracy (after 40 to 160 events each), none to speak of at 0.75."""
    assert rates(TrustCrowd(n), 0.6, events=40, runs=RUNS)[0] <= 0.03
    assert rates(TrustCrowd(n), 0.75, events=40, runs=RUNS)[0] <= 0.005


@pytest.mark.parametrize("n", [3, 10, 100])
def test_hostile_raters_and_minting_keys_are_caught(n: int) -> None:
    hostile = TrustCrowd(n, hostile=max(1, n // 5))
    assert rates(hostile, 0.75, events=40, runs=RUNS)[1] >= 0.5
    assert rates(hostile, 0.75, events=160, runs=RUNS)[1] >= 0.9  # more events, more caught
    # The key thumbs as much as all honest raters: the fewer they are, the fewer its events.
    assert rates(TrustCrowd(n, minted=True), 0.6, events=40, runs=RUNS)[2] >= (
        0.4 if n == 3 else 0.95)
