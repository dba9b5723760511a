"""Simulated raters for the live decisions: honest ones with a spread of tastes, hostile ones who
thumb against their taste, and one untrusted API key minting `user` ids.

Thumbs reach a canary and the active version one at a time; the judge's own rules decide
(`flywheel.rater_pooling`, `flywheel.approval.decide_canary`, with the settings' defaults). The
tests in tests/flywheel/test_rater_scenarios.py and tests/flywheel/test_rater_pooling.py check the
rates at sizes that take seconds; bench/canary_decision.py prints them for 1 to 1,000 raters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flywheel.approval import Arm, GiveWay, decide_canary
from flywheel.rater_pooling import (
    FEW_RATERS,
    Clustered,
    Shared,
    canary_unit,
    decide_paired,
    pool_arm,
)

FRACTION = 0.2  # the settings' defaults (flywheel/settings.py, CanarySettings)
MIN_RATINGS = 100
MARGIN = 0.02
ALPHA = 0.05
SHARE = 0.1  # feedback.user_share
STICKY_RATERS = 200  # canary.sticky_raters
WAIT, PROMOTE, REJECT, SUPERSEDED = 0, 1, 2, 3
MINTED = "key:minted"  # all identities of one untrusted key pool as this one rater


@dataclass(frozen=True)
class Crowd:
    """Who rates. Honest raters approve the active version at `p_active` moved by their own
    leniency (sd `spread`) and see the canary's effect moved by their own taste (sd `taste_sd`,
    the canary's effect on average); their activity is log-normal (sd `activity_sd`). `hostile`
    raters thumb against their taste, together `hostile_volume` times the honest volume.
    `minted` > 0: one untrusted key posts `minted_volume` times the honest volume under that
    many `user` ids, thumbing the canary up and the active version down (`minted_for`) or the
    reverse."""

    honest: int
    spread: float = 0.15
    taste_sd: float = 0.05
    activity_sd: float = 1.0
    hostile: int = 0
    hostile_volume: float = 0.5
    hostile_weight: float = 1.0  # their trust weight: 1 until the trainer has caught them
    minted: int = 0
    minted_volume: float = 1.0
    minted_for: bool = True

    @property
    def raters(self) -> int:
        """Raters as the rules count them: the minted identities are one."""
        return self.honest + self.hostile + (1 if self.minted else 0)


@dataclass(frozen=True)
class Outcome:
    verdict: int  # WAIT, PROMOTE or REJECT
    canary_thumbs: int  # on the canary when decided (or at the cap)


def simulate(crowd: Crowd, p_active: float, p_canary: float, runs: int, seed: int, *,
             unit: str = "auto", cap: int = 3000, growth: float = 1.03,
             pooled: bool = True, fraction: float = FRACTION,
             min_ratings: int = MIN_RATINGS, give_way: GiveWay | None = None,
             answers: int = 1, prompt_sd: float = 0.0, mixed: bool = False,
             few_raters: int = FEW_RATERS) -> list[Outcome]:
    """The first verdict of each simulated canary, checked each time the thumbs grew by
    `growth` (checking less often than the judge can only lower the error rates), until `cap`
    canary thumbs. `pooled=False`: each arm's plain counts, every thumb independent evidence
    (what the rules replaced, for comparison). `fraction`, `min_ratings`: the canary settings
    (the defaults', or `flywheel up`'s). `give_way`: an undecided canary that the rule lets go
    ends SUPERSEDED (as if a newer candidate always waited: the most it can be cut short).
    `answers`: thumbs per request, every answer of a request rated, its approvals moved
    together by the prompt (sd `prompt_sd`): answers to one prompt are alike. `mixed` (per
    request): each request's answers split between the arms (`canary_answers`), so both arms
    answer the same prompts and the judge also gets each rater's `Shared` sums. `few_raters`:
    the judge's (`rater_pooling.decide_paired`)."""
    rng = np.random.default_rng(seed)
    unit = canary_unit(unit, crowd.raters, STICKY_RATERS)
    return [_one_canary(crowd, p_active, p_canary, unit, cap, growth, pooled, fraction,
                        min_ratings, give_way, answers, prompt_sd, mixed, few_raters, rng)
            for _ in range(runs)]


def canary_answers(answers: int, fraction: float, draws: np.ndarray) -> np.ndarray:
    """The server's split of a request's answers: floor(n f) to the canary and one more with
    probability frac(n f) (`draws`, uniform on [0, 1), one a request); with one answer, the
    canary with probability f. Which of the n answers they are is drawn too, but thumbs here
    come a request at a time, so only how many counts."""
    whole, part = divmod(answers * fraction, 1.0)
    return (whole + (draws < part)).astype(np.int64)


def request_thumbs(p: np.ndarray, counts: np.ndarray, prompt_sd: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Thumbs up per arm and request, given each request's approvals `p` and answers `counts`
    on each arm (both shaped (arm, request)): the prompt moves both arms' approvals of a
    request alike (sd `prompt_sd`; minted thumbs, always up or down, it moves not). Drawn
    request by request, so a request on one arm only draws as if the other were not there."""
    if prompt_sd > 0:
        moved = (p > 0) & (p < 1)
        p = np.where(moved, np.clip(p + rng.normal(0, prompt_sd, p.shape[1]), 0.01, 0.99), p)
    return rng.binomial(counts.T, p.T).T


# Sums kept per arm and rater, as `Clustered` holds them: up, n, up^2, up n, n^2, requests;
# and per rater, as `Shared` holds them: u_c u_a, u_c n_a, n_c u_a, n_c n_a, requests.
_SUMS = 6
_SHARED = 5


def _one_canary(crowd: Crowd, p_active: float, p_canary: float, unit: str, cap: int,
                growth: float, pooled: bool, fraction: float, min_ratings: int,
                give_way: GiveWay | None, answers: int, prompt_sd: float, mixed: bool,
                few_raters: int, rng: np.random.Generator) -> Outcome:
    names, p_a, p_c, activity = _raters(crowd, p_active, p_canary, rng)
    weights = {name: crowd.hostile_weight for name in names if name.startswith("user:x")}
    total = len(names)
    sticky_canary = rng.random(total) < fraction
    requests = cap * 8 // answers
    order = rng.choice(total, size=requests, p=activity / activity.sum())
    draws = rng.random(requests)
    per_request = draws < fraction
    to_canary = per_request if unit == "request" else sticky_canary[order]
    if mixed and unit == "request":
        on_canary = canary_answers(answers, fraction, draws)
    else:
        on_canary = answers * to_canary
    counts = np.stack([answers - on_canary, on_canary])  # (arm, request)
    up = request_thumbs(np.stack([p_a[order], p_c[order]]), counts, prompt_sd, rng)
    # Each arm's row of a request it answered, and the two arms' products where both did.
    rows = np.stack([up, counts, up * up, up * counts, counts * counts, counts > 0], axis=-1)
    both = (counts > 0).all(axis=0)
    products = np.stack([up[1] * up[0], up[1] * counts[0], counts[1] * up[0],
                         counts[1] * counts[0], both], axis=-1)
    sums = np.zeros((2, total, _SUMS), dtype=np.int64)  # arm (0 active, 1 canary), rater
    shared = np.zeros((total, _SHARED), dtype=np.int64)
    start = 0
    while start < requests:
        stop = max(start + 20, int(start * growth))
        arm, at = np.nonzero(counts[:, start:stop])
        np.add.at(sums, (arm, order[start + at]), rows[arm, start + at])
        if mixed:
            at = start + np.flatnonzero(both[start:stop])
            np.add.at(shared, order[at], products[at])
        start = stop
        arms = _arms(sums, names)
        canary_thumbs = int(sums[1, :, 1].sum())
        if not pooled:
            decision = decide_canary(*(Arm(int(sums[a, :, 0].sum()),
                                           int((sums[a, :, 1] - sums[a, :, 0]).sum()))
                                       for a in (0, 1)),
                                     min_ratings=min_ratings, margin=MARGIN, alpha=ALPHA)
        elif unit == "request":
            decision = decide_paired(arms[0], arms[1], share=SHARE, weights=weights,
                                     min_ratings=min_ratings, margin=MARGIN, alpha=ALPHA,
                                     shared=_shared(shared, names) if mixed else None,
                                     few_raters=few_raters)
        else:
            decision = decide_canary(
                *(pool_arm({name: (c.up, c.n - c.up) for name, c in arms[a].items()},
                           share=SHARE, weights=weights) for a in (0, 1)),
                min_ratings=min_ratings, margin=MARGIN, alpha=ALPHA)
        if give_way is not None and give_way.due(decision):
            return Outcome(SUPERSEDED, canary_thumbs)
        if decision.verdict != "wait" or canary_thumbs >= cap:
            verdict = {"wait": WAIT, "promote": PROMOTE, "reject": REJECT}[decision.verdict]
            return Outcome(verdict, canary_thumbs)
    return Outcome(WAIT, int(sums[1, :, 1].sum()))


def _raters(crowd: Crowd, p_active: float, p_canary: float, rng: np.random.Generator
            ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Each simulated rater's identity, approvals of the two arms and activity."""
    n = crowd.honest + crowd.hostile
    lenient = rng.normal(0.0, crowd.spread, n)
    # Tastes differ, but the raters' average effect is the canary's: the truth the rules decide.
    taste = rng.normal(0.0, crowd.taste_sd, n)
    effect = p_canary - p_active + taste - (taste.mean() if n else 0.0)
    p_a = np.clip(p_active + lenient, 0.02, 0.98)
    p_c = np.clip(p_active + lenient + effect, 0.02, 0.98)
    p_a[crowd.honest:], p_c[crowd.honest:] = 1 - p_a[crowd.honest:], 1 - p_c[crowd.honest:]
    activity = rng.lognormal(0.0, crowd.activity_sd, crowd.honest)
    honest_volume = activity.sum() if crowd.honest else 1.0
    if crowd.hostile:
        activity = np.concatenate([activity, np.full(
            crowd.hostile, honest_volume * crowd.hostile_volume / crowd.hostile)])
    names = [f"user:h{i}" for i in range(crowd.honest)]
    names += [f"user:x{i}" for i in range(crowd.hostile)]
    if crowd.minted:
        names.append(MINTED)
        up = 1.0 if crowd.minted_for else 0.0
        p_a, p_c = np.append(p_a, 1 - up), np.append(p_c, up)
        activity = np.append(activity, honest_volume * crowd.minted_volume)
    return names, p_a, p_c, activity


def _arms(sums: np.ndarray, names: list[str]) -> list[dict[str, Clustered]]:
    """Per arm, rater -> its thumbs summed per request, for raters with thumbs there."""
    return [{names[i]: Clustered(*(int(x) for x in sums[arm, i])) for i in
             np.flatnonzero(sums[arm, :, 1])} for arm in (0, 1)]


def _shared(shared: np.ndarray, names: list[str]) -> dict[str, Shared]:
    """Per rater with requests answered by both arms, their `Shared` sums."""
    return {names[i]: Shared(*(int(x) for x in shared[i]))
            for i in np.flatnonzero(shared[:, -1])}


def rate(outcomes: list[Outcome], verdict: int) -> float:
    return sum(o.verdict == verdict for o in outcomes) / len(outcomes)


def thumbs_to(outcomes: list[Outcome], verdict: int, q: float = 0.5) -> float | None:
    """The q-quantile of canary thumbs among runs that reached `verdict` (None: none did)."""
    found = [o.canary_thumbs for o in outcomes if o.verdict == verdict]
    return float(np.quantile(found, q)) if found else None
