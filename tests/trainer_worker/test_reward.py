"""Reward model: losses against naive loops, save/load, readout, training and interruption."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from feedback_store.types import PreferenceGroup, RewardData, ThumbExample
from flywheel.settings import RewardConfig
from trainer_worker.reward import RewardModel, TrainingInterrupted, train_reward_model
from trainer_worker.reward.data import pad_right, preference_pairs, strip_eos, thumb_pairs
from trainer_worker.reward.losses import (
    bradley_terry_loss,
    count_pairs,
    group_pairs,
    pairwise_accuracy,
    pointwise_logistic_loss,
)

MARKER = 42  # the feature the synthetic preferences reward


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_loss_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [4, 2, 1, 3]  # a ranking of 4, a thumbs pair, a lone answer (no pairs), a ranking of 3
    scores = torch.randn(sum(sizes), generator=gen)
    group_losses = []
    start = 0
    for k in sizes:
        group = scores[start : start + k].tolist()
        start += k
        pairs = list(itertools.combinations(range(k), 2))  # (i, j): i ranked above j
        if pairs:
            losses = [-log_sigmoid(group[i] - group[j]) for i, j in pairs]
            group_losses.append(sum(losses) / len(pairs))
    expected = sum(group_losses) / len(group_losses)
    assert bradley_terry_loss(scores, sizes).item() == pytest.approx(expected, rel=1e-5)
    accuracy, n_pairs = pairwise_accuracy(scores, sizes)
    assert n_pairs == 6 + 1 + 0 + 3
    correct, start = 0, 0
    for k in sizes:
        group = scores[start : start + k].tolist()
        start += k
        correct += sum(group[i] > group[j] for i, j in itertools.combinations(range(k), 2))
    assert accuracy == pytest.approx(correct / n_pairs)


def test_tied_answers_form_no_pairs() -> None:
    """Answers of one tier are tied: no loss pair, no accuracy pair (ranking tiers)."""
    gen = torch.Generator().manual_seed(2)
    sizes = [4, 3, 2]
    tiers = [[0, 0, 1, 2], None, [0, 0]]  # a tie on top; a strict order; a fully tied pair
    scores = torch.randn(sum(sizes), generator=gen)
    winners, losers, pair_group = group_pairs(sizes, tiers=tiers)
    expected = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 5), (4, 6), (5, 6)]
    assert list(zip(winners.tolist(), losers.tolist(), strict=True)) == expected
    assert pair_group.tolist() == [0] * 5 + [1] * 3
    assert count_pairs(sizes, tiers) == len(expected)
    s = scores.tolist()
    group_losses = [sum(-log_sigmoid(s[i] - s[j]) for i, j in expected[:5]) / 5,
                    sum(-log_sigmoid(s[i] - s[j]) for i, j in expected[5:]) / 3]
    loss = bradley_terry_loss(scores, sizes, tiers)
    assert loss.item() == pytest.approx(sum(group_losses) / 2, rel=1e-5)  # the tied group: none
    accuracy, n_pairs = pairwise_accuracy(scores, sizes, tiers)
    assert n_pairs == 8
    assert accuracy == pytest.approx(sum(s[i] > s[j] for i, j in expected) / 8)
    all_tied = torch.zeros(3, requires_grad=True)
    tied_loss = bradley_terry_loss(all_tied, [3], [[1, 1, 1]])
    tied_loss.backward()
    assert tied_loss.item() == 0.0
    groups = [PreferenceGroup([3], [[5], [6], [7]], "ranking", tiers=[0, 1, 1]),
              PreferenceGroup([3], [[5], [6]], "thumbs")]
    assert preference_pairs(groups) == 2 + 1
    with pytest.raises(ValueError):
        group_pairs([3], tiers=[[0, 1]])


def test_bradley_terry_loss_without_pairs_is_zero_and_differentiable() -> None:
    scores = torch.zeros(2, requires_grad=True)
    loss = bradley_terry_loss(scores, [1, 1])
    loss.backward()
    assert loss.item() == 0.0


def test_pointwise_logistic_loss_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(5, generator=gen)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    expected = [-(log_sigmoid(s) if y else log_sigmoid(-s)) for s, y in
                zip(scores.tolist(), labels.tolist(), strict=True)]
    got = pointwise_logistic_loss(scores, labels).item()
    assert got == pytest.approx(sum(expected) / 5, rel=1e-5)
    assert pointwise_logistic_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_strip_eos_keeps_content_only() -> None:
    assert strip_eos([5, 6, 1, 7, 1], [1]) == [5, 6]
    assert strip_eos([5, 6], [1]) == [5, 6]
    assert strip_eos([2, 5], [1, 2]) == []


def test_save_and_reload_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = RewardModel.from_base(tiny_model_dir, seed=3)
    model.score_mean, model.score_std = 0.5, 2.0
    model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    again = RewardModel.from_pretrained(tmp_path / "rm")
    assert (again.score_mean, again.score_std) == (0.5, 2.0)
    assert again.eos_token_ids == model.eos_token_ids
    ids, mask = pad_right([[3, 10, 11, 12], [3, 20]])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), again(ids, mask))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_head_init_and_padding_side(tiny_model_dir: Path) -> None:
    model = RewardModel.from_base(tiny_model_dir)
    d = model.head.in_features
    assert model.head.weight.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.3)
    assert not model.training
    seq = [3, 10, 11, 12, 13]
    right_ids, right_mask = pad_right([seq, [3, 7]])
    left_ids = torch.tensor([seq, [0, 0, 0, 3, 7]])
    left_mask = (torch.arange(5) >= torch.tensor([[0], [3]])).long()
    with torch.no_grad():
        right, left = model(right_ids, right_mask), model(left_ids, left_mask)
    assert torch.allclose(right, left, atol=1e-5)


def synthetic_data(n_groups: int, seed: int) -> RewardData:
    """Rankings of 3 random answers where more MARKER tokens rank higher, plus lone thumbs.

    Fillers come from 60 token ids: with the whole vocabulary, 60 groups are too few for a
    tiny trunk to see past the noise.
    """
    rng = random.Random(seed)

    def answer(markers: int) -> list[int]:
        tokens = [rng.randrange(100, 160) for _ in range(rng.randrange(6, 12))]
        tokens = [t for t in tokens if t != MARKER]
        for _ in range(markers):
            tokens.insert(rng.randrange(len(tokens) + 1), MARKER)
        return tokens

    groups, thumbs = [], []
    for _ in range(n_groups):
        prompt = [rng.randrange(100, 160) for _ in range(rng.randrange(3, 8))]
        groups.append(PreferenceGroup(prompt, [answer(2), answer(1), answer(0)], "ranking"))
        label = rng.random() < 0.5
        thumbs.append(ThumbExample(prompt, answer(2 if label else 0), label))
    return RewardData(groups=groups, thumbs=thumbs)


@pytest.mark.slow
def test_reward_model_learns_a_shared_feature(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = RewardConfig(lr=1e-3, epochs=3, batch_size=8)
    data = synthetic_data(80, seed=0)
    train = RewardData(groups=data.groups[:60], thumbs=data.thumbs[:60])
    holdout = RewardData(groups=data.groups[60:], thumbs=data.thumbs[60:])
    metrics = train_reward_model(tiny_model_dir, train, cfg, tmp_path / "rm", holdout=holdout,
                                 progress=False)
    assert metrics["reward/accuracy"] > 0.8
    assert metrics["reward/accuracy_low"] < metrics["reward/accuracy"]
    assert metrics["reward/accuracy_low"] > 0.6  # 60 held-out pairs show it beats chance
    assert metrics["reward/groups"] == 60 and metrics["reward/pairs"] == 180
    # The groups' 60 pairs, and the lone thumbs' ups and downs paired across prompts.
    crossed = len(thumb_pairs(holdout.thumbs))
    assert crossed > 0
    assert metrics["reward/holdout_pairs"] == 60 + crossed
    assert metrics["reward/holdout_groups"] == 20
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["reward/score_std"] > 0
    # Continue training from the saved reward model (the next cycle's path).
    again = train_reward_model(tmp_path / "rm", synthetic_data(20, seed=1),
                               cfg.model_copy(update={"epochs": 1}), tmp_path / "rm2",
                               holdout=holdout, progress=False)
    assert again["reward/accuracy"] > 0.8


def test_interrupted_training_writes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    calls = iter(range(100))
    with pytest.raises(TrainingInterrupted):
        train_reward_model(tiny_model_dir, synthetic_data(16, seed=0), RewardConfig(batch_size=4),
                           tmp_path / "rm", progress=False, should_stop=lambda: next(calls) >= 2)
    assert not (tmp_path / "rm").exists()


def test_reward_data_is_required(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_reward_model(tiny_model_dir, RewardData(), RewardConfig(), tmp_path / "rm")


def test_lone_thumbs_pair_within_a_rater_across_prompts() -> None:
    """Held-out judging pairs one rater's lone ups with its lone downs, each thumb once, never
    two raters' thumbs."""
    def thumb(rater: str, up: bool, prompt: int) -> ThumbExample:
        return ThumbExample([prompt], [prompt + 100], up, identity=rater)

    thumbs = [thumb("a", True, 1), thumb("a", True, 2), thumb("a", False, 3),
              thumb("b", True, 4), thumb("c", False, 5), thumb("c", False, 6)]
    pairs = thumb_pairs(thumbs)
    assert [(up.prompt_token_ids, down.prompt_token_ids) for up, down in pairs] == [([1], [3])]
    assert all(up.identity == down.identity and up.label and not down.label
               for up, down in pairs)
