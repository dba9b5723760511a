"""Trust weights kept current during a canary: two raters who rank the same two answers of one
prompt opposite ways, against a reward model in service; one of them disagrees with it on every
pair and loses weight at the review, before any cycle stores anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.training_data import is_holdout_hash
from flywheel.settings import FeedbackLimits, Settings, TrainSettings
from trainer_worker import rater_review
from trainer_worker.rater_review import RaterReview
from trainer_worker.reward import RewardModel


def _train_split_prompt() -> str:
    """A prompt text in the training split (the split hashes the text; 80% are in it)."""
    return next(text for text in (f"What is {i}?" for i in range(100))
                if not is_holdout_hash(hashlib.sha256(text.encode()).hexdigest()))


def _ranked(store: Store, cid: str, prompt: str, user: str, order: list[int]) -> None:
    store.record_completion(NewCompletion(
        id=cid, kind="text", prompt_text=prompt, prompt_token_ids=[1, 2], messages=None,
        model="flywheel", policy_version="policy-0", params={},
        choices=[NewChoice(0, "a", [5, 6, 7], [-0.1] * 3, "stop"),
                 NewChoice(1, "b", [8, 9], [-0.1] * 2, "stop")]))
    store.add_ranking(items=[(cid, i) for i in order], user=user)


def rm_1_in_service(store: Store, tiny_model_dir: Path, tmp_path: Path,
                    raters: str = "pqrs") -> None:
    """A reward model in service, trained (as far as the store knows) on the rankings of
    ``raters``: four stand for a consensus that judges the raters who come after."""
    for name in raters:
        _ranked(store, f"cmpl-{name}", _train_split_prompt(), name, [0, 1])
    until = store.feedback_watermark()
    RewardModel.from_base(tiny_model_dir, seed=3).save_pretrained(tmp_path / "rm")
    store.add_reward_model(id="rm-1", parent=None, path=str(tmp_path / "rm"), sha256=None,
                           watermark=until)


def test_review_down_weights_the_rater_the_rm_disagrees_with(
        sqlite_url: str, tiny_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(sqlite_url)
    store.upgrade()
    rm_1_in_service(store, tiny_model_dir, tmp_path)
    monkeypatch.setattr(rater_review, "REVIEW_EVENTS", 40)  # a review every 10 new events
    settings = Settings(train=TrainSettings(min_new_feedback=1),
                        feedback=FeedbackLimits(disagreeing_weight=0.1))
    review = RaterReview(settings, store)
    prompt = _train_split_prompt()
    for i in range(3):
        _ranked(store, f"cmpl-x{i}", prompt, "x", [0, 1])
        _ranked(store, f"cmpl-y{i}", prompt, "y", [1, 0])
    few = review.weights(["user:x", "user:y"])
    assert few == {"user:x": 1.0, "user:y": 1.0}  # 3 disagreements: not yet significant
    for i in range(3, 12):
        _ranked(store, f"cmpl-x{i}", prompt, "x", [0, 1])
        _ranked(store, f"cmpl-y{i}", prompt, "y", [1, 0])
    weights = review.weights(["user:x", "user:y", "user:z"])
    assert sorted(weights.values()) == [0.1, 1.0, 1.0] and weights["user:z"] == 1.0
    # Nothing was stored: the next cycle scores these events once and stores them then.
    assert store.identity_weights(["user:x", "user:y"]) == {"user:x": 1.0, "user:y": 1.0}
    store.close()


@pytest.mark.parametrize("raters", ["", "x", "xyz"])
def test_a_model_of_fewer_than_four_raters_judges_no_one(
        raters: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same events, the RM in service trained on the feedback of no rater, of one of them
    alone, or of three: it stands for no consensus of others, so it judges no one (a lone
    rater's weight once fell to a weak early model of its own taste, and then no pair was left
    to judge any later model by)."""
    store = Store(sqlite_url)
    store.upgrade()
    rm_1_in_service(store, tiny_model_dir, tmp_path, raters)
    monkeypatch.setattr(rater_review, "REVIEW_EVENTS", 40)
    review = RaterReview(Settings(train=TrainSettings(min_new_feedback=1),
                                  feedback=FeedbackLimits(disagreeing_weight=0.1)), store)
    prompt = _train_split_prompt()
    for i in range(12):
        _ranked(store, f"cmpl-x{i}", prompt, "x", [0, 1])
        _ranked(store, f"cmpl-y{i}", prompt, "y", [1, 0])
    assert review.weights(["user:x", "user:y"]) == {"user:x": 1.0, "user:y": 1.0}
    store.close()
