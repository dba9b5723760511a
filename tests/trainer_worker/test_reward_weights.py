"""Weighted reward losses against naive loops; agreement tallies with the RM in service."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from feedback_store.identities import Tally, agreement_weight
from feedback_store.types import PreferenceGroup, RewardData, ThumbExample
from flywheel.settings import RewardConfig
from trainer_worker.reward import RewardModel
from trainer_worker.reward.consensus import (
    agreement_tallies,
    cross_fitted_tallies,
    new_event_counts,
)
from trainer_worker.reward.losses import bradley_terry_loss, pointwise_logistic_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_weighted_bradley_terry_matches_naive_loop() -> None:
    scores = torch.randn(7, generator=torch.Generator().manual_seed(0))
    sizes, weights = [3, 2, 2], [1.0, 0.1, 0.0]
    s, start, terms = scores.tolist(), 0, []
    for size, weight in zip(sizes, weights, strict=True):
        pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
        terms.append(weight * sum(-log_sigmoid(s[start + i] - s[start + j])
                                  for i, j in pairs) / len(pairs))
        start += size
    expected = sum(terms) / len(sizes)  # divided by the groups, not by the weights
    loss = bradley_terry_loss(scores, sizes, weights=torch.tensor(weights))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert bradley_terry_loss(scores, sizes, weights=torch.ones(3)).item() == pytest.approx(
        bradley_terry_loss(scores, sizes).item())
    leaf = scores.clone().requires_grad_(True)
    bradley_terry_loss(leaf, sizes, weights=torch.tensor(weights)).backward()
    assert torch.all(leaf.grad[5:] == 0)  # a group of weight 0 pulls nothing


def test_weighted_pointwise_loss() -> None:
    scores, labels = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0])
    weights = torch.tensor([1.0, 2.0, 0.0])
    naive = [-(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x)) * w
             for x, y, w in zip(scores.tolist(), labels.tolist(), weights.tolist(), strict=True)]
    loss = pointwise_logistic_loss(scores, labels, weights)
    assert loss.item() == pytest.approx(sum(naive) / 3, rel=1e-5)


def test_agreement_tallies(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two raters who say opposite things about the same answers: the RM agrees with exactly
    one of them on each; replayed (old) examples are not judged again."""
    RewardModel.from_base(tiny_model_dir, seed=3).save_pretrained(tmp_path / "rm")
    a, b = [5, 6, 7], [8, 9]
    groups = [PreferenceGroup([1, 2], [a, b], "thumbs", identity="user:x"),
              PreferenceGroup([1, 2], [b, a], "thumbs", identity="user:y"),
              PreferenceGroup([1, 2], [a, b, [10]], "ranking", identity="user:x", new=False)]
    thumbs = [ThumbExample([3], a, True, identity="user:x"),
              ThumbExample([3], a, False, identity="user:y")]
    data = RewardData(groups=groups, thumbs=thumbs)
    tallies = agreement_tallies(tmp_path / "rm", data, max_length=64)
    assert tallies["user:x"].events == tallies["user:y"].events == 2
    assert tallies["user:x"].scored == tallies["user:y"].scored == 2
    assert tallies["user:x"].agreed + tallies["user:y"].agreed == 2
    assert new_event_counts(data) == {"user:x": Tally(events=2), "user:y": Tally(events=2)}


def _preferences(identity: str, n: int, rng: random.Random, *, inverted: bool
                 ) -> list[PreferenceGroup]:
    """`n` comparisons of an answer of tokens 10-19 with one of tokens 30-39 (every honest rater
    prefers the first kind), the other way round when `inverted`."""
    groups = []
    for _ in range(n):
        prompt = [rng.randrange(40, 60) for _ in range(3)]
        good = [rng.randrange(10, 20) for _ in range(4)]
        bad = [rng.randrange(30, 40) for _ in range(4)]
        answers = [bad, good] if inverted else [good, bad]
        groups.append(PreferenceGroup(prompt, answers, "ranking", identity=identity))
    return groups


def test_first_cycle_judges_each_rater_by_a_model_of_the_others(tiny_model_dir: Path) -> None:
    """Before any RM is in service: eight honest raters and two who invert every comparison, as
    many as the eight together. Each half of the raters is judged by an RM fitted on the other
    half, so the flood is caught in the very first cycle and no honest rater is; a half's RM
    that fails the held-out floor judges no one."""
    rng = random.Random(0)
    honest = [f"user:h{i}" for i in range(8)]
    groups = [g for name in honest for g in _preferences(name, 20, rng, inverted=False)]
    groups += [g for name in ("user:x", "user:y") for g in _preferences(name, 80, rng,
                                                                     inverted=True)]
    data = RewardData(groups=groups, thumbs=[])
    held_out = RewardData(_preferences("user:h0", 40, rng, inverted=False), [])
    cfg = RewardConfig(lr=1e-3, epochs=3)
    tallies = cross_fitted_tallies(tiny_model_dir, data, cfg, share=0.1, holdout=held_out,
                                   floor=0.55)
    weights = {name: agreement_weight(t.scored, t.agreed, 0.1) for name, t in tallies.items()}
    assert weights == {**dict.fromkeys(honest, 1.0), "user:x": 0.1, "user:y": 0.1}, tallies
    assert all(t.events == t.scored for t in tallies.values())  # every new event judged once
    # Held-out feedback the halves' RMs cannot rank (it says the opposite): they judge no one.
    inverted = RewardData(_preferences("user:h0", 40, rng, inverted=True), [])
    unjudged = cross_fitted_tallies(tiny_model_dir, data, cfg, share=0.1, holdout=inverted,
                                    floor=0.55)
    assert unjudged == new_event_counts(data)
    few = RewardData(groups=groups[:60], thumbs=[])  # three raters: no consensus of others
    assert cross_fitted_tallies(tiny_model_dir, few, cfg, share=0.1, holdout=held_out,
                                floor=0.55) == new_event_counts(few)


@pytest.mark.slow
def test_the_cold_start_finds_hostile_raters_whatever_the_folds(tiny_model_dir: Path) -> None:
    """Ten honest raters and two who invert every comparison at half their volume, under 20
    assignments of names (so of the cross-fitting folds) and seeds, with the hostile raters'
    pairs a third of the held-out set too (held-out judging leaves out a minority it finds
    inverted): no honest rater is ever down-weighted, and both hostile raters are caught in
    the first cycle in all 20. A fold whose judge misses the floor (pulled by a hostile rater
    of another fold) is judged again by one fitted without the raters caught meanwhile: 19 of
    20 without that second round (assignment 8)."""
    cfg = RewardConfig(lr=1e-3, epochs=3)
    caught = 0
    for assignment in range(20):
        rng = random.Random(assignment)
        honest = [f"user:h{assignment}-{i}" for i in range(10)]
        hostile = [f"user:x{assignment}-{i}" for i in range(2)]
        groups = [g for name in honest for g in _preferences(name, 20, rng, inverted=False)]
        groups += [g for name in hostile for g in _preferences(name, 50, rng, inverted=True)]
        held = [g for name in honest for g in _preferences(name, 4, rng, inverted=False)]
        held += [g for name in hostile for g in _preferences(name, 10, rng, inverted=True)]
        tallies = cross_fitted_tallies(tiny_model_dir, RewardData(groups=groups, thumbs=[]),
                                       cfg, share=0.1, holdout=RewardData(held, []), floor=0.55)
        weights = {name: agreement_weight(t.scored, t.agreed, 0.1)
                   for name, t in tallies.items()}
        assert all(weights[name] == 1.0 for name in honest), (assignment, tallies)
        caught += all(weights[name] == 0.1 for name in hostile)
    assert caught == 20, caught
