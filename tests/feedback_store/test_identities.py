"""Identities: who rated, how much of a cycle one rater may fill, and the agreement weight."""

from __future__ import annotations

import pytest

from feedback_store import PreferenceGroup, RewardData, Store, ThumbExample
from feedback_store.identities import (
    Tally,
    agreement_weight,
    identity_of,
    limit_identities,
)
from flywheel.rater_pooling import identity_cap

from .conftest import add_completion


def test_a_rater_is_the_key_and_the_user() -> None:
    assert identity_of("alice", None) == "user:alice"  # no keys: everyone is trusted
    assert identity_of(None, None) == "anonymous"  # one rater, not one each
    # An untrusted key is one rater, whatever `user` it sends; a trusted one vouches for each.
    assert identity_of("alice", "abcd") == identity_of("bob", "abcd") == "key:abcd"
    assert identity_of(None, "abcd") == "key:abcd"
    assert identity_of("alice", "abcd", trusted=True) == "key:abcd/user:alice"
    assert identity_of(None, "abcd", trusted=True) == "key:abcd/anonymous"
    assert identity_of("alice", "abcd", trusted=True) != identity_of("alice", "ef01", trusted=True)


def test_stored_feedback_carries_its_identity(store: Store) -> None:
    add_completion(store, "chatcmpl-1", texts=("good", "bad"))
    add_completion(store, "chatcmpl-2", texts=("fine", "worse"))
    store.add_feedbacks([
        {"completion_id": "chatcmpl-1", "choice_index": 0, "rating": "up", "user": "alice",
         "idempotency_scope": "k1"},
        {"completion_id": "chatcmpl-1", "choice_index": 1, "rating": "down", "user": None,
         "idempotency_scope": "k1"},
    ])
    store.add_feedback(completion_id="chatcmpl-2", choice_index=0, rating="up")
    store.add_ranking(items=[("chatcmpl-2", 0), ("chatcmpl-2", 1)], idempotency_scope="k2")
    data = store.reward_data("all")
    # One untrusted key is one rater: its up and down on one prompt pair up as one rater's.
    assert [t.identity for t in data.thumbs] == ["anonymous"]
    assert sorted(g.identity for g in data.groups) == ["key:k1", "key:k2"]


def test_the_cap_holds_against_flooding() -> None:
    """Twenty honest raters with 10 examples each, two floods of 500: each flood keeps 25 (a
    tenth of what is kept, at most), not a share of what it sent. Among twelve raters a rater
    may keep twice an equal share, a sixth; an untrusted key an equal share, a twelfth."""
    cap = identity_cap([10] * 20 + [500, 500], 0.1)
    assert cap == 25 and cap / (200 + 2 * cap) <= 0.1
    cap = identity_cap([10] * 10 + [500, 500], 0.1)
    assert cap == 25 and cap / (100 + 2 * cap) <= 1 / 6
    assert identity_cap([10] * 10 + [500, 500], 0.1, vouched=False) == 10
    assert identity_cap([], 0.1) == 0


def test_a_small_group_keeps_nearly_all_it_says() -> None:
    """A small honest group: its smallest rater never drags the others' cap down (with equal
    shares, one anonymous thumb once capped every rater at one example)."""
    assert identity_cap([7], 0.1) == 7  # one rater: nothing to balance against
    assert identity_cap([30, 10, 5], 0.1) == 30
    assert identity_cap([40] * 8 + [1], 0.1) == 40
    assert identity_cap([300, 10, 10], 0.1) == 40  # one rater may keep two thirds of three's
    assert identity_cap([30, 10, 5], 0.1, vouched=False) == 5  # untrusted keys: equal shares


def _group(identity: str, new: bool = True) -> PreferenceGroup:
    return PreferenceGroup([1], [[2], [3]], "ranking", identity=identity, new=new)


def test_limit_identities_keeps_new_examples_and_weights() -> None:
    honest = [_group(f"user:h{i}") for i in range(10)]
    flood = [_group("user:bad", new=False)] * 30 + [_group("user:bad")] * 2
    thumbs = [ThumbExample([1], [2], True, identity="user:bad")]
    data = RewardData(groups=[*honest, *flood], thumbs=thumbs)
    limited, metrics = limit_identities(data, 0.1, {"user:bad": 0.25}, seed=0)
    bad = [g for g in limited.groups if g.identity == "user:bad"]
    # Eleven raters: twice an equal share, c <= 2/11 (10 + c), keeps 2.
    assert metrics["reward/identity_cap"] == 2 and len(bad) == 2 and all(g.new for g in bad)
    assert not limited.thumbs  # the flood's two slots went to its new rankings
    assert all(g.weight == 0.25 for g in bad)
    assert all(g.weight == 1.0 for g in limited.groups if g.identity != "user:bad")
    assert metrics["reward/down_weighted_identities"] == 1
    assert metrics["reward/capped_examples"] == 31
    assert metrics["reward/identities"] == 11


def test_a_lone_untrusted_key_trains_nothing() -> None:
    """One untrusted key could be anyone minting users: alone, it keeps no example; beside
    honest raters it keeps an equal share at most."""
    minted = [_group("key:k1") for _ in range(300)]
    alone, metrics = limit_identities(RewardData(groups=minted, thumbs=[]), 0.1, {}, seed=0)
    assert not alone.groups and metrics["reward/capped_examples"] == 300
    honest = [_group(f"user:h{i}") for i in range(3) for _ in range(20)]
    mixed, _ = limit_identities(RewardData(groups=[*honest, *minted], thumbs=[]), 0.1, {},
                                seed=0)
    assert sum(g.identity == "key:k1" for g in mixed.groups) == 20
    assert len(mixed.groups) == 80


@pytest.mark.parametrize(("scored", "agreed", "weight"), [
    (0, 0, 1.0),  # never judged
    (10, 3, 1.0),  # 30% of 10: not yet significant
    (100, 50, 1.0),  # chance
    (100, 80, 1.0),
    (100, 30, 0.1),  # significantly below chance: an inverted rater
])
def test_agreement_weight(scored: int, agreed: int, weight: float) -> None:
    assert agreement_weight(scored, agreed, 0.1) == weight


def test_tallies_accumulate_and_show(store: Store) -> None:
    store.record_tallies({"user:a": Tally(10, 10, 9), "user:b": Tally(20, 20, 2)}, 0.1)
    weights = store.record_tallies({"user:b": Tally(30, 30, 3)}, 0.1)
    assert weights == {"user:b": 0.1}
    assert store.identity_weights(["user:a", "user:b", "user:new"]) == {
        "user:a": 1.0, "user:b": 0.1, "user:new": 1.0}
    assert store.identity_standing(["user:b", "user:c"]) == {
        "user:b": Tally(50, 50, 5), "user:c": Tally()}
    listed = store.list_identities()
    assert [row["identity"] for row in listed] == ["user:b", "user:a"]
    assert listed[0]["weight"] == 0.1 and listed[0]["agreement"] == 0.1
    low, high = listed[0]["agreement_interval"]
    assert low < 0.1 < high < 0.5
    assert store.list_identities(limit=1, offset=1)[0]["identity"] == "user:a"
