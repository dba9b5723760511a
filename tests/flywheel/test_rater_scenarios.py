"""Who counts, checked by simulation (tests/simulated_raters.py): 1 to 10 honest raters with a
spread of tastes decide a canary within a few hundred canary thumbs without false promotions;
300 `user` ids minted under one untrusted key decide nothing; hostile raters, once the trainer
has caught them, stall nothing. bench/canary_decision.py prints the same rates for 1 to 1,000
raters and more runs."""

from __future__ import annotations

import math

import pytest

from flywheel.approval import GiveWay
from flywheel.settings import CanarySettings
from tests.simulated_raters import (
    ALPHA,
    PROMOTE,
    REJECT,
    SUPERSEDED,
    WAIT,
    Crowd,
    Outcome,
    rate,
    simulate,
    thumbs_to,
)

RUNS = 40


def _within(outcomes: list[Outcome], verdict: int, thumbs: int) -> float:
    """Share of runs that reached `verdict` by `thumbs` canary thumbs."""
    return sum(o.verdict == verdict and o.canary_thumbs <= thumbs for o in outcomes) / len(
        outcomes)


def _slack(runs: int, p: float = ALPHA) -> float:
    return 2 * math.sqrt(p * (1 - p) / runs)


# As thumbs come live under `flywheel up`: three answers a request, alike through their prompt
# (docs/raters.md measured it), each request split between the arms at fraction 0.5.
LIVE_LIKE = {"fraction": 0.5, "answers": 3, "prompt_sd": 0.2, "mixed": True}


@pytest.mark.parametrize("honest", [1, 3])
@pytest.mark.parametrize("thumbs", [{}, LIVE_LIKE], ids=["independent", "live-like"])
def test_a_few_raters_decide_within_400_canary_thumbs(honest: int, thumbs: dict) -> None:
    """The target for one to three honest raters: a canary 15 points better promoted, and one 20
    points worse rejected, within 400 canary thumbs (per request: each rater sees both arms),
    with independent thumbs and with thumbs as they come live."""
    runs = 60
    better = simulate(Crowd(honest), 0.6, 0.75, runs, seed=honest, **thumbs)
    worse = simulate(Crowd(honest), 0.6, 0.4, runs, seed=honest, **thumbs)
    assert _within(better, PROMOTE, 400) >= 0.85, thumbs_to(better, PROMOTE, 0.9)
    assert _within(worse, REJECT, 400) >= 0.85, thumbs_to(worse, REJECT, 0.9)
    assert rate(better, REJECT) == rate(worse, PROMOTE) == 0


@pytest.mark.parametrize("honest", [1, 3, 10])
def test_a_worse_canary_is_almost_never_promoted(honest: int) -> None:
    """No false promotion of a 10-point-worse canary in more than 5% of runs; no false
    rejection of an equal one in more than alpha."""
    runs = 60
    worse = simulate(Crowd(honest), 0.6, 0.5, runs, seed=10 + honest)
    equal = simulate(Crowd(honest), 0.6, 0.6, runs, seed=20 + honest, cap=1000)
    assert rate(worse, PROMOTE) <= 0.05 + _slack(runs)
    assert rate(equal, REJECT) <= ALPHA + _slack(runs)


@pytest.mark.parametrize("minted_for", [True, False])
def test_minted_identities_alone_decide_nothing(minted_for: bool) -> None:
    """300 `user` ids under one untrusted key are one rater, and a lone key counts nothing:
    whatever it thumbs, the canary stays undecided."""
    crowd = Crowd(0, minted=300, minted_for=minted_for)
    for p_canary in (0.4, 0.6, 0.8):
        assert {o.verdict for o in simulate(crowd, 0.6, p_canary, 10, seed=3, cap=1000)} == {
            WAIT}


def test_minted_identities_do_not_overrule_honest_raters() -> None:
    """Beside ten honest raters, a key minting 300 ids and thumbing as much as all of them
    together cannot promote a canary the honest raters find 10 points worse, nor reject one
    they find as good; a clearly better or worse canary is still decided by the honest."""
    runs = 60
    pushed = simulate(Crowd(10, minted=300, minted_for=True), 0.6, 0.5, runs, seed=4)
    sunk = simulate(Crowd(10, minted=300, minted_for=False), 0.6, 0.6, runs, seed=5, cap=1000)
    assert rate(pushed, PROMOTE) <= 0.05 + _slack(runs)
    assert rate(sunk, REJECT) <= ALPHA + _slack(runs)
    worse = simulate(Crowd(10, minted=300, minted_for=True), 0.6, 0.4, RUNS, seed=6)
    better = simulate(Crowd(10, minted=300, minted_for=False), 0.6, 0.75, RUNS, seed=7)
    assert rate(worse, PROMOTE) == 0 and rate(worse, REJECT) >= 0.3
    assert rate(better, REJECT) == 0 and rate(better, PROMOTE) >= 0.3


def test_caught_hostile_raters_stall_nothing() -> None:
    """Two raters who thumb against their taste at half the honest volume, once the trainer has
    down-weighted them: ten honest raters still decide a 15-point gain and a 20-point loss."""
    crowd = Crowd(10, hostile=2, hostile_volume=0.5, hostile_weight=0.1)
    assert rate(simulate(crowd, 0.6, 0.75, RUNS, seed=8), PROMOTE) >= 0.9
    assert rate(simulate(crowd, 0.6, 0.4, RUNS, seed=9), REJECT) >= 0.9


@pytest.mark.parametrize("honest", [1, 3, 10])
def test_a_clear_gain_keeps_its_place_and_a_marginal_one_gives_way(honest: int) -> None:
    """`flywheel up`'s canary (half the requests, per request), a newer candidate always
    waiting: a canary with no gain gives way at the minimum nearly always (its test would take
    thousands of thumbs), one 15 points better keeps its place and is promoted in most runs;
    giving way at the minimum whatever the thumbs show cut such a canary short in most runs."""
    runs = 60
    rule = GiveWay.of(CanarySettings())
    flat = simulate(Crowd(honest), 0.3, 0.3, runs, seed=30 + honest, fraction=0.5,
                    give_way=rule)
    better = simulate(Crowd(honest), 0.3, 0.45, runs, seed=40 + honest, fraction=0.5,
                      give_way=rule)
    at_minimum = simulate(Crowd(honest), 0.3, 0.45, runs, seed=40 + honest, fraction=0.5,
                          give_way=GiveWay(rule.after, gain=1.0))
    assert rate(flat, SUPERSEDED) >= 0.9
    assert rate(better, PROMOTE) >= 0.7 and rate(better, SUPERSEDED) <= 0.3
    assert rate(at_minimum, SUPERSEDED) > rate(better, SUPERSEDED) + 0.25
