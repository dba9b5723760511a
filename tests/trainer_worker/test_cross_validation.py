"""Cross-validation over prompts: each judged pair is judged by an RM blind to its prompt."""

from __future__ import annotations

from feedback_store.types import PreferenceGroup, RewardData, ThumbExample
from trainer_worker.reward.cross_validation import (
    FOLDS,
    cross_validated_pair_count,
    folds_of,
    prompt_fold,
)


def _data(prompts: int) -> RewardData:
    groups = [PreferenceGroup(prompt_token_ids=[1, p], answers=[[5, p], [6, p]], source="ranking",
                              identity=f"user:r{p % 3}") for p in range(prompts)]
    thumbs = [ThumbExample(prompt_token_ids=[2, p], answer_token_ids=[7, p], label=bool(p % 2),
                           identity="user:r0") for p in range(prompts)]
    return RewardData(groups, thumbs)


def test_each_fold_judges_only_prompts_its_rm_never_trains_on() -> None:
    data = _data(60)
    folds = folds_of(data)
    assert len(folds) == FOLDS
    judged_prompts: list[tuple[int, ...]] = []
    for train, judged in folds:
        trained = {tuple(x.prompt_token_ids) for x in [*train.groups, *train.thumbs]}
        own = {tuple(x.prompt_token_ids) for x in [*judged.groups, *judged.thumbs]}
        assert own and not own & trained
        assert len(train.groups) + len(judged.groups) == len(data.groups)
        judged_prompts += [tuple(x.prompt_token_ids) for x in [*judged.groups, *judged.thumbs]]
    # Every example is judged exactly once.
    assert sorted(judged_prompts) == sorted(tuple(x.prompt_token_ids)
                                            for x in [*data.groups, *data.thumbs])


def test_a_prompt_keeps_its_fold() -> None:
    assert prompt_fold([3, 1, 4, 1, 5]) == prompt_fold([3, 1, 4, 1, 5])
    assert len({prompt_fold([i, i + 1]) for i in range(100)}) == FOLDS


def test_the_pair_count_counts_only_the_judges() -> None:
    data = _data(60)
    everyone = cross_validated_pair_count(data)
    assert everyone >= 60  # one pair per group, and r0's thumbs paired within each fold
    assert cross_validated_pair_count(data, judges={"user:r1"}) == 20
    assert cross_validated_pair_count(data, judges=set()) == 0


def test_implicit_signals_train_but_never_judge() -> None:
    data = _data(60)
    signals = [ThumbExample(prompt_token_ids=[3, p], answer_token_ids=[8, p], label=bool(p % 2),
                            identity="user:r0", weight=0.2, source="implicit")
               for p in range(60)]
    with_signals = RewardData(data.groups, [*data.thumbs, *signals])
    assert cross_validated_pair_count(with_signals) == cross_validated_pair_count(data)
    assert all(signals[0] in train.thumbs or signals[0] in judged.thumbs
               for train, judged in folds_of(with_signals)[:1])
