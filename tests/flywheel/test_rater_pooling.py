"""Thumbs pooled across raters (flywheel/rater_pooling.py): the cap, the weights, the variance,
and the canary's error rates with users who differ in taste, are sticky to an arm, rate at very
different volumes, or rate against their own taste on purpose.

The simulated raters are tests/simulated_raters.py's, which bench/canary_decision.py runs at
larger sizes; the tests below run them at sizes that take seconds, sticky to an arm.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from flywheel.approval import Arm
from flywheel.rater_pooling import identity_cap, pool_arm
from tests.simulated_raters import ALPHA, PROMOTE, REJECT, Crowd, Outcome, rate, simulate


def test_one_thumb_per_rater_is_the_binomial_arm() -> None:
    raters = {f"user:{i}": (1, 0) if i < 30 else (0, 1) for i in range(50)}
    pooled = pool_arm(raters, share=0.1)
    lone = pool_arm({"anonymous": (30, 20)}, share=0.1)  # one rater alone: its own thumbs
    for arm in (pooled, lone):
        assert arm.n == pytest.approx(50) and arm.approval == pytest.approx(0.6)
        p = 31 / 52  # Agresti-Caffo, as for plain counts
        assert arm.variance == pytest.approx(p * (1 - p) / 50, rel=0.05)


def test_a_flooding_rater_weighs_its_capped_share() -> None:
    honest = {f"user:{i}": (8, 2) for i in range(10)}  # approval 0.8, 10 thumbs each
    # An untrusted key keeps an equal share: c = (100 + c) / 11, 10 thumbs of 110.
    flooded = pool_arm({**honest, "key:flood": (0, 1000)}, share=0.1)
    assert identity_cap([10] * 10 + [1000], 0.1, vouched=False) == 10
    assert flooded.n == pytest.approx(110)
    assert flooded.approval == pytest.approx(80 / 110)
    # A rater vouched for keeps up to twice an equal share of eleven: c = 2/11 (100 + c).
    vouched = pool_arm({**honest, "user:flood": (0, 1000)}, share=0.1)
    assert vouched.n == pytest.approx(100 + 200 / 9)
    down_weighted = pool_arm({**honest, "key:flood": (0, 1000)}, share=0.1,
                             weights={"key:flood": 0.1})
    assert down_weighted.approval == pytest.approx(80 / 101)
    assert pool_arm({"user:flood": (0, 1000)}, share=0.1).n == 1000  # alone: nothing to cap
    assert pool_arm({"key:flood": (0, 1000)}, share=0.1) == Arm(0, 0)  # a lone key: nothing


def test_raters_who_differ_widen_the_interval() -> None:
    alike = pool_arm({f"user:{i}": (10, 10) for i in range(20)}, share=0.1)
    apart = pool_arm({f"user:{i}": (20, 0) if i % 2 else (0, 20) for i in range(20)}, share=0.1)
    assert alike.approval == apart.approval == pytest.approx(0.5)
    assert alike.variance == pytest.approx(0.25 / 400, rel=0.01)  # as independent thumbs
    # Twenty raters, half all-up, half all-down: the approval is known to +-1/sqrt(20), no better.
    assert apart.variance == pytest.approx(0.25 / 20 * 20 / 19, rel=0.01)


def test_nothing_to_pool() -> None:
    assert pool_arm({}, share=0.1) == Arm(0, 0)
    assert pool_arm({"user:a": (0, 0)}, share=0.1) == Arm(0, 0)
    assert pool_arm({"user:a": (3, 1)}, share=0.1, weights={"user:a": 0.0}) == Arm(0, 0)


def test_raters_who_differ_keep_false_rejections_within_alpha() -> None:
    """Equal arms, raters who differ in taste and volume: plain counts treat a lenient heavy
    rater's thumbs as independent evidence and reject the equal canary far more often than
    alpha; pooled across raters, the rate stays within it."""
    crowd = Crowd(60, spread=0.2, taste_sd=0.0, activity_sd=1.5)
    runs = 150
    plain = rate(simulate(crowd, 0.5, 0.5, runs, seed=1, unit="user", pooled=False), REJECT)
    pooled = rate(simulate(crowd, 0.5, 0.5, runs, seed=1, unit="user"), REJECT)
    slack = 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert pooled <= ALPHA + slack, (pooled, plain)
    assert plain > pooled


def test_hostile_raters_do_not_decide_the_canary() -> None:
    """Two raters who thumb against their taste as much as ten honest ones together, against a
    canary ten honest raters find 25 points better: plain counts reject it more often than
    alpha; pooled, each hostile rater weighs at most its share and the canary is rejected in
    under alpha / 2 of runs; once the trainer has down-weighted them, it is promoted far more
    often as well (92% against 57% within 3000 canary thumbs; plain counts reject 12%)."""
    uncaught = Crowd(10, spread=0.05, taste_sd=0.0, activity_sd=0.3, hostile=2,
                     hostile_volume=1.0)
    caught = replace(uncaught, hostile_weight=0.1)
    runs = 120

    def sticky(crowd: Crowd, runs: int, pooled: bool = True) -> list[Outcome]:
        return simulate(crowd, 0.3, 0.55, runs, seed=2, unit="user", pooled=pooled)

    plain = sticky(uncaught, 400, pooled=False)
    capped = sticky(uncaught, runs)
    weighted = sticky(caught, runs)
    assert rate(plain, REJECT) > ALPHA, rate(plain, REJECT)
    assert rate(capped, REJECT) <= ALPHA / 2, rate(capped, REJECT)
    assert rate(weighted, REJECT) <= ALPHA, rate(weighted, REJECT)
    assert rate(weighted, PROMOTE) > rate(plain, PROMOTE) + 0.2
