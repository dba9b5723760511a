"""Implicit signals in the reward model's data: only when `feedback.implicit_weight` asks, as
weak lone thumbs under the same per-rater caps as thumbs."""

from __future__ import annotations

from feedback_store import RewardData, Store, ThumbExample
from feedback_store.identities import limit_identities
from feedback_store.preference_groups import balance_thumbs
from feedback_store.types import Rater
from flywheel.settings import Settings
from trainer_worker.reward.consensus import new_event_counts

from .conftest import add_completion
from .test_training_data import _prompt

WEIGHT = 0.25


def _ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _window(store: Store, weight: float = 0.0, since: dict[str, int] | None = None
            ) -> RewardData:
    return store.cycle_reward_data(since=since or {}, until=store.feedback_watermark(),
                                   new=1000, replay=1000, seed=0, implicit_weight=weight)


def _seed(store: Store) -> None:
    """A thumbs pair and a ranking, then signals on other answers by two users."""
    add_completion(store, "c-rated", prompt=_prompt("rated", holdout=False), texts=("a", "b"))
    store.add_feedback(completion_id="c-rated", choice_index=0, rating="up", user="u1")
    store.add_feedback(completion_id="c-rated", choice_index=1, rating="down", user="u1")
    store.add_ranking(items=[("c-rated", 1), ("c-rated", 0)], user="u2")
    add_completion(store, "c-sig", prompt=_prompt("signals", holdout=False),
                   texts=("kept", "asked again", "before an edit"))
    for _ in range(3):  # copied three times: one weak up
        store.add_implicit(completion_id="c-sig", choice_index=0, signal="copy", user="u1")
    store.add_implicit(completion_id="c-sig", choice_index=1, signal="regenerate", user="u1")
    store.add_implicit(completion_id="c-sig", choice_index=2, signal="edit", user="u2")


def test_off_by_default_the_data_is_unchanged(store: Store) -> None:
    assert Settings().feedback.implicit_weight == 0.0
    add_completion(store, "c-rated", prompt=_prompt("rated", holdout=False), texts=("a", "b"))
    store.add_feedback(completion_id="c-rated", choice_index=0, rating="up", user="u1")
    store.add_ranking(items=[("c-rated", 1), ("c-rated", 0)], user="u2")
    before = store.cycle_reward_data(since={}, until=store.feedback_watermark(), new=1000,
                                     replay=1000, seed=0)
    store.add_implicit(completion_id="c-rated", choice_index=1, signal="copy", user="u3")
    store.add_implicit(completion_id="c-rated", choice_index=0, signal="regenerate", user="u3")
    assert _window(store) == before
    assert store.cycle_reward_data(since={}, until=store.feedback_watermark(), new=1000,
                                   replay=1000, seed=0) == before


def test_signals_become_weak_lone_thumbs(store: Store) -> None:
    _seed(store)
    off = _window(store)
    on = _window(store, WEIGHT)
    assert on.groups == off.groups
    assert [t for t in on.thumbs if t.source == "thumbs"] == off.thumbs
    prompt = _ids(_prompt("signals", holdout=False))
    assert [t for t in on.thumbs if t.source == "implicit"] == [
        ThumbExample(prompt, _ids("kept"), True, "user:u1", weight=WEIGHT, source="implicit"),
        ThumbExample(prompt, _ids("asked again"), False, "user:u1", weight=WEIGHT,
                     source="implicit"),
        ThumbExample(prompt, _ids("before an edit"), False, "user:u2", weight=WEIGHT,
                     source="implicit"),
    ]
    # The worker's rater review and weights rest on what raters rated, never on signals.
    assert new_event_counts(on) == new_event_counts(off)


def test_no_signal_beside_the_raters_own_thumb_nor_on_held_out_prompts(store: Store) -> None:
    add_completion(store, "c-1", prompt=_prompt("train", holdout=False), texts=("a", "b"))
    store.add_feedback(completion_id="c-1", choice_index=0, rating="down", user="u1")
    store.add_implicit(completion_id="c-1", choice_index=0, signal="copy", user="u1")  # the thumb
    store.add_implicit(completion_id="c-1", choice_index=0, signal="copy", user="u2")  # counts
    add_completion(store, "c-2", prompt=_prompt("held", holdout=True), texts=("a", "b"))
    store.add_implicit(completion_id="c-2", choice_index=0, signal="regenerate", user="u1")
    signals = [t for t in _window(store, WEIGHT).thumbs if t.source == "implicit"]
    assert [(t.identity, t.label) for t in signals] == [("user:u2", True)]
    assert not store.holdout_reward_data(until=store.feedback_watermark(), size=100,
                                         seed=0).thumbs


def test_new_and_replayed_signals_follow_the_watermark(store: Store) -> None:
    add_completion(store, "c-1", prompt=_prompt("train", holdout=False),
                   texts=("a", "b", "c", "d"))
    store.add_implicit(completion_id="c-1", choice_index=0, signal="copy", user="u1")
    store.add_implicit(completion_id="c-1", choice_index=1, signal="copy", user="u1")
    since = store.feedback_watermark()
    assert since["implicit"] == 2
    store.add_implicit(completion_id="c-1", choice_index=2, signal="regenerate", user="u1")
    data = _window(store, WEIGHT, since=since)
    assert sorted((t.answer_token_ids, t.new) for t in data.thumbs) == [
        (_ids("a"), False), (_ids("b"), False), (_ids("c"), True)]
    only_new = store.cycle_reward_data(since=since, until=store.feedback_watermark(), new=10,
                                       replay=0, seed=0, implicit_weight=WEIGHT)
    assert [t.answer_token_ids for t in only_new.thumbs] == [_ids("c")]


def test_signals_count_against_the_raters_cap_at_their_weight(store: Store) -> None:
    """An untrusted key flooding copies keeps at most an equal share, counted in weight: four
    honest raters with 10 ranked examples each, a key with 400 copies. It keeps 10 in weight,
    40 signals, not 400; and with its signals it cannot push out its own rankings."""
    for rater in range(4):
        for i in range(10):
            cid = f"c-{rater}-{i}"
            add_completion(store, cid, prompt=_prompt(f"p{rater} {i}", holdout=False),
                           texts=("good", "bad"), kind="text")
            store.add_ranking(items=[(cid, 0), (cid, 1)], user=f"h{rater}")
    flood = Rater(key_scope="k1", admin=True)  # admin: may signal on any answer
    add_completion(store, "c-flood", prompt=_prompt("flood", holdout=False),
                   texts=tuple(f"answer {i}" for i in range(400)))
    for i in range(400):
        store.add_implicit(completion_id="c-flood", choice_index=i, signal="copy", rater=flood)
    add_completion(store, "c-own", prompt=_prompt("own", holdout=False), texts=("x", "y"),
                   kind="text")
    store.add_ranking(items=[("c-own", 0), ("c-own", 1)], rater=flood)
    data = _window(store, WEIGHT)
    assert sum(t.identity == "key:k1" for t in data.thumbs) == 400
    limited, metrics = limit_identities(data, 0.1, {}, seed=0)
    kept = [t for t in limited.thumbs if t.identity == "key:k1"]
    assert [g.identity for g in limited.groups].count("key:k1") == 1  # its ranking first
    assert len(kept) == round((10 - 1) / WEIGHT) and all(t.weight == WEIGHT for t in kept)
    assert metrics["reward/capped_examples"] == 400 - len(kept)
    assert len(limited.groups) == 41  # the honest raters keep all they said


def test_signals_are_balanced_apart_from_thumbs() -> None:
    thumbs = [ThumbExample([1], [2], True), ThumbExample([1], [3], False)]
    copies = [ThumbExample([1], [4], True, weight=WEIGHT, source="implicit")] * 3
    regenerated = [ThumbExample([1], [5], False, weight=WEIGHT, source="implicit")]
    balanced = balance_thumbs([*thumbs, *copies, *regenerated])
    assert [t.weight for t in balanced[:2]] == [1.0, 1.0]
    assert sum(t.weight for t in balanced[2:] if t.label) == \
        sum(t.weight for t in balanced[2:] if not t.label) == 2 * WEIGHT
