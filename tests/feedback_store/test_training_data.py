"""Feedback as training data: reward-model groups, TRL export rows, PPO prompt samples."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from feedback_store import NewChoice, NewCompletion, PreferenceGroup, Store, ThumbExample
from feedback_store.training_data import is_holdout_hash

from .conftest import add_completion


def _ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _prompt(stem: str, *, holdout: bool) -> str:
    """The first of `stem`, `stem 1`, `stem 2`, ... on the wanted side of the held-out split."""
    for n in range(1000):
        text = f"{stem} {n}" if n else stem
        if is_holdout_hash(hashlib.sha256(text.encode()).hexdigest()) == holdout:
            return text
    raise AssertionError("no such prompt")


def _stored_holdout(store: Store) -> dict[int, bool]:
    with store.engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, holdout FROM prompts")).tuples().all())


def _rate(store: Store, cid: str, index: int, rating: str, user: str | None = None) -> None:
    store.add_feedback(completion_id=cid, choice_index=index, rating=rating, user=user)


def _seed_feedback(store: Store) -> None:
    """A ranking of 3 on "Q1"; on "Q2" two ups, one down; on "Q3" two raters' up and down on
    one answer (one rater's second vote on it would replace its first)."""
    add_completion(store, "chatcmpl-1", prompt="Q1", texts=("good", "ok", "bad"))
    store.add_ranking(items=[("chatcmpl-1", 0), ("chatcmpl-1", 1), ("chatcmpl-1", 2)])
    add_completion(store, "cmpl-2", prompt="Q2", texts=("yes", "no"), kind="text")
    add_completion(store, "cmpl-3", prompt="Q2", texts=("sure",), kind="text")
    _rate(store, "cmpl-2", 1, "down")
    _rate(store, "cmpl-2", 0, "up")
    _rate(store, "cmpl-3", 0, "up")
    add_completion(store, "chatcmpl-4", prompt="Q3", texts=("same",))
    _rate(store, "chatcmpl-4", 0, "up", user="u1")
    _rate(store, "chatcmpl-4", 0, "down", user="u2")


def test_reward_data(store: Store) -> None:
    _seed_feedback(store)
    data = store.reward_data()
    assert data.groups == [
        PreferenceGroup(_ids("Q1"), [_ids("good"), _ids("ok"), _ids("bad")], "ranking"),
        PreferenceGroup(_ids("Q2"), [_ids("yes"), _ids("no")], "thumbs"),
    ]
    assert data.thumbs == [
        ThumbExample(_ids("Q2"), _ids("sure"), True),
        ThumbExample(_ids("Q3"), _ids("same"), True, identity="user:u1"),
        ThumbExample(_ids("Q3"), _ids("same"), False, identity="user:u2"),
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


def test_seed_prompts_are_in_the_training_split() -> None:
    """The tests above rely on it: reward_data() leaves held-out feedback out."""
    assert _prompt("Q1", holdout=False) == "Q1" and _prompt("Q2", holdout=False) == "Q2"
    assert _prompt("Q3", holdout=False) == "Q3"


def test_sample_prompts(store: Store) -> None:
    for n in range(40):
        add_completion(store, f"cmpl-{n}", prompt=f"question {n}", texts=("a",), kind="text")
    held_ids = {pid for pid, held in _stored_holdout(store).items() if held}
    assert 0 < len(held_ids) < 40
    assert store.holdout_prompt_count() == len(held_ids)
    train = store.sample_prompts(10, seed=1)
    assert train == store.sample_prompts(10, seed=1)
    assert train != store.sample_prompts(10, seed=2)
    assert len({p.id for p in train}) == 10
    assert not any(p.id in held_ids for p in train)
    held = store.sample_prompts(100, seed=1, holdout=True)
    assert {p.id for p in held} == held_ids
    assert len(held) + len(store.sample_prompts(100, seed=1)) == 40
    first = train[0]
    assert first.prompt_token_ids == _ids(first.prompt_text) and first.messages is None


def test_holdout_flag_follows_the_prompt_text(store: Store) -> None:
    texts = [_prompt("split", holdout=True), _prompt("split", holdout=False)]
    for n, text in enumerate(texts):
        add_completion(store, f"cmpl-{n}", prompt=text, kind="text")
    assert sorted(_stored_holdout(store).values()) == [False, True]
    assert store.holdout_prompt_count() == 1


def test_sample_prompts_never_cross_the_split(store: Store) -> None:
    assert store.sample_prompts(4, seed=0) == []
    assert store.sample_prompts(4, seed=0, holdout=True) == []
    assert store.holdout_prompt_count() == 0
    add_completion(store, "chatcmpl-1", prompt=_prompt("train", holdout=False))
    (prompt,) = store.sample_prompts(4, seed=0)
    assert prompt.messages == [{"role": "user", "content": prompt.prompt_text}]
    assert store.sample_prompts(4, seed=0, holdout=True) == []  # the gate must wait, not cheat
    assert store.holdout_prompt_count() == 0
    add_completion(store, "chatcmpl-2", prompt=_prompt("held", holdout=True))
    (held,) = store.sample_prompts(4, seed=0, holdout=True)
    assert held.id != prompt.id
    assert store.sample_prompts(4, seed=0) == [prompt]


def test_sample_prompts_without_training_prompts(store: Store) -> None:
    add_completion(store, "chatcmpl-1", prompt=_prompt("held", holdout=True))
    assert store.sample_prompts(4, seed=0) == []
    assert len(store.sample_prompts(4, seed=0, holdout=True)) == 1


def _seed_both_splits(store: Store) -> tuple[str, str]:
    """A ranking and an up/down pair on a training prompt and on a held-out one."""
    prompts = (_prompt("train", holdout=False), _prompt("held", holdout=True))
    for n, prompt in enumerate(prompts):
        add_completion(store, f"cmpl-{n}", prompt=prompt, texts=("best", "worst"), kind="text")
        store.add_ranking(items=[(f"cmpl-{n}", 0), (f"cmpl-{n}", 1)])
        _rate(store, f"cmpl-{n}", 0, "up")
        _rate(store, f"cmpl-{n}", 1, "down")
        add_completion(store, f"cmpl-{n}-lone", prompt=prompt, texts=("lone",), kind="text")
        _rate(store, f"cmpl-{n}-lone", 0, "up")
    return prompts


def test_reward_data_splits_by_stored_holdout(store: Store) -> None:
    train_prompt, held_prompt = _seed_both_splits(store)

    def prompts_of(split: str) -> set[str]:
        data = store.reward_data(split)  # type: ignore[arg-type]
        ids = [g.prompt_token_ids for g in data.groups] + [t.prompt_token_ids for t in data.thumbs]
        # One group per prompt: the up/down pair repeats the ranking of the same answers.
        assert len(data.groups) == len(set(map(tuple, ids))) and len(data.thumbs) >= 1
        return {"".join(map(chr, i)) for i in ids}

    assert store.reward_data() == store.reward_data("train")
    assert prompts_of("train") == {train_prompt}
    assert prompts_of("holdout") == {held_prompt}
    assert prompts_of("all") == {train_prompt, held_prompt}
    with pytest.raises(ValueError):
        store.reward_data("test")  # type: ignore[arg-type]


def test_export_covers_both_splits(store: Store) -> None:
    train_prompt, held_prompt = _seed_both_splits(store)
    rows = list(store.export_preferences())
    assert {r["prompt"] for r in rows if "chosen" in r} == {train_prompt, held_prompt}


def test_tied_answers_form_no_pair(store: Store) -> None:
    add_completion(store, "cmpl-1", prompt="Q1", texts=("a", "b", "c", "d"), kind="text")
    store.add_ranking(items=[[("cmpl-1", 0), ("cmpl-1", 2)], ("cmpl-1", 1), ("cmpl-1", 3)],
                      user="u1")
    store.add_ranking(items=[("cmpl-1", 3), ("cmpl-1", 0)], user="u2")  # one vote per voter
    (tied, strict) = store.reward_data().groups
    assert tied == PreferenceGroup(
        _ids("Q1"), [_ids("a"), _ids("c"), _ids("b"), _ids("d")], "ranking", [0, 0, 1, 2],
        identity="user:u1")
    assert strict == PreferenceGroup(_ids("Q1"), [_ids("d"), _ids("a")], "ranking", None,
                                     identity="user:u2")
    pairs = [(r["chosen"], r["rejected"]) for r in store.export_preferences()]
    assert pairs == [
        ("a", "b"), ("a", "d"), ("c", "b"), ("c", "d"), ("b", "d"),  # no ("a", "c")
        ("d", "a"),
    ]


def test_equal_texts_are_never_a_pair(store: Store) -> None:
    """Answers with the same text (from two requests, or two choices of one) pair with nothing:
    in a ranking the later copy is dropped; in thumbs an up pairs only with a different text."""
    add_completion(store, "cmpl-1", prompt="Q1", texts=("same", "other", "same", "last"),
                   kind="text")
    add_completion(store, "cmpl-2", prompt="Q1", texts=("same",), kind="text")
    # Four voters: one voter's later ranking of the same answers would replace its earlier one.
    store.add_ranking(items=[("cmpl-1", 0), ("cmpl-1", 1), ("cmpl-1", 2), ("cmpl-1", 3)],
                      user="u1")
    store.add_ranking(items=[[("cmpl-1", 1), ("cmpl-1", 3)], ("cmpl-1", 0), ("cmpl-2", 0)],
                      user="u2")
    store.add_ranking(items=[("cmpl-1", 0), ("cmpl-2", 0)], user="u3")  # only equal texts
    store.add_ranking(items=[("cmpl-1", 0), [("cmpl-2", 0), ("cmpl-1", 2)]], user="u4")
    _rate(store, "cmpl-1", 0, "up")
    _rate(store, "cmpl-2", 0, "down")  # same text as the up: no pair
    data = store.reward_data()
    assert [(g.answers, g.tiers) for g in data.groups] == [
        ([_ids("same"), _ids("other"), _ids("last")], None),
        ([_ids("other"), _ids("last"), _ids("same")], [0, 0, 1]),
    ]
    assert [(t.answer_token_ids, t.label) for t in data.thumbs] == [
        (_ids("same"), True), (_ids("same"), False),
    ]
    pairs = [(r["chosen"], r["rejected"]) for r in store.export_preferences() if "chosen" in r]
    assert pairs == [
        ("same", "other"), ("same", "last"), ("other", "last"),
        ("other", "same"), ("last", "same"),
    ]
    assert all(chosen != rejected for chosen, rejected in pairs)


def test_thumbs_pair_by_text_not_token_ids(store: Store) -> None:
    """Two answers that read alike are no pair even when their token ids differ."""
    store.record_completion(_text_completion("cmpl-1", "Q1", "same", [1, 2]))
    store.record_completion(_text_completion("cmpl-2", "Q1", "same", [3]))
    _rate(store, "cmpl-1", 0, "up")
    _rate(store, "cmpl-2", 0, "down")
    data = store.reward_data()
    assert data.groups == [] and len(data.thumbs) == 2
    assert not [r for r in store.export_preferences() if "chosen" in r]


def _text_completion(cid: str, prompt: str, text: str, token_ids: list[int]) -> NewCompletion:
    return NewCompletion(
        id=cid, kind="text", prompt_text=prompt, prompt_token_ids=_ids(prompt), messages=None,
        model="flywheel", policy_version="policy-0", params={},
        choices=[NewChoice(0, text, token_ids, [-0.5] * len(token_ids), "stop")],
    )
