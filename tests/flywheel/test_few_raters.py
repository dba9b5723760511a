"""A canary compared within a few raters (flywheel/rater_pooling.py, `pool_paired` and
`decide_paired`): thumbs clustered by request, the raters' own preferences rather than their
spread, no verdict that rests on one of them, and a request's answers from both arms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.approval import Arm
from flywheel.rater_pooling import (
    FEW_RATERS,
    Clustered,
    Shared,
    decide_paired,
    difference_variance,
    pool_paired,
)
from tests.simulated_raters import (
    ALPHA,
    PROMOTE,
    REJECT,
    Crowd,
    canary_answers,
    rate,
    request_thumbs,
    simulate,
    thumbs_to,
)

RULES = {"share": 0.1, "min_ratings": 50, "margin": 0.02, "alpha": 0.05}


def _independent(up: int, down: int) -> Clustered:
    """Plain counts: each thumb its own request."""
    return Clustered.of([(1, 0)] * up + [(0, 1)] * down)


def _rater(up_active: int, n_active: int, up_canary: int, n_canary: int
           ) -> tuple[Clustered, Clustered]:
    return (_independent(up_active, n_active - up_active),
            _independent(up_canary, n_canary - up_canary))


def _arms(**raters: tuple[Clustered, Clustered]
          ) -> tuple[dict[str, Clustered], dict[str, Clustered]]:
    return ({name: a for name, (a, _) in raters.items()},
            {name: c for name, (_, c) in raters.items()})


def test_a_request_whose_answers_agree_counts_nearer_one_thumb() -> None:
    """Twenty requests of three answers, each all up or all down: the approval is known to
    about 1/sqrt(20), not 1/sqrt(60) as sixty independent thumbs would have it."""
    together = Clustered.of([(3, 0)] * 10 + [(0, 3)] * 10)
    mixed = Clustered.of([(2, 1), (1, 2)] * 10)
    independent = _independent(30, 30)
    assert (together.up, together.n, together.requests) == (30, 60, 20)
    assert together.variance() == pytest.approx(0.25 / 20 * 20 / 19)
    assert independent.variance() == pytest.approx(0.25 / 60 * 60 / 59, rel=0.02)
    # Requests split within themselves say more than independent thumbs: binomial at least.
    assert mixed.variance() == pytest.approx((31 / 62) * (31 / 62) / 60)
    assert Clustered.of([(2, 1), (0, 0)]) == Clustered(2, 3, 4, 6, 9, 1)


def test_a_few_raters_are_judged_on_their_own_preferences() -> None:
    """Three raters who like the canary by 0, 10 and 20 points: what they prefer is known from
    their own thumbs; the spread of three differences (two degrees of freedom) does not enter.
    From `FEW_RATERS` raters on, it does: they stand for a crowd."""
    def raters(k: int) -> tuple[dict[str, Clustered], dict[str, Clustered]]:
        return _arms(**{f"r{i}": _rater(100, 200, 100 + 20 * (i % 3), 200) for i in range(k)})

    def variance(arms: tuple[Arm, Arm]) -> float:
        assert arms[0].variance is not None and arms[1].variance is not None
        assert arms[1].approval - arms[0].approval == pytest.approx(0.1)  # type: ignore[operator]
        return arms[0].variance + arms[1].variance

    few, crowd = pool_paired(*raters(3), share=0.1), pool_paired(*raters(12), share=0.1)
    active, canary = raters(3)
    within = sum(active[r].variance() + canary[r].variance() for r in active)  # about 0.0073
    assert variance(few) == pytest.approx(within / 9)  # equal weights: the mean of three
    spread = 4 * (0.1**2 + 0 + 0.1**2)  # the twelve differences' squares about their mean
    assert variance(crowd) == pytest.approx(spread / 144 * 12 / 11)
    assert variance(crowd) > 4 * within / 144


def test_an_untrusted_key_decides_nothing_beside_one_rater() -> None:
    """One rater who finds the canary a little better (not yet significant), and a key minting
    ids that thumbs the canary up and the active version down: the key could be anyone, so
    the verdict must stand without it, and here it does not."""
    honest = _rater(60, 120, 68, 120)
    key = _rater(0, 150, 150, 150)
    decision = decide_paired(*_arms(**{"user:ann": honest, "key:mint": key}), **RULES)
    assert decision.verdict == "wait" and decision.tipped_by == "key:mint"
    assert decision.shown > 0.3 and decision.without == pytest.approx(8 / 120)
    assert decide_paired(*_arms(**{"user:ann": honest}), **RULES).verdict == "wait"
    # A rater who shows it on their own decides it, the key beside them or not.
    clear = _rater(40, 120, 90, 120)
    for raters in ({"user:ann": clear}, {"user:ann": clear, "key:mint": key}):
        assert decide_paired(*_arms(**raters), **RULES).verdict == "promote"


def test_one_rater_cannot_overturn_the_others() -> None:
    """Two raters find the canary 20 points better; a third, thumbing twice as much, finds it
    far worse. Pooled, the third's weight would reject it; without the third, the others say
    the opposite, so it waits and says whose thumbs tip it. Two who agree with the third's
    direction let it stand."""
    ann, bob = _rater(40, 100, 60, 100), _rater(41, 100, 61, 100)
    cat = _rater(200, 200, 0, 200)
    decision = decide_paired(*_arms(**{"user:ann": ann, "user:bob": bob, "user:cat": cat}),
                             **RULES)
    assert decision.interval[1] < 0  # what the pooled thumbs alone would do: reject
    assert decision.verdict == "wait" and decision.tipped_by == "user:cat"
    assert decision.without == pytest.approx(0.2, abs=0.01)
    assert decision.evidence()["tipped_by"] == "user:cat"
    worse = _rater(60, 100, 35, 100)
    agreed = decide_paired(*_arms(**{"user:ann": worse, "user:bob": worse, "user:cat": cat}),
                           **RULES)
    assert agreed.verdict == "reject" and agreed.tipped_by is None


def test_a_crowd_is_not_checked_rater_by_rater() -> None:
    raters = {f"user:{i}": _rater(40, 100, 60, 100) for i in range(FEW_RATERS)}
    decision = decide_paired(*_arms(**raters), **RULES)
    assert decision.verdict == "promote" and decision.tipped_by is None


@pytest.mark.parametrize("honest", [1, 3])
def test_clustered_thumbs_keep_the_error_rates(honest: int) -> None:
    """Three thumbs a request, a request's answers alike (its approval moved by sd 0.2): a
    10-point-worse canary promoted in no more than 5% of runs, an equal one rejected in no
    more than alpha; a 15-point gain and a 20-point loss still decided within 600 canary
    thumbs in most runs."""
    runs = 60
    clustered = {"answers": 3, "prompt_sd": 0.2}
    worse = simulate(Crowd(honest), 0.6, 0.5, runs, seed=50 + honest, cap=1000, **clustered)
    equal = simulate(Crowd(honest), 0.6, 0.6, runs, seed=60 + honest, cap=1000, **clustered)
    slack = 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert rate(worse, PROMOTE) <= 0.05 + slack
    assert rate(equal, REJECT) <= ALPHA + slack
    better = simulate(Crowd(honest), 0.6, 0.75, runs, seed=70 + honest, **clustered)
    sunk = simulate(Crowd(honest), 0.6, 0.4, runs, seed=80 + honest, **clustered)
    for outcomes, verdict in ((better, PROMOTE), (sunk, REJECT)):
        assert sum(o.verdict == verdict and o.canary_thumbs <= 600 for o in outcomes) >= 0.8 * runs


def test_a_request_split_gives_the_canary_its_fraction() -> None:
    """The server's split: floor(n f) answers to the canary and one more with probability
    frac(n f); one answer goes to the canary with probability f, so a mixed canary of single
    answers is the per-request canary it always was."""
    draws = np.random.default_rng(0).random(20_000)
    three = canary_answers(3, 0.5, draws)
    assert set(three.tolist()) == {1, 2} and three.mean() == pytest.approx(1.5, abs=0.02)
    assert set(canary_answers(3, 0.2, draws).tolist()) == {0, 1}
    assert canary_answers(3, 0.2, draws).mean() == pytest.approx(0.6, abs=0.02)
    assert (canary_answers(2, 0.5, draws) == 1).all()
    assert (canary_answers(1, 0.3, draws) == (draws < 0.3)).all()
    single = {"fraction": 0.5, "cap": 600}
    assert (simulate(Crowd(3), 0.6, 0.7, 10, seed=1, mixed=True, **single)
            == simulate(Crowd(3), 0.6, 0.7, 10, seed=1, **single))


def test_a_difference_within_requests_answered_by_both_arms_is_calibrated() -> None:
    """One rater, 150 requests of three answers split between the arms at half (one or two
    canary answers each), a request's approvals moved alike by its prompt (sd 0.2): the
    prompt cancels in the rater's difference. Over 2,000 such datasets, `difference_variance`
    is on average near the variance of the rater's differences and not below it (it is the
    binomial floor here: within a request thumbs vary less than binomially, so it runs about a
    tenth above); without the requests' covariance it is clearly larger."""
    rng = np.random.default_rng(5)
    requests, found = 150, []
    for _ in range(2000):
        on_canary = canary_answers(3, 0.5, rng.random(requests))
        counts = np.stack([3 - on_canary, on_canary])
        up = request_thumbs(np.repeat([[0.4], [0.5]], requests, axis=1), counts, 0.2, rng)
        thumbs = np.stack([up, counts - up], axis=-1)  # arm, request, (up, down)
        active, canary = Clustered.of(thumbs[0].tolist()), Clustered.of(thumbs[1].tolist())
        shared = Shared.of(thumbs.swapaxes(0, 1).tolist())
        assert shared.requests == requests
        found.append((canary.up / canary.n - active.up / active.n,
                      difference_variance(active, canary, shared),
                      difference_variance(active, canary)))
    difference, within, separate = np.array(found).T
    truth = difference.var(ddof=1)
    assert difference.mean() == pytest.approx(0.1, abs=0.005)
    assert 0.95 * truth <= within.mean() <= 1.3 * truth
    assert separate.mean() >= 1.08 * within.mean()
    assert separate.mean() >= 1.12 * truth


def test_mixed_requests_keep_the_error_rates_and_decide_sooner() -> None:
    """Three honest raters, three thumbs a request alike by prompt (sd 0.2), `flywheel up`'s
    canary on half the answers, each request's answers split between the arms: a 10-point-worse
    canary promoted in no more than 5% of runs, an equal one rejected in no more than alpha,
    and a 10-point gain promoted on fewer canary thumbs (median) than with whole requests on
    one arm."""
    crowd, clustered = Crowd(3), {"answers": 3, "prompt_sd": 0.2, "fraction": 0.5}
    runs = 300
    worse = simulate(crowd, 0.6, 0.5, runs, seed=90, cap=1000, mixed=True, **clustered)
    equal = simulate(crowd, 0.6, 0.6, runs, seed=91, cap=1000, mixed=True, **clustered)
    slack = 2 * math.sqrt(ALPHA * (1 - ALPHA) / runs)
    assert rate(worse, PROMOTE) <= 0.05 + slack
    assert rate(equal, REJECT) <= ALPHA + slack
    mixed = simulate(crowd, 0.6, 0.7, 150, seed=92, mixed=True, **clustered)
    whole = simulate(crowd, 0.6, 0.7, 150, seed=92, **clustered)
    assert rate(mixed, PROMOTE) >= 0.95 and rate(whole, PROMOTE) >= 0.95
    assert thumbs_to(mixed, PROMOTE) < 0.9 * thumbs_to(whole, PROMOTE)  # type: ignore[operator]
