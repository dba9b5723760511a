"""Thumbs pooled across raters (flywheel/rater_pooling.py): the cap, the weights, the variance,
and the canary's error rates with users who differ in taste, are sticky to an arm, rate at very
different volumes, or rate against their own taste on purpose.

`simulate_raters` is imported by bench/canary_decision.py, which prints the same rates at larger
sizes; the tests below run it at sizes that take seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from flywheel.approval import Arm, decide_canary
from flywheel.rater_pooling import identity_cap, pool_arm
from tests.flywheel.test_approval import (
    ALPHA,
    FRACTION,
    MARGIN,
    MIN_RATINGS,
    PROMOTE,
    REJECT,
    WAIT,
)


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


@dataclass(frozen=True)
class Population:
    """Simulated raters: honest ones whose approval of each arm varies around the arm's by their
    leniency (sd `spread`), with activity drawn log-normal (sd `activity_sd`); and `hostile`
    raters who thumb against their taste, together giving `hostile_volume` times the honest
    volume, with trust weight `hostile_weight` (1: the trainer has not caught them yet)."""

    p_active: float
    p_canary: float
    honest: int = 60
    spread: float = 0.15
    activity_sd: float = 1.0
    hostile: int = 0
    hostile_volume: float = 1.0
    hostile_weight: float = 1.0



def simulate_raters(pop: Population, runs: int, seed: int, *, pooled: bool = True,
                    growth: float = 1.03, cap: int = 3000) -> np.ndarray:
    """First verdict of each run (WAIT, PROMOTE, REJECT): thumbs arrive one rater at a time,
    each rater sticky to an arm (canary with probability FRACTION), `decide_canary` checked on
    the pooled arms (or on plain counts, `pooled=False`) each time the thumbs grew by `growth`
    (checking less often than the worker does can only lower the error rates), until `cap`
    canary thumbs."""
    rng = np.random.default_rng(seed)
    verdicts = np.zeros(runs, dtype=np.int64)
    total = pop.honest + pop.hostile
    for run in range(runs):
        lenient = rng.normal(0.0, pop.spread, pop.honest)
        activity = rng.lognormal(0.0, pop.activity_sd, pop.honest)
        if pop.hostile:
            activity = np.concatenate(
                [activity, np.full(pop.hostile, activity.sum() * pop.hostile_volume / pop.hostile)])
            lenient = np.concatenate([lenient, np.zeros(pop.hostile)])
        on_canary = rng.random(total) < FRACTION
        p_up = np.clip(np.where(on_canary, pop.p_canary, pop.p_active) + lenient, 0.02, 0.98)
        p_up[pop.honest:] = 1.0 - p_up[pop.honest:]  # hostile: against their own taste
        weights = {f"r{i}": pop.hostile_weight for i in range(pop.honest, total)}
        up, n = np.zeros(total, dtype=np.int64), np.zeros(total, dtype=np.int64)
        order = rng.choice(total, size=cap * 8, p=activity / activity.sum())
        thumbs = rng.random(order.size) < p_up[order]
        start = 0
        while start < order.size:
            stop = max(start + 20, int(start * growth))
            np.add.at(n, order[start:stop], 1)
            np.add.at(up, order[start:stop], thumbs[start:stop])
            start = stop
            arms = [_arm(up, n, on_canary == side, weights, pooled) for side in (False, True)]
            decision = decide_canary(*arms, min_ratings=MIN_RATINGS, margin=MARGIN, alpha=ALPHA)
            if decision.verdict != "wait" or n[on_canary].sum() >= cap:
                verdicts[run] = {"wait": WAIT, "promote": PROMOTE, "reject": REJECT}[
                    decision.verdict]
                break
    return verdicts


def _arm(up: np.ndarray, n: np.ndarray, members: np.ndarray, weights: dict[str, float],
         pooled: bool) -> Arm:
    if not pooled:
        return Arm(int(up[members].sum()), int((n - up)[members].sum()))
    raters = {f"r{i}": (int(up[i]), int(n[i] - up[i])) for i in np.flatnonzero(members & (n > 0))}
    return pool_arm(raters, share=0.1, weights=weights)


def rate(verdicts: np.ndarray, code: int) -> float:
    return float(np.mean(verdicts == code))


def test_raters_who_differ_keep_false_rejections_within_alpha() -> None:
    """Equal arms, raters who differ in taste and volume: plain counts treat a lenient heavy
    rater's thumbs as independent evidence and reject the equal canary far more often than
    alpha; pooled across raters, the rate stays within it."""
    pop = Population(0.5, 0.5, honest=60, spread=0.2, activity_sd=1.5)
    runs = 150
    plain = rate(simulate_raters(pop, runs, seed=1, pooled=False), REJECT)
    pooled = rate(simulate_raters(pop, runs, seed=1), REJECT)
    slack = 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert pooled <= ALPHA + slack, (pooled, plain)
    assert plain > pooled


def test_hostile_raters_do_not_decide_the_canary() -> None:
    """Two raters who thumb against their taste as much as ten honest ones together, against a
    canary ten honest raters find 25 points better: plain counts reject it more often than
    alpha; pooled, each hostile rater weighs at most its share and the canary is rejected in
    under alpha / 2 of runs; once the trainer has down-weighted them, it is promoted far more
    often as well (94% against 60% within 3000 canary thumbs)."""
    caught = Population(0.3, 0.55, honest=10, spread=0.05, activity_sd=0.3, hostile=2,
                        hostile_volume=1.0, hostile_weight=0.1)
    uncaught = Population(**{**caught.__dict__, "hostile_weight": 1.0})
    runs = 120
    plain = simulate_raters(uncaught, 400, seed=2, pooled=False)  # 7% rejected, 60% promoted
    capped = simulate_raters(uncaught, runs, seed=2)
    weighted = simulate_raters(caught, runs, seed=2)
    assert rate(plain, REJECT) > ALPHA, rate(plain, REJECT)
    assert rate(capped, REJECT) <= ALPHA / 2, rate(capped, REJECT)
    assert rate(weighted, REJECT) <= ALPHA, rate(weighted, REJECT)
    assert rate(weighted, PROMOTE) > rate(plain, PROMOTE) + 0.2
