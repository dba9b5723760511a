"""Live approval statistics: intervals for one version, and the decisions between two.

Pure Python (no torch, no database): the server shows these numbers, the worker acts on them.
The decisions use an always-valid confidence sequence for the difference of two approvals, so
the worker may re-check them after every new thumb without inflating its error rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from flywheel.settings import CanarySettings

Z95 = 1.959963984540054  # two-sided 95% normal quantile

# Mixing scale of the normal mixture, in approval points. Johari et al. (2017, sec. 4) match tau
# to the effects one expects: the boundary is tightest for |Δ| of the order of tau. The decisions
# here turn on 10-20 point moves; at 4:1 traffic and p = 0.5, tau = 0.1 needs the fewest canary
# ratings of tau in [0.03, 0.3] to narrow the interval to 10-12 points (bench/canary_decision.py).
TAU = 0.1

Verdict = Literal["promote", "reject", "wait"]
Evidence = dict[str, float | int | str]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None without observations.

    Wilson (1927); preferred over the Wald interval because it stays inside [0, 1] and keeps its
    coverage at small n and extreme proportions (Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Arm:
    """Thumbs on the answers of one policy version.

    Plain counts, or weighted ones pooled across raters (flywheel/rater_pooling.py), which carry
    the variance of their approval; plain counts get the binomial one.
    """

    up: float
    down: float
    variance: float | None = None

    @property
    def n(self) -> float:
        """Ratings received (their total weight, when pooled)."""
        return self.up + self.down

    @property
    def approval(self) -> float | None:
        """Share of thumbs up; None before the first rating."""
        return self.up / self.n if self.n else None


def _variance(arm: Arm) -> float:
    """Variance of one arm's approval: the pooled arm's own, else binomial with Agresti-Caffo's
    +1 up, +1 down (Agresti & Caffo 2000).

    The shrunk proportion keeps the variance positive for an arm that is all up or all down,
    where the plain plug-in p(1-p)/n would be 0 and the interval would collapse to a point.
    """
    if arm.variance is not None:
        return arm.variance
    p = (arm.up + 1) / (arm.n + 2)
    return p * (1 - p) / arm.n


def mixture_half_width(v: float, *, alpha: float, tau: float = TAU) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate of variance `v`.

    Robbins (1970); Johari, Pekelis & Walsh, "Always valid inference" (2017), eq. for the
    mSPRT with a N(0, tau^2) mixture: the set of Δ whose mixture likelihood ratio is below 1/alpha,
    w = sqrt(v (v + tau^2) / tau^2 * (log((v + tau^2) / v) - 2 log alpha)).
    """
    t2 = tau * tau
    return math.sqrt(v * (v + t2) / t2 * (math.log((v + t2) / v) - 2 * math.log(alpha)))


def difference_sequence(
    active: Arm, canary: Arm, *, alpha: float, tau: float = TAU
) -> tuple[float, float]:
    """Always-valid 1-alpha interval for Δ = p_canary - p_active, clipped to [-1, 1].

    Covers Δ at every rating simultaneously (time-uniform), so it may be checked after each new
    thumb. Two-sample Bernoulli difference with the plug-in variance
    V = pc(1-pc)/nc + pa(1-pa)/na (Johari et al. 2017, sec. 4.2). (-1, 1) while an arm is empty.
    """
    if active.n == 0 or canary.n == 0:
        return -1.0, 1.0
    diff = canary.up / canary.n - active.up / active.n
    half = mixture_half_width(_variance(active) + _variance(canary), alpha=alpha, tau=tau)
    return max(-1.0, diff - half), min(1.0, diff + half)


def _comparison(prefix: str, active: Arm, other: Arm, interval: tuple[float, float]) -> Evidence:
    """Flat evidence for one comparison: counts, approvals, difference and interval bounds."""
    out: Evidence = {
        "active_ratings": active.n,
        f"{prefix}_ratings": other.n,
        "low": interval[0],
        "high": interval[1],
    }
    # JSON has no NaN: an approval (and so the difference) is left out while its arm is empty.
    if active.approval is not None:
        out["active_approval"] = active.approval
    if other.approval is not None:
        out[f"{prefix}_approval"] = other.approval
    if active.approval is not None and other.approval is not None:
        out["difference"] = other.approval - active.approval
    return out


@dataclass(frozen=True)
class CanaryDecision:
    """What the live thumbs say about a canary, and why."""

    verdict: Verdict
    interval: tuple[float, float]  # always-valid interval for p_canary - p_active
    active: Arm
    canary: Arm
    min_ratings: int
    margin: float
    alpha: float
    tau: float = TAU
    # A verdict held back because it rested on one rater (`rater_pooling.decide_paired`): who,
    # and the difference the others' thumbs show without them.
    tipped_by: str | None = None
    without: float | None = None

    @property
    def shown(self) -> float:
        """The difference of approvals the thumbs show, canary minus active (0 while empty)."""
        return (self.canary.approval or 0.0) - (self.active.approval or 0.0)

    def evidence(self) -> Evidence:
        """Flat, JSON-able record of the decision, stored with the version's metrics."""
        out = _comparison("canary", self.active, self.canary, self.interval)
        out.update(
            rule="msprt-noninferiority",
            verdict=self.verdict,
            min_ratings=self.min_ratings,
            margin=self.margin,
            alpha=self.alpha,
            tau=self.tau,
        )
        if self.tipped_by is not None:
            out["tipped_by"] = self.tipped_by
        if self.without is not None:
            out["difference_without"] = self.without
        return out


def decide_canary(
    active: Arm, canary: Arm, *, min_ratings: int, margin: float, alpha: float
) -> CanaryDecision:
    """Promote, reject or keep waiting on a canary, from the thumbs so far.

    Wait until both arms have `min_ratings`; then reject when the always-valid interval shows
    the canary worse (high < 0), else promote when it shows it not worse by more than `margin`
    (low > -margin), else wait. Reject wins when both hold (a canary shown worse never ships).
    Each error is at most alpha, however often this is called (Johari et al. 2017).
    """
    interval = difference_sequence(active, canary, alpha=alpha)
    verdict: Verdict = "wait"
    if min(active.n, canary.n) >= min_ratings:
        if interval[1] < 0:
            verdict = "reject"
        elif interval[0] > -margin:
            verdict = "promote"
    return CanaryDecision(verdict, interval, active, canary, min_ratings, margin, alpha)


@dataclass(frozen=True)
class GiveWay:
    """When an undecided canary gives way to a newer waiting candidate (``canary.supersede_*``).

    Ending a canary undecided changes no decision's error rate; what it costs is churn: a
    better canary cut short. At ``after`` counted thumbs on each arm a canary whose thumbs show
    a gain under ``gain`` gives way (a marginal canary takes thousands of thumbs to decide, and
    the newer candidate was trained on more feedback); one that shows more keeps its place until
    ``always_after``. By simulation (bench/canary_decision.py --give-way), a 15-point gain gives
    way in 8-35% of runs this way, against 51-87% at ``after`` alone. ``after`` <= 0: never.
    """

    after: float
    gain: float = 0.05
    always_after: float = 0.0

    @classmethod
    def of(cls, canary: CanarySettings) -> GiveWay:
        """The rule of ``canary.supersede_*``, in thumbs (multiples of ``min_ratings``)."""
        return cls(canary.supersede_after * canary.min_ratings, canary.supersede_gain,
                   canary.supersede_always_after * canary.min_ratings)

    def due(self, decision: CanaryDecision) -> bool:
        """Whether ``decision`` (undecided) has had its thumbs; a newer candidate must wait too."""
        if decision.verdict != "wait" or self.after <= 0:
            return False
        counted = min(decision.active.n, decision.canary.n)
        if counted < self.after:
            return False
        return decision.shown < self.gain or 0 < self.always_after <= counted

    def describe(self) -> str:
        """The rule in words, for a waiting canary's reason."""
        if self.after <= 0:
            return ""
        text = (f"a newer candidate takes its place from {self.after:.0f} counted thumbs on each "
                f"arm while they show a gain under {self.gain * 100:+.0f} points")
        if self.always_after > 0:
            text += f", from {self.always_after:.0f} whatever they show"
        return text


def regression(
    active: tuple[str, Arm], others: dict[str, Arm], *, min_ratings: int, alpha: float
) -> tuple[str, Evidence] | None:
    """The stored version users rate significantly better than the active one, if any.

    For "no forgetting" rollback. Each other version is compared with the active one by the same
    confidence sequence at alpha / len(others) (Bonferroni), so the chance of any false alarm
    stays below alpha under continuous monitoring; with both arms at `min_ratings` or more it
    counts as better when low > 0. Of several, the one with the highest lower bound wins (the
    surest gain). Its thumbs are older than the active one's: drift in users shows up here too.
    """
    name, arm = active
    level = alpha / max(1, len(others))
    best: tuple[str, Evidence] | None = None
    best_low = 0.0
    for other_name, other in sorted(others.items()):
        if min(arm.n, other.n) < min_ratings:
            continue
        interval = difference_sequence(arm, other, alpha=level)
        if interval[0] > best_low:
            best_low = interval[0]
            evidence = _comparison("version", arm, other, interval)
            evidence.update(
                rule="msprt-superiority-bonferroni",
                active=name,
                version=other_name,
                comparisons=len(others),
                alpha=alpha,
                alpha_each=level,
                tau=TAU,
                min_ratings=min_ratings,
            )
            best = other_name, evidence
    return best
