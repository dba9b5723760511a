"""Feedback as training data: reward-model groups, TRL export rows, PPO prompt samples."""

from __future__ import annotations

from feedback_store import PreferenceGroup, Store, ThumbExample
from feedback_store.training_data import is_holdout

from .conftest import add_completion


def _ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _rate(store: Store, cid: str, index: int, rating: str) -> None:
    store.add_feedback(completion_id=cid, choice_index=index, rating=rating)


def _seed_feedback(store: Store) -> None:
    """A ranking of 3 on "Q1"; on "Q2" two ups, one down; on "Q3" an up and a down on one answer."""
    add_completion(store, "chatcmpl-1", prompt="Q1", texts=("good", "ok", "bad"))
    store.add_ranking(items=[("chatcmpl-1", 0), ("chatcmpl-1", 1), ("chatcmpl-1", 2)])
    add_completion(store, "cmpl-2", prompt="Q2", texts=("yes", "no"), kind="text")
    add_completion(store, "cmpl-3", prompt="Q2", texts=("sure",), kind="text")
    _rate(store, "cmpl-2", 1, "down")
    _rate(store, "cmpl-2", 0, "up")
    _rate(store, "cmpl-3", 0, "up")
    add_completion(store, "chatcmpl-4", prompt="Q3", texts=("same",))
    _rate(store, "chatcmpl-4", 0, "up")
    _rate(store, "chatcmpl-4", 0, "down")


def test_reward_data(store: Store) -> None:
    _seed_feedback(store)
    data = store.reward_data()
    assert data.groups == [
        PreferenceGroup(_ids("Q1"), [_ids("good"), _ids("ok"), _ids("bad")], "ranking"),
        PreferenceGroup(_ids("Q2"), [_ids("yes"), _ids("no")], "thumbs"),
    ]
    assert data.thumbs == [
        ThumbExample(_ids("Q2"), _ids("sure"), True),
        ThumbExample(_ids("Q3"), _ids("same"), True),
        ThumbExample(_ids("Q3"), _ids("same"), False),
    ]


def test_export_preferences_in_trl_formats(store: Store) -> None:
    _seed_feedback(store)
    rows = list(store.export_preferences())
    chat_q1 = [{"role": "user", "content": "Q1"}]

    def said(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    pairs = [r for r in rows if "chosen" in r]
    assert pairs == [
        {"prompt": chat_q1, "chosen": said("good"), "rejected": said("ok")},
        {"prompt": chat_q1, "chosen": said("good"), "rejected": said("bad")},
        {"prompt": chat_q1, "chosen": said("ok"), "rejected": said("bad")},
        {"prompt": "Q2", "chosen": "yes", "rejected": "no"},
    ]
    labels = [r for r in rows if "label" in r]
    assert labels == [
        {"prompt": "Q2", "completion": "no", "label": False},
        {"prompt": "Q2", "completion": "yes", "label": True},
        {"prompt": "Q2", "completion": "sure", "label": True},
        {"prompt": [{"role": "user", "content": "Q3"}], "completion": said("same"), "label": True},
        {"prompt": [{"role": "user", "content": "Q3"}], "completion": said("same"), "label": False},
    ]
    assert len(rows) == len(pairs) + len(labels)


def test_sample_prompts(store: Store) -> None:
    for n in range(40):
        add_completion(store, f"cmpl-{n}", prompt=f"question {n}", texts=("a",), kind="text")
    train = store.sample_prompts(10, seed=1)
    assert train == store.sample_prompts(10, seed=1)
    assert train != store.sample_prompts(10, seed=2)
    assert len({p.id for p in train}) == 10
    assert not any(is_holdout(p.id) for p in train)
    held = store.sample_prompts(100, seed=1, holdout=True)
    assert held and all(is_holdout(p.id) for p in held)
    assert len(held) + len(store.sample_prompts(100, seed=1)) == 40
    first = train[0]
    assert first.prompt_token_ids == _ids(first.prompt_text) and first.messages is None


def test_sample_prompts_falls_back_to_all(store: Store) -> None:
    assert store.sample_prompts(4, seed=0) == []
    add_completion(store, "chatcmpl-1", prompt="only one")
    (prompt,) = store.sample_prompts(4, seed=0)
    assert store.sample_prompts(4, seed=0, holdout=True) == [prompt]
    assert prompt.messages == [{"role": "user", "content": "only one"}]
