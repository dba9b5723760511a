"""What one rater may weigh: thumbs pooled across raters for the live decisions.

A thumb's weight in a canary or rollback decision depends on who gave it. Three rules, the same
ones the reward model's data follows (feedback_store/identities.py):

- **A share cap.** Each rater counts at most `identity_cap` thumbs: the most that keeps it within
  a share of what all raters keep, so flooding raises no one's weight. A rater vouched for (no
  API keys, or a trusted key's user) may keep up to twice an equal share (`max(share, 2 / k)`
  of k raters), so a small honest group keeps nearly all it says: its smallest rater never
  drags the others down. An untrusted API key, one rater however many `user` values it sends,
  keeps at most an equal share (`1 / k`), and a key alone in an arm counts nothing: one key
  minting users could be anyone. Past the cap, a rater still counts at its own approval.
- **A trust weight.** A rater whose ratings the reward model in service finds significantly
  inverted (`agreement_weight`) counts with its lower weight.
- **Raters, not thumbs, are the unit of evidence.** Thumbs are clustered by rater, so the
  variance of a pooled approval is the larger of the Bernoulli one at Kish's effective sample
  size and the cluster-robust (sandwich) variance over raters (Cameron & Miller 2015, with the
  K / (K - 1) small-sample factor). A rater who pulls the estimate by s d contributes about
  (s d)^2 to that variance, so no single rater, however weighted, can make a difference look
  significant on its own.

Two designs. Raters sticky to an arm (`pool_arm` per arm): their approvals differ in leniency,
and that spread enters each arm's variance. Raters who see both arms (a canary assigned per
request, `pool_paired`): each rater's own difference between the arms is the datum, so leniency
cancels and a handful of raters who agree on the change can decide it.

**A few raters are judged on their own preferences.** With fewer than `FEW_RATERS` raters, the
spread of their differences says little (three raters give it two degrees of freedom) and the
question is what these people prefer, not what a population of users would: the variance is
theirs alone, each rater's clustered by request (answers to one prompt are alike, so a request's
thumbs are not independent evidence). In its place, `decide_paired` keeps any one rater from
deciding: a verdict stands only if the thumbs without each rater still point its way, and without
an untrusted API key (it could be anyone) still decide it.

**A request's answers from both arms.** A per-request canary splits a request's answers between
the arms (server/canary_split.py): a rater then compares them on the same prompts, and `Shared`
sums over those requests give the covariance of its two approvals, which `difference_variance`
takes off the variance of its difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from flywheel.approval import Arm, CanaryDecision, decide_canary
from flywheel.raters import is_untrusted_key

Counts = tuple[int, int]  # a rater's (thumbs up, thumbs down)
CANARY_UNITS = ("request", "user")  # what a canary assigns to an arm: each request, or each rater
# Fewer raters than this, seeing both arms, are judged on their own preferences (module docstring).
FEW_RATERS = 10


def share_of(raters: int, share: float, *, vouched: bool = True) -> float:
    """The most of what all raters keep that one rater may keep. A rater vouched for: `share`
    in a crowd, twice an equal share among fewer than 2 / share raters. An untrusted key: one
    rater's equal share, however large the crowd (so a key minting ids neither decides nor
    stalls a crowd's canary)."""
    if raters <= 0:
        return 1.0
    if not vouched:
        return 1.0 / raters
    return max(share, min(1.0, 2.0 / raters))


def share_cap(sizes: Sequence[float], s: float) -> float:
    """The largest c with c <= s * sum(min(n_i, c)): the most one rater may keep.

    g(c) = s * sum(min(n_i, c)) - c is concave with g(0) = 0, so the c with g >= 0 form an
    interval [0, c*]; between two sorted sizes g is linear, which gives c* in closed form.
    """
    ordered = sorted(n for n in sizes if n > 0)
    if not ordered:
        return 0.0
    below = 0.0  # sum of the sizes under the current interval
    for j, n in enumerate(ordered):
        above = len(ordered) - j  # raters at or above c in [previous size, n]
        if s * above < 1.0:  # g falls with c here: its root, unless it lies below this interval
            root = s * below / (1.0 - s * above)
            if root <= n:
                return max(root, ordered[j - 1] if j else 0.0)
        below += n
    return ordered[-1]


def identity_cap(counts: Iterable[int], share: float, *, vouched: bool = True) -> int:
    """The most examples (or thumbs) one rater keeps, among raters giving `counts`.

    Against ten honest raters giving n in all, two flooding ones keep c = s (n + 2c) each: at
    s = 0.1, 0.125 n, a tenth of the data each, however much they send.
    """
    sizes = [n for n in counts if n > 0]
    return int(share_cap(sizes, share_of(len(sizes), share, vouched=vouched)) + 1e-9)


def capped_masses(sizes: Mapping[str, float], share: float, *, equal: bool = False
                  ) -> dict[str, float]:
    """Each rater's size cut to its cap (module docstring): raters vouched for at the generous
    share, untrusted keys at an equal one; an untrusted key that is the only rater keeps 0.
    `equal`: every rater at most an equal share (a consensus of the others, where no rater may
    outweigh another)."""
    present = {name: n for name, n in sizes.items() if n > 0}
    if len(present) == 1 and is_untrusted_key(next(iter(present))):
        return dict.fromkeys(present, 0.0)
    k = len(present)
    caps = {vouched: share_cap(list(present.values()),
                               share_of(k, share, vouched=vouched and not equal))
            for vouched in (True, False)}
    return {name: min(n, caps[not is_untrusted_key(name)]) for name, n in present.items()}


def _shrunk(up: float, n: float) -> float:
    return (up + 1) / (n + 2)  # Agresti-Caffo, as flywheel.approval does


def pool_arm(raters: Mapping[str, Counts], *, share: float,
             weights: Mapping[str, float] | None = None) -> Arm:
    """One arm's thumbs (rater -> (up, down)) pooled under the caps and the trust weights (1 for
    raters not in `weights`).

    The Arm's up and down are the weighted counts (their sum is what the decisions' `min_ratings`
    compares with) and its variance is that of the pooled approval (module docstring).
    """
    weights = weights or {}
    masses = capped_masses({name: up + down for name, (up, down) in raters.items()}, share)
    # (mass a_i, approval p_i, thumbs n_i) per rater
    parts = [(weights.get(name, 1.0) * mass, raters[name][0] / sum(raters[name]),
              sum(raters[name])) for name, mass in masses.items()]
    parts = [part for part in parts if part[0] > 0]
    mass = sum(a for a, _, _ in parts)
    if mass <= 0:
        return Arm(0, 0)
    up = sum(a * p for a, p, _ in parts)
    p_hat = up / mass
    # Kish: thumbs of rater i each weigh a_i / n_i.
    effective_n = mass * mass / sum(a * a / n for a, _, n in parts)
    shrunk = _shrunk(up, mass)
    variance = shrunk * (1 - shrunk) / effective_n
    k = len(parts)
    if k > 1:
        sandwich = sum((a * (p - p_hat)) ** 2 for a, p, _ in parts) / (mass * mass)
        variance = max(variance, sandwich * k / (k - 1))
    return Arm(up, mass - up, variance=variance)


@dataclass(frozen=True)
class Clustered:
    """One rater's thumbs on one arm, summed request by request: with u_r up of n_r thumbs on
    request r, the sums of u, n, u^2, u n, n^2 and the requests, enough for the approval and its
    cluster-robust variance. Sums add: the store and the simulation keep them as thumbs come."""

    up: int = 0
    n: int = 0
    up_sq: int = 0
    up_n: int = 0
    n_sq: int = 0
    requests: int = 0

    @classmethod
    def of(cls, requests: Iterable[Counts]) -> Clustered:
        """From (up, down) per request."""
        rows = [(u, u + d) for u, d in requests if u + d]
        return cls(sum(u for u, _ in rows), sum(n for _, n in rows),
                   sum(u * u for u, _ in rows), sum(u * n for u, n in rows),
                   sum(n * n for _, n in rows), len(rows))

    def binomial_variance(self) -> float:
        """Variance of the approval were every thumb independent (Agresti-Caffo)."""
        q = _shrunk(self.up, self.n)
        return q * (1 - q) / self.n

    def variance(self) -> float:
        """Variance of the approval: the larger of the binomial one and the cluster-robust one
        over the requests (Cameron & Miller 2015, with m / (m - 1)), which counts a request
        whose answers are all up or all down as nearer one thumb than several."""
        variance = self.binomial_variance()
        m = self.requests
        if m > 1:
            p = self.up / self.n
            squares = self.up_sq - 2 * p * self.up_n + p * p * self.n_sq
            variance = max(variance, max(0.0, squares) / (self.n * self.n) * m / (m - 1))
        return variance


@dataclass(frozen=True)
class Shared:
    """One rater's requests answered by both arms (a per-request canary splits a request's
    answers between them): with u_c up of n_c canary thumbs and u_a up of n_a active thumbs on
    request r, the sums of u_c u_a, u_c n_a, n_c u_a, n_c n_a and the requests. They give the
    covariance of the rater's two approvals: both arms answered the same prompts, so what a
    prompt does to every answer cancels in their difference."""

    up_up: int = 0
    up_n: int = 0  # u_c n_a
    n_up: int = 0  # n_c u_a
    n_n: int = 0
    requests: int = 0

    @classmethod
    def of(cls, requests: Iterable[tuple[Counts, Counts]]) -> Shared:
        """From ((active up, down), (canary up, down)) per request answered by both arms."""
        rows = [(ua, ua + da, uc, uc + dc) for (ua, da), (uc, dc) in requests
                if ua + da and uc + dc]
        return cls(sum(uc * ua for ua, _, uc, _ in rows), sum(uc * na for _, na, uc, _ in rows),
                   sum(nc * ua for ua, _, _, nc in rows), sum(nc * na for _, na, _, nc in rows),
                   len(rows))


@dataclass(frozen=True)
class PairedThumbs:
    """A canary's thumbs assigned per request: per rater, each arm's `Clustered` sums, and the
    `Shared` ones of requests both arms answered (what `decide_paired` takes), for the arms
    `versions` (active, canary)."""

    versions: tuple[str, str]
    active: dict[str, Clustered] = field(default_factory=dict)
    canary: dict[str, Clustered] = field(default_factory=dict)
    shared: dict[str, Shared] = field(default_factory=dict)


def difference_variance(active: Clustered, canary: Clustered, shared: Shared | None = None
                        ) -> float:
    """Variance of one rater's p_canary - p_active: each arm's own (`Clustered.variance`) less
    twice their cluster-robust covariance over the requests both arms answered, never below the
    binomial variance of independent thumbs."""
    separate = active.variance() + canary.variance()  # both arms rated: n > 0
    if shared is None or shared.requests == 0:
        return separate
    p_a, p_c = active.up / active.n, canary.up / canary.n
    products = shared.up_up - p_a * shared.up_n - p_c * shared.n_up + p_a * p_c * shared.n_n
    m = active.requests + canary.requests - shared.requests
    covariance = products / (active.n * canary.n) * (m / (m - 1) if m > 1 else 1.0)
    binomial = active.binomial_variance() + canary.binomial_variance()
    return max(binomial, separate - 2 * covariance)


def pool_paired(active: Mapping[str, Clustered], canary: Mapping[str, Clustered], *,
                share: float, weights: Mapping[str, float] | None = None,
                shared: Mapping[str, Shared] | None = None,
                few_raters: int = FEW_RATERS) -> tuple[Arm, Arm]:
    """The two arms compared within raters: each rater who rated both contributes its own
    difference d_i = p_canary,i - p_active,i, weighted by its effective thumbs
    n_a n_c / (n_a + n_c) (the inverse of the difference's variance at equal approvals) under
    the caps and the trust weights. Raters who rated one arm only do not count. Thumbs come
    summed per request (`Clustered`), and for requests answered by both arms, `shared`.

    Returns (active, canary) arms whose approvals are the weighted means of the raters' (so
    their difference is the weighted mean difference), whose counts are the thumbs of the
    counted raters (for `min_ratings`), and whose variances add up to that of the difference:
    the raters' own (within each rater, clustered by request), and from `few_raters` raters the
    larger of that and the sandwich over the raters' d_i.
    """
    weights, shared = weights or {}, shared or {}
    both = {name: (active[name], canary[name]) for name in _paired_raters(active, canary)}
    effective = {name: a.n * c.n / (a.n + c.n) for name, (a, c) in both.items()}
    masses = capped_masses(effective, share)
    rows = []  # (w_i, p_a, p_c, variance of d_i, n_a, n_c)
    for name, mass in masses.items():
        w = weights.get(name, 1.0) * mass
        a, c = both[name]
        if w > 0:
            rows.append((w, a.up / a.n, c.up / c.n, difference_variance(a, c, shared.get(name)),
                         a.n, c.n))
    total = sum(w for w, *_ in rows)
    if total <= 0:
        return Arm(0, 0), Arm(0, 0)
    p_a = sum(w * pa for w, pa, *_ in rows) / total
    p_c = sum(w * pc for w, _, pc, *_ in rows) / total
    variance = sum(w * w * v for w, _, _, v, _, _ in rows) / (total * total)
    k = len(rows)
    if k > 1 and len(both) >= few_raters:
        spread = sum((w * ((pc - pa) - (p_c - p_a))) ** 2 for w, pa, pc, *_ in rows)
        variance = max(variance, spread / (total * total) * k / (k - 1))
    n_a = sum(row[4] for row in rows)
    n_c = sum(row[5] for row in rows)
    return (Arm(p_a * n_a, (1 - p_a) * n_a, variance=variance / 2),
            Arm(p_c * n_c, (1 - p_c) * n_c, variance=variance / 2))


def _paired_raters(active: Mapping[str, Clustered], canary: Mapping[str, Clustered]
                   ) -> list[str]:
    """The raters with thumbs on both arms: whom a paired canary compares, and counts against
    `FEW_RATERS`."""
    return sorted(name for name in canary
                  if name in active and active[name].n > 0 and canary[name].n > 0)


def decide_paired(active: Mapping[str, Clustered], canary: Mapping[str, Clustered], *,
                  share: float, min_ratings: int, margin: float, alpha: float,
                  weights: Mapping[str, float] | None = None,
                  shared: Mapping[str, Shared] | None = None,
                  few_raters: int = FEW_RATERS) -> CanaryDecision:
    """`decide_canary` on `pool_paired`'s arms, and with fewer than `few_raters` raters no
    verdict that rests on one of them (module docstring): it waits, naming that rater in
    `tipped_by`, unless the others' thumbs still show the canary not worse by the margin (a
    promotion) or worse (a rejection), and, for an untrusted API key, decide it without it.
    Leaving a rater out can only turn a verdict into a wait, so each error stays at most alpha.
    """
    def decide(a: Mapping[str, Clustered], c: Mapping[str, Clustered]) -> CanaryDecision:
        arms = pool_paired(a, c, share=share, weights=weights, shared=shared,
                           few_raters=few_raters)
        return decide_canary(*arms, min_ratings=min_ratings, margin=margin, alpha=alpha)

    decision = decide(active, canary)
    raters = _paired_raters(active, canary)
    if decision.verdict == "wait" or not 1 < len(raters) < few_raters:
        return decision
    for name in raters:
        rest = decide({k: v for k, v in active.items() if k != name},
                      {k: v for k, v in canary.items() if k != name})
        if is_untrusted_key(name):
            holds = rest.verdict == decision.verdict
        elif not (rest.active.n and rest.canary.n):
            holds = True  # nobody else counts (a lone untrusted key): nothing to overturn
        elif decision.verdict == "promote":
            holds = rest.shown > -margin
        else:
            holds = rest.shown < 0
        if not holds:
            return replace(decision, verdict="wait", tipped_by=name, without=rest.shown)
    return decision


def canary_unit(setting: str, raters: int, sticky_raters: int) -> str:
    """What a new canary assigns to an arm: the setting, or for "auto" each request while fewer
    than `sticky_raters` raters rate (they then see both arms, compared within each rater by
    `pool_paired`), each rater from there (`pool_arm` per arm; nobody's answers flip)."""
    if setting != "auto":
        return setting
    return "request" if raters < sticky_raters else "user"
