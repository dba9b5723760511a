"""The trust weight's rule, simulated: which raters the reward model in service down-weights.

Each rater's new events are judged by the RM in service (`trainer_worker.reward.consensus`):
an event agrees when the RM orders it the rater's way. An honest rater agrees at the RM's
accuracy on the crowd's taste, give or take its own taste (``taste_sd``); a hostile rater thumbs
against its taste, so it agrees as often as an honest one disagrees; an untrusted key minting
`user` ids is one identity (`flywheel.raters.Rater`) thumbing as much as all honest raters
together, inverted. The rule is the store's own: `agreement_weight` on each identity's tallies,
and no judging at all by a model trained on fewer than `MIN_CROSS_FIT_RATERS` identities.
`bench/trust_weights.py` prints the table; `tests/trainer_worker/test_trust_scenarios.py` checks
its targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feedback_store.identities import agreement_weight
from trainer_worker.reward.consensus import MIN_CROSS_FIT_RATERS

DOWN = 0.1  # `FeedbackLimits.disagreeing_weight`'s default


@dataclass(frozen=True)
class TrustCrowd:
    honest: int
    hostile: int = 0  # at ``hostile_volume`` of an honest rater's mean
    minted: bool = False  # one untrusted key, as much as all honest raters together
    hostile_volume: float = 0.5
    taste_sd: float = 0.08  # of an honest rater's agreement with the RM, around its accuracy
    activity_sd: float = 1.0  # log-normal volumes

    @property
    def identities(self) -> int:
        return self.honest + self.hostile + int(self.minted)


@dataclass(frozen=True)
class Verdicts:
    honest_down: int  # honest raters down-weighted (false)
    hostile_caught: int
    key_caught: bool


def review(crowd: TrustCrowd, accuracy: float, events: float,
           rng: np.random.Generator) -> Verdicts:
    """One review of ``events`` new events per honest rater (on average) against an RM of
    ``accuracy`` on the crowd's taste."""
    if crowd.identities < MIN_CROSS_FIT_RATERS:
        return Verdicts(0, 0, False)  # a model of so few raters judges no one
    volumes = rng.lognormal(0.0, crowd.activity_sd, crowd.honest)
    volumes *= events / volumes.mean()
    honest = _down(rng.poisson(volumes), _agreement(crowd, accuracy, crowd.honest, rng), rng)
    hostile = _down(rng.poisson(crowd.hostile_volume * events, crowd.hostile),
                    1.0 - _agreement(crowd, accuracy, crowd.hostile, rng), rng)
    key = bool(crowd.minted and _down(rng.poisson([volumes.sum()]),
                                      np.array([1.0 - accuracy]), rng))
    return Verdicts(honest, hostile, key)


def _agreement(crowd: TrustCrowd, accuracy: float, n: int,
               rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.normal(accuracy, crowd.taste_sd, n), 0.01, 0.99)


def _down(scored: np.ndarray, agree: np.ndarray, rng: np.random.Generator) -> int:
    agreed = rng.binomial(scored, agree)
    return sum(agreement_weight(int(s), int(a), DOWN) < 1.0
               for s, a in zip(scored, agreed, strict=True))


def rates(crowd: TrustCrowd, accuracy: float, events: float, runs: int,
          seed: int = 0) -> tuple[float, float, float]:
    """Over ``runs`` reviews: the share of honest raters down-weighted, of hostile raters
    caught, and of runs where the minting key was caught."""
    rng = np.random.default_rng(seed)
    found = [review(crowd, accuracy, events, rng) for _ in range(runs)]
    honest = sum(v.honest_down for v in found) / (runs * crowd.honest)
    hostile = (sum(v.hostile_caught for v in found) / (runs * crowd.hostile)
               if crowd.hostile else float("nan"))
    key = sum(v.key_caught for v in found) / runs if crowd.minted else float("nan")
    return honest, hostile, key
