"""Canary bookkeeping and live approval counters, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from feedback_store import NewChoice, NewCompletion, Store
from feedback_store.errors import ConflictError, InvalidInputError, NotFoundError
from feedback_store.models import Feedback
from feedback_store.types import PooledLive, Rater
from flywheel.rater_pooling import Clustered, PairedThumbs, Shared


def _versions(store: Store, *statuses: str) -> None:
    store.ensure_base_policy("/models/base", None)
    for n, status in enumerate(statuses, start=1):
        store.add_policy(id=f"policy-{n}", parent="policy-0", path=f"/ckpt/policy-{n}",
                         sha256="ab" * 32, status=status)


def _served(store: Store, cid: str, version: str, n: int = 1, *versions: str) -> None:
    """A request of `n` answers by `version`, or one answer by each of `versions` (a request
    split between the arms)."""
    each = versions or (version,) * n
    store.record_completion(NewCompletion(
        id=cid, kind="text", prompt_text=f"prompt {cid}", prompt_token_ids=[1, 2],
        messages=None, model="flywheel", policy_version=each[0], params={},
        choices=[NewChoice(i, f"answer {i}", [3 + i], [-0.1], "stop", v)
                 for i, v in enumerate(each)]))


def _thumbs(store: Store, cid: str, *ratings: str, user: str | None = None) -> None:
    store.add_feedbacks([{"completion_id": cid, "choice_index": i, "rating": r, "user": user}
                         for i, r in enumerate(ratings)])


def _statuses(store: Store) -> dict[str, str]:
    return {p["id"]: p["status"] for p in store.list_policies()}


def test_start_and_end_a_canary(store: Store) -> None:
    _versions(store, "candidate", "candidate")
    row = store.start_canary("policy-1", 0.25)
    assert row["status"] == "canary" and row["canary"]["fraction"] == 0.25
    active, canary = store.serving_state()
    assert active is not None and active["id"] == "policy-0"
    assert canary is not None and canary["id"] == "policy-1"
    ended = store.end_canary("rejected", {"canary/decision": "rejected"}, id="policy-1")
    assert ended["status"] == "rejected" and ended["metrics"]["canary/decision"] == "rejected"
    assert ended["canary"] is None
    assert store.serving_state()[1] is None


def test_bad_canary_requests_change_nothing(store: Store) -> None:
    _versions(store, "candidate", "rejected", "candidate")
    before = _statuses(store)
    with pytest.raises(NotFoundError):
        store.start_canary("policy-9", 0.2)
    with pytest.raises(ConflictError, match="already active"):
        store.start_canary("policy-0", 0.2)
    with pytest.raises(InvalidInputError, match="rejected"):
        store.start_canary("policy-2", 0.2)
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(InvalidInputError, match="fraction"):
            store.start_canary("policy-1", fraction)
    with pytest.raises(NotFoundError):
        store.end_canary("candidate")
    assert _statuses(store) == before
    store.start_canary("policy-1", 0.2)
    with pytest.raises(ConflictError, match="on canary already"):
        store.start_canary("policy-3", 0.2)
    with pytest.raises(NotFoundError):
        store.end_canary("candidate", id="policy-3")
    assert _statuses(store)["policy-1"] == "canary"
    store.end_canary("candidate")
    assert store.start_canary("policy-2", 0.2, force=True)["status"] == "canary"


def test_promotion_and_activation_end_the_canary(store: Store) -> None:
    _versions(store, "candidate", "candidate")
    store.start_canary("policy-1", 0.2)
    store.activate_policy("policy-1", metrics={"canary/decision": "promoted"})
    assert _statuses(store) == {"policy-0": "retired", "policy-1": "active",
                                "policy-2": "candidate"}
    assert store.get_policy("policy-1")["metrics"]["canary/decision"] == "promoted"
    store.start_canary("policy-2", 0.2)
    store.activate_policy("policy-0")  # a rollback meanwhile aborts the canary
    assert _statuses(store)["policy-2"] == "candidate"
    assert store.get_policy("policy-2")["metrics"]["canary/decision"] == "aborted"
    assert store.serving_state()[1] is None


def test_live_ratings_count_every_stored_thumb(store: Store) -> None:
    _versions(store, "candidate")
    _served(store, "a", "policy-0", n=3)
    _served(store, "b", "policy-1", n=2)
    _thumbs(store, "a", "up", "down", "up")
    _thumbs(store, "b", "down", "down")
    store.add_feedback(completion_id="b", choice_index=0, rating="up", idempotency_key="k1",
                       user="bob")
    store.add_feedback(completion_id="b", choice_index=0, rating="up", idempotency_key="k1",
                       user="bob")
    with pytest.raises(NotFoundError):
        store.add_feedback(completion_id="nope", choice_index=0, rating="up")
    assert store.live_ratings() == {"policy-0": (2, 1), "policy-1": (1, 2)}


def test_a_new_vote_of_the_same_rater_replaces_the_old_one(store: Store) -> None:
    """One vote per rater (key, user) per answer: the later thumb counts, the earlier one is kept
    as history; another rater's vote, or the same user under another key, is a vote of its own."""
    _versions(store, "candidate")
    _served(store, "b", "policy-1", n=2)
    alice = Rater(key_scope="k1", user="alice", trusted=True)
    store.add_feedback(completion_id="b", choice_index=0, rating="down", rater=alice)
    store.add_feedback(completion_id="b", choice_index=0, rating="up", user="bob")
    store.add_feedback(completion_id="b", choice_index=0, rating="down",
                       rater=Rater(key_scope="k2", user="alice"))
    assert store.live_ratings() == {"policy-1": (1, 2)}
    store.add_feedback(completion_id="b", choice_index=0, rating="up", rater=alice)
    assert store.live_ratings() == {"policy-1": (2, 1)}
    store.add_feedbacks([{"completion_id": "b", "choice_index": 0, "rating": r, "rater": alice}
                         for r in ("down", "up", "down")])
    assert store.live_ratings() == {"policy-1": (1, 2)}
    thumbs = store.thumbs_by_rater(["policy-1"])["policy-1"]
    assert thumbs == {"key:k1/user:alice": (0, 1), "user:bob": (1, 0), "key:k2": (0, 1)}
    with store._tx(write=False) as s:
        history = s.execute(sa.select(Feedback.rating, Feedback.replaced_by)
                            .where(Feedback.user == "alice").order_by(Feedback.id)).all()
    assert [rating for rating, _ in history] == ["down", "down", "up", "down", "up", "down"]
    assert sum(replaced is None for _, replaced in history) == 2  # alice under k1 and k2


def test_pooled_live_is_stored_beside_the_counters(store: Store) -> None:
    _versions(store, "candidate")
    _served(store, "a", "policy-0", n=3)
    _thumbs(store, "a", "up", "down", "up", user="u1")
    assert store.pooled_live() == {}
    store.record_pooled_live({"policy-0": PooledLive(1.5, 0.5, 0.01, 1, 1_700_000_000.25),
                              "policy-1": PooledLive(0.0, 0.0, 0.0, 0, 1_700_000_000.0)})
    _served(store, "b", "policy-0", n=1)
    _thumbs(store, "b", "down")  # counted as ever; the pooled figures wait for the worker
    assert store.live_ratings() == {"policy-0": (2, 2), "policy-1": (0, 0)}
    assert store.pooled_live() == {
        "policy-0": PooledLive(1.5, 0.5, 0.01, 1, pytest.approx(1_700_000_000.25)),
        "policy-1": PooledLive(0.0, 0.0, 0.0, 0, pytest.approx(1_700_000_000.0))}
    store.record_pooled_live({"policy-0": PooledLive(2.0, 2.0, 0.05, 2, 1_700_000_100.0)})
    assert store.pooled_live()["policy-0"].raters == 2


def test_canary_evidence_counts_only_the_canary_period(store: Store) -> None:
    _versions(store, "candidate")
    _served(store, "before", "policy-0", n=2)
    _thumbs(store, "before", "up", "up")  # before the canary: not evidence
    store.start_canary("policy-1", 0.5)
    _thumbs(store, "before", "down")  # an answer from before the canary: not evidence either
    _served(store, "a", "policy-0", n=3)
    _served(store, "c", "policy-1", n=2)
    _thumbs(store, "a", "up", "down", "down")
    _thumbs(store, "c", "up", "up")
    assert store.canary_evidence() == {"policy-0": {"anonymous": (1, 2)},
                                       "policy-1": {"anonymous": (2, 0)}}
    store.end_canary("candidate")
    assert store.canary_evidence() is None


def test_thumbs_are_counted_per_rater(store: Store) -> None:
    _versions(store, "candidate")
    store.start_canary("policy-1", 0.5)
    _served(store, "a", "policy-0", n=3)
    _served(store, "c", "policy-1", n=3)
    _thumbs(store, "a", "up", "down", user="ann")
    _thumbs(store, "a", "down", "down", "down", user="bob")
    _thumbs(store, "c", "up", "up", "down", user="bob")
    _thumbs(store, "c", "up")
    by_arm = {"policy-0": {"user:ann": (1, 1), "user:bob": (0, 3)},
              "policy-1": {"user:bob": (2, 1), "anonymous": (1, 0)}}
    assert store.canary_evidence() == by_arm
    assert store.thumbs_by_rater(["policy-1", "policy-0", "policy-9"]) == {
        **by_arm, "policy-9": {}}


def test_canary_thumbs_are_summed_request_by_request(store: Store) -> None:
    """`canary_requests`: per arm and rater, the sums `Clustered` keeps (up, n, up^2, up n,
    n^2, requests), grouped by the request that served each answer, each answer counted for the
    version that wrote it; and over the requests both arms answered, `Shared`'s sums."""
    _versions(store, "candidate")
    _served(store, "before", "policy-1", n=1)
    store.start_canary("policy-1", 0.5)
    _thumbs(store, "before", "up", user="ann")  # an answer from before the canary
    for request, version in (("a1", "policy-0"), ("a2", "policy-0"), ("c1", "policy-1")):
        _served(store, request, version, n=3)
    _served(store, "m1", "", 0, "policy-1", "policy-0", "policy-0")  # split between the arms
    _thumbs(store, "a1", "up", "up", "up", user="ann")
    _thumbs(store, "a2", "down", "up", user="ann")
    _thumbs(store, "c1", "up", "down", user="ann")
    _thumbs(store, "c1", "up", user="bob")
    _thumbs(store, "m1", "up", "up", "down", user="bob")
    found = store.canary_requests()
    assert found == PairedThumbs(
        versions=("policy-0", "policy-1"),
        active={"user:ann": Clustered(up=4, n=5, up_sq=9 + 1, up_n=9 + 2, n_sq=9 + 4,
                                      requests=2),
                "user:bob": Clustered.of([(1, 1)])},
        canary={"user:ann": Clustered(1, 2, 1, 2, 4, 1),
                "user:bob": Clustered.of([(1, 0), (1, 0)])},
        shared={"user:bob": Shared.of([((1, 1), (1, 0))])},
    )
    assert found.shared["user:bob"] == Shared(up_up=1, up_n=2, n_up=1, n_n=2, requests=1)
    assert store.canary_evidence() == {
        version: {name: (c.up, c.n - c.up) for name, c in raters.items()}
        for version, raters in (("policy-0", found.active), ("policy-1", found.canary))}
    assert store.live_ratings()["policy-0"] == (4 + 1, 1 + 1)  # counters by the answer's version
    store.end_canary("candidate")
    assert store.canary_requests() is None


def test_pruning_spares_serving_and_protected_versions(store: Store) -> None:
    _versions(store, "retired", "candidate", "retired", "candidate")
    store.start_canary("policy-2", 0.2)
    prunable = {p["id"] for p in store.prunable_policies(keep=0, protect={"policy-3"})}
    assert prunable == {"policy-1", "policy-4"}
    with pytest.raises(InvalidInputError):
        store.mark_policy_pruned("policy-2")
