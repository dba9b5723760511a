"""The worker's rollout decisions on a real database and Redis: release, canary promotion and
rejection from live thumbs, timeout, and auto-rollback to a better stored version."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from feedback_store import NewChoice, NewCompletion, Store
from flywheel.approval import Arm, decide_canary
from flywheel.live_approval import best_version, forgotten, live_record
from flywheel.serving_plan import CanaryMessage, PolicyMessage, Publisher, RedisKeys
from flywheel.settings import CanarySettings, Settings, TrainSettings
from trainer_worker.cycle import prune
from trainer_worker.promotion import Promotion


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    s = Store(sqlite_url)
    s.upgrade()
    s.ensure_base_policy("/models/base", None)
    for n in (1, 2):
        s.add_policy(id=f"policy-{n}", parent="policy-0", path=f"/ckpt/policy-{n}",
                     sha256="ab" * 32)
    yield s
    s.close()


@pytest.fixture
def publisher(redis_url: str, redis_namespace: str) -> Iterator[Publisher]:
    p = Publisher(redis.Redis.from_url(redis_url), RedisKeys(redis_namespace))
    yield p
    assert p.client is not None
    p.client.delete(p.keys.active_policy, p.keys.canary_policy)
    p.close()


def promotion(store: Store, publisher: Publisher, **canary: object) -> Promotion:
    cfg = CanarySettings(**{"min_ratings": 50, "min_rollback_ratings": 50, **canary})
    return Promotion(Settings(canary=cfg), store, publisher)  # type: ignore[arg-type]


def rate(store: Store, version: str, up: int, down: int, *, users: int = 0,
         user: str | None = None, key: str | None = None) -> None:
    """Thumbs on answers `version` produced now (one completion, one choice each): anonymous,
    or all from `user`, or spread over `users` named users in turn, or all from an untrusted
    API `key` (minting a new `user` for each)."""
    cid = f"cmpl-{uuid.uuid4().hex}"
    ratings = ["up"] * up + ["down"] * down
    store.record_completion(NewCompletion(
        id=cid, kind="text", prompt_text=f"q {cid}", prompt_token_ids=[1], messages=None,
        model="flywheel", policy_version=version, params={},
        choices=[NewChoice(i, f"a{i}", [2 + i], [-0.1], "stop") for i in range(len(ratings))]))
    who = [user or (f"u{i % users}" if users else None) for i in range(len(ratings))]
    if key is not None:
        who = [f"minted-{uuid.uuid4().hex[:8]}" for _ in ratings]
    result = store.add_feedbacks([{"completion_id": cid, "choice_index": i, "rating": r,
                                   "user": who[i], "idempotency_scope": key}
                                  for i, r in enumerate(ratings)])
    assert all(isinstance(r, tuple) for r in result)


def announced(publisher: Publisher) -> tuple[str, str | None]:
    assert publisher.client is not None
    active, canary = publisher.client.mget(publisher.keys.active_policy,
                                           publisher.keys.canary_policy)
    return (PolicyMessage.from_json(active).version,
            None if canary is None else CanaryMessage.from_json(canary).version)


def status(store: Store, id: str) -> str:
    return store.get_policy(id)["status"]


def test_release_starts_a_canary_or_activates(store: Store, publisher: Publisher) -> None:
    assert promotion(store, publisher, auto=True).release("policy-1") == "canary"
    assert status(store, "policy-1") == "canary"
    assert announced(publisher) == ("policy-0", "policy-1")
    assert promotion(store, publisher, auto=True).release("policy-2") == "waiting"
    assert status(store, "policy-2") == "candidate"
    store.end_canary("candidate")
    assert promotion(store, publisher, auto=False).release("policy-2") == "active"
    assert announced(publisher) == ("policy-2", None)


def test_a_better_canary_is_promoted_with_its_evidence(store: Store,
                                                       publisher: Publisher) -> None:
    rate(store, "policy-0", 400, 0)  # before the canary: no evidence for either arm
    store.start_canary("policy-1", 0.2)
    judge = promotion(store, publisher)
    rate(store, "policy-0", 120, 130)
    rate(store, "policy-1", 30, 20)  # 50 ratings: the minimum, not yet evidence enough
    assert judge.tick() is None and status(store, "policy-1") == "canary"
    rate(store, "policy-1", 100, 30)
    assert judge.tick() == "promoted"
    assert status(store, "policy-1") == "active" and status(store, "policy-0") == "retired"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/decision"] == "promoted"
    assert metrics["canary/against"] == "policy-0"
    assert metrics["canary/canary_ratings"] == 180 and metrics["canary/active_ratings"] == 250
    assert metrics["canary/low"] > -0.02
    assert announced(publisher) == ("policy-1", None)


def test_a_worse_canary_is_rejected_and_ended(store: Store, publisher: Publisher) -> None:
    store.start_canary("policy-1", 0.2)
    rate(store, "policy-0", 175, 75)
    rate(store, "policy-1", 20, 40)
    assert promotion(store, publisher).tick() == "rejected"
    assert status(store, "policy-1") == "rejected" and status(store, "policy-0") == "active"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/decision"] == "rejected" and metrics["canary/high"] < 0
    assert announced(publisher) == ("policy-0", None)


def test_one_flooding_rater_cannot_sink_a_better_canary(store: Store,
                                                        publisher: Publisher) -> None:
    """Twelve raters like the canary better; one API key thumbs it down as often as all of them
    together. Counted plainly the canary would be rejected; the key weighs at most one rater's
    share of the arm, so it is promoted, and the evidence says how many raters and thumbs it
    saw."""
    store.start_canary("policy-1", 0.2)
    rate(store, "policy-0", 125, 125, users=40)
    rate(store, "policy-1", 108, 12, users=12)
    rate(store, "policy-1", 0, 400, key="flood")
    thumbs = store.canary_evidence()
    assert thumbs is not None
    assert decide_canary(Arm(125, 125), Arm(108, 412), min_ratings=50, margin=0.02,
                         alpha=0.05).verdict == "reject"  # what plain counts would do
    assert promotion(store, publisher).tick() == "promoted"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/canary_raters"] == 13 and metrics["canary/canary_thumbs"] == 520
    assert metrics["canary/canary_ratings"] < 140  # the flood counts at its capped share


def test_a_canary_per_request_is_not_decided_by_one_rater(store: Store,
                                                         publisher: Publisher) -> None:
    """A canary assigned per request, three raters: two find it 20 points better, one thumbs
    it down and the active version up, twice as much. Pooled, that one rejects it; judged
    rater by rater, the canary waits and says whose thumbs tip it. Once each of the two has
    rated enough to outweigh the third, it is promoted."""
    store.start_canary("policy-1", 0.5, unit="request")
    for user in ("ann", "bob"):
        for _ in range(10):  # a request of four answers at a time, a mixed verdict in each
            rate(store, "policy-0", 2, 2, user=user)
            rate(store, "policy-1", 3, 1, user=user)
    for _ in range(20):
        rate(store, "policy-0", 4, 0, user="cat")
        rate(store, "policy-1", 0, 4, user="cat")
    judge = promotion(store, publisher)
    assert judge.tick() is None
    reason = store.get_policy("policy-1")["metrics"]["canary/reason"]
    assert "without the thumbs of one rater (user:cat) the others show +25.0" in reason
    assert "no single rater decides" in reason
    for user in ("ann", "bob"):
        for _ in range(40):
            rate(store, "policy-0", 4, 4, user=user)
            rate(store, "policy-1", 6, 2, user=user)
    assert judge.tick() == "promoted"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/unit"] == "request" and metrics["canary/canary_raters"] == 3


def test_an_undecided_canary_ends_at_its_deadline(store: Store, publisher: Publisher) -> None:
    store.start_canary("policy-1", 0.2)
    rate(store, "policy-0", 5, 5)
    assert promotion(store, publisher, max_hours=1.0).tick() is None
    assert promotion(store, publisher, max_hours=0.0).tick() == "timeout"
    assert status(store, "policy-1") == "candidate"
    assert store.get_policy("policy-1")["metrics"]["canary/decision"] == "timeout"


def test_an_undecided_canary_gives_way_to_a_newer_candidate(store: Store,
                                                            publisher: Publisher) -> None:
    """Undecided after twice the minimum of counted thumbs on each arm, showing no gain, with a
    newer candidate waiting, the canary ends (nothing decided about it) and the newer one goes
    on canary; with fewer thumbs, or the rule off, it keeps running."""
    judge = promotion(store, publisher, auto=True, supersede_after=2.0)
    assert judge.release("policy-1") == "canary"
    rate(store, "policy-0", 45, 45, users=30)
    rate(store, "policy-1", 45, 45, users=30)
    assert judge.tick() is None and status(store, "policy-1") == "canary"  # 90 < 2 x 50
    assert store.get_policy("policy-1")["metrics"]["canary/reason"].endswith(
        "; a newer candidate takes its place from 100 counted thumbs on each arm while they show"
        " a gain under +5 points, from 150 whatever they show")
    assert judge.release("policy-2") == "waiting"
    rate(store, "policy-0", 10, 10, users=30)
    rate(store, "policy-1", 10, 10, users=30)
    assert promotion(store, publisher, auto=True, supersede_after=0.0).tick() is None
    assert status(store, "policy-2") == "candidate"  # waiting
    assert judge.tick() == "superseded"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/decision"] == "superseded"
    assert metrics["canary/reason"].startswith(
        "no decision after 110 counted thumbs on each arm, showing +0.0 points")
    assert metrics["canary/low"] < -0.02 and metrics["canary/high"] > 0  # undecided indeed
    assert status(store, "policy-2") == "canary" and status(store, "policy-0") == "active"
    assert status(store, "policy-1") == "candidate"  # an operator may still serve it
    assert announced(publisher) == ("policy-0", "policy-2")


def test_a_canary_showing_a_gain_keeps_its_place_longer(store: Store,
                                                        publisher: Publisher) -> None:
    """A canary whose thumbs show a gain of the size worth waiting for (+10 points, undecided)
    keeps its place at twice the minimum, a newer candidate waiting; it gives way only at
    `supersede_always_after` times the minimum."""
    judge = promotion(store, publisher, auto=True, supersede_after=2.0, supersede_gain=0.05,
                      supersede_always_after=2.4)
    assert judge.release("policy-1") == "canary"
    assert judge.release("policy-2") == "waiting"
    rate(store, "policy-0", 55, 55, users=30)
    rate(store, "policy-1", 66, 44, users=30)
    assert judge.tick() is None and status(store, "policy-1") == "canary"  # 110 >= 100, +10
    rate(store, "policy-0", 5, 5, users=30)
    rate(store, "policy-1", 6, 4, users=30)
    assert judge.tick() == "superseded"  # 120 = 2.4 x 50
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["canary/reason"].startswith(
        "no decision after 120 counted thumbs on each arm, showing +10.0 points")
    assert metrics["canary/low"] < -0.02 and metrics["canary/high"] > 0  # undecided indeed
    assert status(store, "policy-2") == "canary"


def test_auto_rollback_to_a_version_users_prefer(store: Store, publisher: Publisher) -> None:
    store.activate_policy("policy-1")
    rate(store, "policy-1", 170, 30)  # 85% while it served
    store.activate_policy("policy-2")  # a manual activation of a worse version
    rate(store, "policy-2", 90, 110)  # 45%
    assert promotion(store, publisher, auto_rollback=False).tick() is None
    assert status(store, "policy-2") == "active"
    assert promotion(store, publisher, auto_rollback=True).tick() == "rolled_back"
    assert status(store, "policy-1") == "active"
    metrics = store.get_policy("policy-1")["metrics"]
    assert metrics["rollback/better"] == "policy-1" and metrics["rollback/active"] == "policy-2"
    assert announced(publisher) == ("policy-1", None)
    # The active version now holds its own: nothing more happens.
    assert promotion(store, publisher, auto_rollback=True).tick() is None


def test_no_rollback_when_one_rater_floods_the_active_version(store: Store,
                                                              publisher: Publisher) -> None:
    """The counters show the active version far behind an older one, but only because one rater
    thumbs it down in bulk: pooled across raters, the versions are alike, so nothing rolls
    back."""
    store.activate_policy("policy-1")
    rate(store, "policy-1", 140, 60, users=20)
    store.activate_policy("policy-2")
    rate(store, "policy-2", 140, 60, users=20)
    rate(store, "policy-2", 0, 300, user="flood")
    judge = promotion(store, publisher, auto_rollback=True)
    assert forgotten(store.list_policies(), store.live_ratings(), judge.cfg) is not None
    assert judge.tick() is None
    assert status(store, "policy-2") == "active"


def test_live_approval_pooled_across_raters_names_the_best_version(
        store: Store, publisher: Publisher) -> None:
    """One rater thumbs the better version down in bulk: by the counters it looks the worst and
    an older one looks better; pooled across raters (the worker's `pool_live`), `best` is the
    version users prefer and no regression shows. The counters themselves stay as they are."""
    store.activate_policy("policy-1")
    rate(store, "policy-1", 130, 70, users=20)  # 65%
    store.activate_policy("policy-2")
    rate(store, "policy-2", 170, 30, users=20)  # 85% by the twenty
    rate(store, "policy-2", 0, 300, user="flood")
    rows, ratings = store.list_policies(), store.live_ratings()
    assert best_version(rows, ratings, 50) == "policy-1"
    judge = promotion(store, publisher, auto_rollback=True)
    assert forgotten(rows, ratings, judge.cfg) is not None
    assert store.pooled_live() == {}
    assert judge.tick() is None  # pools every version, then finds no regression
    pooled = store.pooled_live()
    assert sorted(pooled) == ["policy-1", "policy-2"]
    assert pooled["policy-2"].raters == 21 and pooled["policy-1"].raters == 20
    assert best_version(rows, ratings, 50, pooled) == "policy-2"
    assert forgotten(rows, ratings, judge.cfg, pooled) is None
    assert store.live_ratings() == ratings
    live = live_record(*ratings["policy-2"], pooled["policy-2"])
    assert live["approval"] == 170 / 500
    assert live["pooled"]["approval"] > 0.7 and live["pooled"]["raters"] == 21
    low, high = live["pooled"]["interval"]
    assert low < live["pooled"]["approval"] < high
    assert not judge.pool_live()  # nothing new to pool
    rate(store, "policy-2", 10, 0, users=5)
    assert not judge.pool_live()  # new thumbs, but pooled less than pool_seconds ago
    assert judge.pool_live(force=True)
    assert store.pooled_live()["policy-2"].raters == 21


def test_no_rollback_on_a_handful_of_thumbs(store: Store, publisher: Publisher) -> None:
    store.activate_policy("policy-1")
    rate(store, "policy-1", 10, 0)
    store.activate_policy("policy-2")
    rate(store, "policy-2", 100, 100)
    assert promotion(store, publisher, auto_rollback=True).tick() is None


def test_pruning_keeps_the_best_version_by_live_approval(tmp_path: Path, sqlite_url: str
                                                         ) -> None:
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url,
                        train=TrainSettings(keep_checkpoints=0),
                        canary=CanarySettings(min_rollback_ratings=50))
    s = Store(sqlite_url)
    s.upgrade()
    s.ensure_base_policy("/models/base", None)
    root = Path(settings.checkpoint_dir or "") / "policies"
    for n in (1, 2, 3, 4):
        (root / f"policy-{n}").mkdir(parents=True)
        s.add_policy(id=f"policy-{n}", parent="policy-0", path=str(root / f"policy-{n}"),
                     sha256="ab" * 32, status="retired" if n < 3 else "candidate")
    s.activate_policy("policy-3")
    s.start_canary("policy-4", 0.2)
    rate(s, "policy-1", 90, 10)  # the best users have seen
    rate(s, "policy-2", 40, 60)
    prune(settings, s)
    assert sorted(p.name for p in root.iterdir()) == ["policy-1", "policy-3", "policy-4"]
    assert s.get_policy("policy-2")["path"] is None
    s.close()
