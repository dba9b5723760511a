"""Ratings a canary decision needs, and its error rates, under continuous monitoring.

    python bench/canary_decision.py [--runs 1000] [--seed 0]

Simulates Bernoulli thumbs reaching the arms 1:4 (canary fraction 0.2), checks
`flywheel.approval.decide_canary` after every rating with the default settings (min_ratings 100,
margin 0.02, alpha 0.05) and caps each run at 5000 canary ratings. Prints, at base approvals 0.5
and 0.7, the ratings per arm needed to reject a 20-point-worse canary and to promote a
10-point-better one (median and p90), the false-promotion rate of a 10-point-worse canary, the
false-rejection rate of an equal one and the promotion rate of a canary exactly `margin` worse
(the worst case of the non-inferiority test, at most alpha / 2 in theory); then the canary
ratings the always-valid interval needs to narrow to a given half-width for several mixing
scales tau (the choice of TAU). Last, with raters: users sticky to an arm who differ in taste and
volume, and hostile users who thumb against their taste; the verdict rates of plain counts
beside thumbs pooled across raters (flywheel/rater_pooling.py), as tests/flywheel/
test_rater_pooling.py checks them at smaller sizes. Then "who counts": 1 to 1,000 honest raters with
a spread of tastes, the same with two hostile raters at half their volume (before and after the
trainer catches them), and one untrusted key minting 300 `user` ids, alone and beside honest
raters (tests/simulated_raters.py; tests/flywheel/test_rater_scenarios.py checks the targets).
`--only-who --answers 3 --prompt-sd 0.2 --fraction 0.5 --mixed` prints that table for `flywheel
up`'s canary with each request's answers split between the arms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel import rater_pooling
from flywheel.approval import TAU, GiveWay, mixture_half_width
from flywheel.settings import CanarySettings
from tests.flywheel.test_approval import (
    ALPHA,
    CAP,
    FRACTION,
    MARGIN,
    MIN_RATINGS,
    PROMOTE,
    REJECT,
    simulate_canary,
)
from tests.simulated_raters import FRACTION as RATER_FRACTION
from tests.simulated_raters import SUPERSEDED, Crowd, simulate, thumbs_to
from tests.simulated_raters import rate as crowd_rate

RATER_SCENARIOS = (  # (label, crowd, p_active, p_canary): raters sticky to an arm
    ("equal, raters differ", Crowd(60, spread=0.2, taste_sd=0.0, activity_sd=1.5), 0.5, 0.5),
    ("equal, 300 raters", Crowd(300, spread=0.2, taste_sd=0.0, activity_sd=1.5), 0.5, 0.5),
    ("10 pts worse, differ", Crowd(60, spread=0.2, taste_sd=0.0, activity_sd=1.5), 0.5, 0.4),
    ("+25, 2 hostile, caught", Crowd(10, spread=0.05, taste_sd=0.0, activity_sd=0.3, hostile=2,
                                     hostile_volume=1.0, hostile_weight=0.1), 0.3, 0.55),
    ("+25, 2 hostile, uncaught", Crowd(10, spread=0.05, taste_sd=0.0, activity_sd=0.3,
                                       hostile=2, hostile_volume=1.0), 0.3, 0.55),
    ("-20, 2 hostile, uncaught", Crowd(10, spread=0.05, taste_sd=0.0, activity_sd=0.3,
                                       hostile=2, hostile_volume=1.0), 0.5, 0.3),
)


def _rater_rows(runs: int, seed: int) -> None:
    print(f"\nwith raters (sticky, 3000 canary thumbs at most, {runs} runs):")
    print(f"{'scenario':<26} {'p_a':>4} {'p_c':>4} {'plain: promote':>15} {'reject':>7}"
          f" {'pooled: promote':>16} {'reject':>7}")
    for label, crowd, p_a, p_c in RATER_SCENARIOS:
        plain = simulate(crowd, p_a, p_c, runs, seed, unit="user", pooled=False)
        pooled = simulate(crowd, p_a, p_c, runs, seed, unit="user")
        print(f"{label:<26} {p_a:>4.2f} {p_c:>4.2f} "
              f"{crowd_rate(plain, PROMOTE):>15.1%} {crowd_rate(plain, REJECT):>7.1%} "
              f"{crowd_rate(pooled, PROMOTE):>16.1%} {crowd_rate(pooled, REJECT):>7.1%}")


WHO_COUNTS = [  # (label, crowd): 1 to 1,000 honest raters, hostile ones, minted identities
    *((f"{n} honest", Crowd(n)) for n in (1, 3, 10, 100, 1000)),
    *((f"{n} honest + 2 hostile", Crowd(n, hostile=2, hostile_volume=0.5)) for n in (3, 10, 100)),
    *((f"{n} honest + 2 hostile, caught", Crowd(n, hostile=2, hostile_volume=0.5,
                                                 hostile_weight=0.1)) for n in (3, 10, 100)),
    ("300 minted ids, one key", Crowd(0, minted=300)),
    *((f"{n} honest + 300 minted for", Crowd(n, minted=300)) for n in (3, 10, 100)),
    *((f"{n} honest + 300 minted against", Crowd(n, minted=300, minted_for=False))
      for n in (3, 10, 100)),
]


def _who_counts_rows(runs: int, seed: int, answers: int = 1, prompt_sd: float = 0.0,
                     fraction: float = RATER_FRACTION, mixed: bool = False,
                     crowds: str | None = None,
                     few_raters: int = rater_pooling.FEW_RATERS) -> None:
    """Per crowd: canary thumbs to decide a 10- and a 20-point difference (median, p90 of the
    runs that did, and the share that did within 3,000), false promotion of a 10-point-worse
    canary and false rejection of an equal one (within 1,000). `answers`, `prompt_sd`: thumbs
    per request and how alike a request's answers are; `fraction`: the canary's share;
    `mixed`: each request's answers split between the arms (per request only; `simulate`).
    `crowds`: only the rows whose label contains it; `few_raters`: the judge's."""
    print(f"\nwho counts ({runs} runs each; canary unit auto: per request under 200 raters;"
          f" fraction {fraction}; {answers} thumb(s) a request, prompt sd {prompt_sd}"
          f"{', split between the arms' if mixed else ''}; thumbs are canary thumbs;"
          f" raters' spread counted from {max(2, few_raters)} raters):")
    clustered = {"answers": answers, "prompt_sd": prompt_sd, "fraction": fraction,
                 "mixed": mixed, "few_raters": few_raters}
    head = ("+10: done", "median", "p90", "-20: done", "median", "p90", "false +", "false -")
    print(f"{'crowd':<34} " + " ".join(f"{c:>9}" for c in head))
    for i, (label, crowd) in enumerate(WHO_COUNTS):
        if crowds is not None and crowds not in label:
            continue
        cells = []
        for p_canary, verdict in ((0.7, PROMOTE), (0.4, REJECT)):
            out = simulate(crowd, 0.6, p_canary, runs, seed + i, **clustered)
            median, p90 = thumbs_to(out, verdict), thumbs_to(out, verdict, 0.9)
            cells += [f"{crowd_rate(out, verdict):.0%}", _thumbs(median), _thumbs(p90)]
        false_promotion = crowd_rate(simulate(crowd, 0.6, 0.5, runs, seed + i, cap=1000,
                                              **clustered), PROMOTE)
        false_rejection = crowd_rate(simulate(crowd, 0.6, 0.6, runs, seed + i, cap=1000,
                                              **clustered), REJECT)
        cells += [f"{false_promotion:.1%}", f"{false_rejection:.1%}"]
        print(f"{label:<34} " + " ".join(f"{c:>9}" for c in cells), flush=True)


GIVE_WAY_EFFECTS = (-0.1, 0.0, 0.03, 0.1, 0.15, 0.2)


def _give_way_rows(runs: int, seed: int) -> None:
    """`flywheel up`'s canary (half the requests), a newer candidate always waiting: per crowd
    and true effect, the share of canaries promoted (P) and cut short (S) under the default
    rule (`GiveWay.of` the defaults: at the minimum while showing under +5 points, at three
    times the minimum whatever they show) beside giving way at the minimum whatever."""
    rule = GiveWay.of(CanarySettings())
    rules = (("default", rule), ("at minimum", GiveWay(rule.after, gain=1.0)))
    print(f"\ngive way ({runs} runs each; fraction 0.5, a newer candidate always waiting; "
          "P promoted, S gave way):")
    print(f"{'crowd':<12} {'p_a':>4} {'rule':<11} "
          + " ".join(f"{d * 100:>+10.0f}" for d in GIVE_WAY_EFFECTS))
    for honest in (1, 3, 10, 100, 1000):
        for p_active in (0.1, 0.3):
            for name, give_way in rules:
                cells = []
                for i, effect in enumerate(GIVE_WAY_EFFECTS):
                    out = simulate(Crowd(honest), p_active, max(0.0, p_active + effect), runs,
                                   seed + i, fraction=0.5, give_way=give_way)
                    promoted, gave_way = crowd_rate(out, PROMOTE), crowd_rate(out, SUPERSEDED)
                    cells.append(f"P{promoted:.0%} S{gave_way:.0%}")
                print(f"{f'{honest} honest':<12} {p_active:>4.1f} {name:<11} "
                      + " ".join(f"{c:>10}" for c in cells), flush=True)


def _thumbs(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratings_row(label: str, p_active: float, p_canary: float, code: int, runs: int, seed: int):
    """One line: share reaching the right verdict, and median / p90 ratings per arm when it did."""
    result = simulate_canary(p_active, p_canary, runs, seed)
    ok = result.verdict == code
    c50, c90 = np.percentile(result.canary_n[ok], [50, 90]) if ok.any() else (np.nan, np.nan)
    a50, a90 = np.percentile(result.active_n[ok], [50, 90]) if ok.any() else (np.nan, np.nan)
    print(
        f"{label:<22} {p_active:>4.2f} {p_canary:>4.2f} {ok.mean():>7.1%} "
        f"{c50:>7.0f} {c90:>7.0f} {a50:>7.0f} {a90:>7.0f}"
    )


def _error_row(label: str, p_active: float, p_canary: float, code: int, runs: int, seed: int):
    """One line: share of runs that reached the wrong verdict `code` before the cap."""
    result = simulate_canary(p_active, p_canary, runs, seed)
    rate = result.rate(code)
    se = (rate * (1 - rate) / runs) ** 0.5
    print(f"{label:<22} {p_active:>4.2f} {p_canary:>4.2f} {rate:>7.2%} ± {se:.2%} (1 s.e.)")


def _needed(target: float, tau: float, p: float = 0.5) -> int:
    """Canary ratings at 4:1 traffic for the interval's half-width to fall to `target`."""
    nc = 1
    while (
        mixture_half_width(
            p * (1 - p) * (1 / nc + FRACTION / ((1 - FRACTION) * nc)), alpha=ALPHA, tau=tau
        )
        > target
    ):
        nc += 1
    return nc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="simulated canaries per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rater-runs", type=int, default=200,
                        help="simulated canaries per scenario with raters (slower)")
    parser.add_argument("--who-runs", type=int, default=100,
                        help="simulated canaries per crowd in the 'who counts' table")
    parser.add_argument("--only-who", action="store_true", help="print that table alone")
    parser.add_argument("--answers", type=int, default=1,
                        help="'who counts': thumbs per request (every answer of it rated)")
    parser.add_argument("--prompt-sd", type=float, default=0.0,
                        help="'who counts': sd of a request's shared shift of approval")
    parser.add_argument("--fraction", type=float, default=RATER_FRACTION,
                        help="'who counts': the canary's share of requests (flywheel up: 0.5)")
    parser.add_argument("--mixed", action="store_true",
                        help="'who counts': each request's answers split between the arms")
    parser.add_argument("--crowds", default=None,
                        help="'who counts': only the crowds whose label contains this")
    parser.add_argument("--few-raters", type=int, default=rater_pooling.FEW_RATERS,
                        help="'who counts': raters from which their spread counts (2: any "
                             "group, the rule before small groups were judged on their own)")
    parser.add_argument("--give-way", action="store_true",
                        help="print the table of undecided canaries giving way alone")
    args = parser.parse_args()
    started = time.monotonic()
    if args.give_way:
        _give_way_rows(args.who_runs, args.seed)
        print(f"\n{time.monotonic() - started:.1f} s")
        return
    if args.only_who:
        _who_counts_rows(args.who_runs, args.seed, args.answers, args.prompt_sd,
                         args.fraction, args.mixed, args.crowds, args.few_raters)
        print(f"\n{time.monotonic() - started:.1f} s")
        return
    print(
        f"decide_canary checked after every rating: fraction {FRACTION}, min_ratings {MIN_RATINGS},"
        f" margin {MARGIN}, alpha {ALPHA}, tau {TAU}, cap {CAP} canary ratings, {args.runs} runs\n"
    )
    columns = ("reached", "canary", "p90", "active", "p90")
    print(f"{'scenario':<22} {'p_a':>4} {'p_c':>4} " + " ".join(f"{c:>7}" for c in columns))
    for base in (0.5, 0.7):
        _ratings_row("reject 20 pts worse", base, base - 0.2, REJECT, args.runs, args.seed)
        _ratings_row("promote 10 pts better", base, base + 0.1, PROMOTE, args.runs, args.seed + 1)
        _ratings_row("promote equal", base, base, PROMOTE, args.runs, args.seed + 2)
    print(f"\n{'error':<22} {'p_a':>4} {'p_c':>4} {'rate':>7}")
    for base in (0.5, 0.7):
        _error_row("false promotion (-10)", base, base - 0.1, PROMOTE, args.runs, args.seed + 3)
        _error_row("false rejection (=)", base, base, REJECT, args.runs, args.seed + 4)
        _error_row("promotion at -margin", base, base - MARGIN, PROMOTE, args.runs, args.seed + 5)
    targets = (0.2, 0.12, 0.1, 0.05, 0.02)
    print("\ncanary ratings (p = 0.5, 4:1) for the interval's half-width to fall to:")
    print(f"{'tau':>5} " + " ".join(f"{t:>6.2f}" for t in targets))
    for tau in (0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3):
        print(f"{tau:>5.2f} " + " ".join(f"{_needed(t, tau):>6d}" for t in targets))
    _rater_rows(args.rater_runs, args.seed)
    _who_counts_rows(args.who_runs, args.seed, few_raters=args.few_raters)
    print(f"\n{time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
