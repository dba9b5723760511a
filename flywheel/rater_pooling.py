"""What one rater may weigh: thumbs pooled across identities for the live decisions.

A thumb's weight in a canary or rollback decision depends on who gave it. Two rules, the same
ones the reward model's data follows (feedback_store/identities.py):

- **A share cap.** Each identity counts at most `identity_cap` thumbs in an arm: the most that
  keeps it within `share` of what all identities keep, so flooding raises no one's weight.
  Past the cap, an identity still counts at its own approval rate, over `cap` thumbs.
- **A trust weight.** An identity whose ratings the reward model in service finds significantly
  inverted (`agreement_weight`) counts with its lower weight.

Thumbs with no identity (no `user`, no API key) count one rater each: nothing tells them apart.

Users are sticky to an arm and differ in taste, so an arm's thumbs are clustered by identity,
not independent. `pool_arm` returns the pooled approval with the larger of two variances: the
Bernoulli one at Kish's effective sample size (what independent thumbs with these weights would
give) and the cluster-robust (sandwich) variance of the ratio estimator over identities (Cameron &
Miller 2015, with the K / (K - 1) small-sample factor), which grows with the spread of raters'
approvals. With one thumb per rater and weights 1 both equal the plain binomial variance, so the
decisions of `flywheel.approval` are unchanged there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flywheel.approval import Arm


def identity_cap(counts: Iterable[int], share: float, *, singles: int = 0) -> int:
    """The most examples one identity keeps: the largest c with c <= s * sum(min(n_i, c)), where
    s = max(share, 1 / identities) (with fewer than 1/share identities no cap can hold, and equal
    shares come closest). `singles` counts raters of one example each, beside `counts`.

    The cap counts only what identities keep, so flooding raises no one's cap: against ten honest
    raters giving n in all, two flooding ones keep c = 0.1 (n + 2c), 0.125 n each, a tenth of the
    data each. g(c) = s * sum(min(n_i, c)) - c is concave with g(0) = 0, so the c with g >= 0
    form an interval, found by bisection.
    """
    sizes = [n for n in counts if n > 0]
    if not sizes and singles <= 0:
        return 0
    s = max(share, 1.0 / (len(sizes) + max(0, singles)))
    low, high = 0, max([*sizes, 1])
    while low < high:
        mid = (low + high + 1) // 2
        if mid <= s * (sum(min(n, mid) for n in sizes) + max(0, singles)) + 1e-9:
            low = mid
        else:
            high = mid - 1
    return low


def pool_arm(raters: Mapping[str, tuple[int, int]], *, share: float,
             weights: Mapping[str, float] | None = None,
             unattributed: tuple[int, int] = (0, 0)) -> Arm:
    """One arm's thumbs, `raters` (identity -> (up, down)) and `unattributed` (up, down) with no
    identity, pooled under the cap and the weights (1 for identities not in `weights`).

    The Arm's up and down are the weighted counts (their sum is what the decisions' `min_ratings`
    compares with) and its variance is that of the pooled approval (module docstring).
    """
    weights = weights or {}
    clusters = [(up, down, weights.get(name, 1.0)) for name, (up, down) in raters.items()
                if up + down > 0]
    lone_up, lone_down = unattributed
    cap = identity_cap((up + down for up, down, _ in clusters), share,
                       singles=lone_up + lone_down)
    # (mass a_i, approval p_i, thumbs n_i) per cluster; unattributed thumbs as clusters of one.
    parts = [(w * min(up + down, cap), up / (up + down), up + down) for up, down, w in clusters]
    parts += [(1.0, 1.0, 1)] * lone_up + [(1.0, 0.0, 1)] * lone_down
    parts = [part for part in parts if part[0] > 0]
    mass = sum(a for a, _, _ in parts)
    if mass <= 0:
        return Arm(0, 0)
    up = sum(a * p for a, p, _ in parts)
    p_hat = up / mass
    # Kish: thumbs of cluster i each weigh a_i / n_i.
    effective_n = mass * mass / sum(a * a / n for a, _, n in parts)
    shrunk = (up + 1) / (mass + 2)  # Agresti-Caffo, as flywheel.approval does
    variance = shrunk * (1 - shrunk) / effective_n
    k = len(parts)
    if k > 1:
        sandwich = sum((a * (p - p_hat)) ** 2 for a, p, _ in parts) / (mass * mass)
        variance = max(variance, sandwich * k / (k - 1))
    return Arm(up, mass - up, variance=variance)
