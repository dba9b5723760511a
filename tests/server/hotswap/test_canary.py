"""Canary rollout through the admin routes, on fake engines with a real Redis and SQLite:
the split, stickiness, two replicas, live approval, a Redis restart, and bad requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from feedback_store import Store
from feedback_store.models import Choice, Completion
from flywheel.embedded_redis import EmbeddedRedis
from flywheel.serving_plan import CanaryMessage, RedisKeys
from flywheel.settings import Settings
from server.engines.fake import FakeEngine
from tests.server.hotswap.conftest import (
    CHAT,
    _settings_on,
    checkpoint,
    redis_followed,
    serving,
    wait_for,
)

USERS = [f"user-{i}" for i in range(60)]


def answer(client: TestClient, user: str | None = None) -> dict:
    body = {**CHAT, **({"user": user} if user else {})}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["X-Flywheel-Policy"] == response.json()["system_fingerprint"]
    return response.json()


def arm_of(client: TestClient, user: str) -> str:
    return answer(client, user)["system_fingerprint"]


def canary_of(client: TestClient) -> str | None:
    return client.get("/readyz").json().get("canary")


def test_canary_splits_sticky_per_user_on_two_replicas(settings: Settings, store: Store,
                                                       tmp_path: Path) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    checkpoint(settings, store, tmp_path, "policy-1")
    with serving(settings, store) as (a, engine_a), serving(settings, store) as (b, engine_b):
        assert redis_followed(a) and redis_followed(b)
        started = a.post("/v1/policies/policy-1/canary", json={"fraction": 0.3, "unit": "user"})
        assert started.status_code == 201, started.text
        assert started.json()["status"] == "canary" and started.json()["published"] is True
        assert started.json()["canary"]["fraction"] == 0.3
        assert wait_for(lambda: canary_of(b), lambda v: v == "policy-1") == "policy-1"
        replicas = a.get("/v1/policies").json()["replicas"]
        assert [(r["active"], r["canary"]) for r in replicas] == [("policy-0", "policy-1")] * 2
        arms = {user: arm_of(a, user) for user in USERS}
        on_canary = [u for u, arm in arms.items() if arm == "policy-1"]
        assert set(arms.values()) == {"policy-0", "policy-1"}
        assert 0.1 < len(on_canary) / len(USERS) < 0.5  # 0.3 of 60 users, binomial spread
        # Sticky: the same users get the same arm again, on the other replica too.
        assert {u: arm_of(b, u) for u in USERS} == arms
        assert {u: arm_of(a, u) for u in USERS[:10]} == {u: arms[u] for u in USERS[:10]}
        # Anonymous requests are split at random, in about the same share.
        anonymous = [answer(a)["system_fingerprint"] for _ in range(60)]
        assert 0 < anonymous.count("policy-1") < 40
        metrics = a.get("/metrics").text
        assert 'flywheel_canary_fraction{version="policy-1"} 0.3' in metrics
        listed = {p["id"]: p for p in a.get("/v1/policies").json()["data"]}
        assert listed["policy-1"]["status"] == "canary"
        assert a.get("/v1/policies").json()["canary"] == "policy-1"
        # Abort: every replica goes back to the active version alone.
        ended = a.delete("/v1/policies/policy-1/canary")
        assert ended.status_code == 200, ended.text
        assert ended.json()["status"] == "candidate"
        assert ended.json()["metrics"]["canary/decision"] == "aborted"
        assert wait_for(lambda: canary_of(b), lambda v: v is None) is None
        assert {arm_of(b, u) for u in on_canary} == {"policy-0"}
        assert engine_a.canary_version is None and engine_b.canary_version is None


def _stored_versions(store: Store, completion_id: str) -> tuple[str, list[str]]:
    """A stored completion's version and its answers', in order."""
    with store.engine.connect() as conn:
        first = conn.scalar(sa.select(Completion.policy_version)
                            .where(Completion.id == completion_id))
        each = conn.scalars(sa.select(Choice.policy_version)
                            .where(Choice.completion_id == completion_id)
                            .order_by(Choice.index)).all()
    assert first is not None
    return first, list(each)


@contextlib.contextmanager
def serving_a_canary_per_request(settings: Settings, store: Store, tmp_path: Path
                                 ) -> Iterator[tuple[TestClient, FakeEngine]]:
    """A replica serving policy-0, with policy-1 on canary at 0.5, assigned per request."""
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    checkpoint(settings, store, tmp_path, "policy-1")
    with serving(settings, store) as (client, engine):
        started = client.post("/v1/policies/policy-1/canary", json={"fraction": 0.5,
                                                                    "unit": "request"})
        assert started.status_code == 201, started.text
        assert wait_for(lambda: canary_of(client), lambda v: v == "policy-1") == "policy-1"
        yield client, engine


def test_a_per_request_canary_answers_one_request_from_both_arms(
        settings: Settings, store: Store, tmp_path: Path) -> None:
    """At fraction 0.5, a request for three answers gets one or two from the canary, in either
    order, each stored with the version that wrote it, as its stream chunks say; the thumbs
    count for that version."""
    with serving_a_canary_per_request(settings, store, tmp_path) as (a, engine):
        firsts = set()
        for _ in range(12):
            body = a.post("/v1/chat/completions", json={**CHAT, "n": 3, "user": "ann"}).json()
            first, each = _stored_versions(store, body["id"])
            assert each.count("policy-1") in (1, 2) and set(each) == {"policy-0", "policy-1"}
            assert first == each[0] == body["system_fingerprint"]
            assert [c["index"] for c in body["choices"]] == [0, 1, 2]
            assert [c["policy_version"] for c in body["choices"]] == each
            firsts.add(first)
        assert firsts == {"policy-0", "policy-1"}  # either arm first (1 in 2**11 to fail)
        with a.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "n": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines()
                      if line.startswith("data: {")]
        said = {c["index"]: e["system_fingerprint"] for e in events for c in e["choices"]}
        usage = events[-1]["usage"]
        one = a.post("/v1/chat/completions", json=CHAT).json()["usage"]
        assert usage["prompt_tokens"] == one["prompt_tokens"]  # the prompt counted once
        first, each = _stored_versions(store, events[0]["id"])
        assert each == [said[i] for i in range(3)] and set(each) == {"policy-0", "policy-1"}
        for index in range(3):
            response = a.post("/v1/feedback", json={"completion_id": events[0]["id"],
                                                    "choice_index": index, "rating": "up"})
            assert response.status_code == 201, response.text
        assert {v: up for v, (up, _) in store.live_ratings().items()} == {
            v: each.count(v) for v in ("policy-0", "policy-1")}
        generate = engine.generate

        async def canary_late(*args: Any, canary: bool = False, **kwargs: Any) -> Any:
            if canary:  # the other arm's first delta comes first
                await asyncio.sleep(0.05)
            async for delta in generate(*args, canary=canary, **kwargs):
                yield delta

        engine.generate = canary_late  # type: ignore[method-assign]
        for _ in range(8):  # the header names the first answer's version, as stored
            with a.stream("POST", "/v1/chat/completions",
                          json={**CHAT, "n": 3, "stream": True}) as streamed:
                header = streamed.headers["X-Flywheel-Policy"]
                lines = [line for line in streamed.iter_lines() if line.startswith("data: {")]
                first_id = json.loads(lines[0][6:])["id"]
            assert header == _stored_versions(store, first_id)[0]
        # A seeded request is never split (each arm would draw the same seeded answers).
        for _ in range(6):
            seeded = a.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 7}).json()
            assert len({c["policy_version"] for c in seeded["choices"]}) == 1


def test_a_split_request_takes_one_place_in_its_keys_queue_share(
        settings: Settings, store: Store, tmp_path: Path) -> None:
    """A request a canary splits is still one request to the admission bounds: with one
    waiting request allowed per key, n=2 is served on an idle server."""
    settings = settings.model_copy(update={"max_waiting_per_key": 1})
    with serving_a_canary_per_request(settings, store, tmp_path) as (a, _):
        for _ in range(6):
            response = a.post("/v1/chat/completions", json={**CHAT, "n": 2})
            assert response.status_code == 200, response.text
            assert {c["policy_version"] for c in response.json()["choices"]} == {
                "policy-0", "policy-1"}


def test_promoting_the_canary_serves_it_to_everyone(settings: Settings, store: Store,
                                                    tmp_path: Path) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    checkpoint(settings, store, tmp_path, "policy-1")
    with serving(settings, store) as (a, engine):
        assert a.post("/v1/policies/policy-1/canary", json={"fraction": 0.5}).status_code == 201
        promoted = a.post("/v1/policies/policy-1/activate")
        assert promoted.status_code == 200 and promoted.json()["status"] == "active"
        assert {arm_of(a, u) for u in USERS[:20]} == {"policy-1"}
        assert engine.canary_version is None
        assert canary_of(a) is None


def test_live_approval_per_version(settings: Settings, store: Store, tmp_path: Path) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    with serving(settings, store) as (a, _):
        for rating in ["up"] * 6 + ["down"] * 2:
            completion = answer(a)
            response = a.post("/v1/feedback", json={"completion_id": completion["id"],
                                                    "rating": rating})
            assert response.status_code == 201, response.text
        live = {p["id"]: p["live"] for p in a.get("/v1/policies").json()["data"]}["policy-0"]
        assert live["ratings"] == 8 and live["approval"] == 0.75
        low, high = live["interval"]
        assert 0.4 < low < 0.75 < high < 0.96
        one = a.get("/v1/policies/policy-0").json()
        assert one["live"] == live
        metrics = a.get("/metrics").text
        assert 'flywheel_policy_approval{version="policy-0"} 0.75' in metrics
        assert 'flywheel_policy_ratings{version="policy-0"} 8.0' in metrics
        assert f'flywheel_policy_approval_low{{version="policy-0"}} {low}' in metrics


def test_bad_canary_requests_are_4xx_and_change_nothing(settings: Settings, store: Store,
                                                        tmp_path: Path) -> None:
    checkpoint(settings, store, tmp_path, "policy-0", status="active")
    checkpoint(settings, store, tmp_path, "policy-1")
    checkpoint(settings, store, tmp_path, "policy-2", status="rejected")
    checkpoint(settings, store, tmp_path, "policy-3")
    with serving(settings, store) as (a, _):
        def state() -> dict[str, str]:
            return {p["id"]: p["status"] for p in a.get("/v1/policies").json()["data"]}

        before = state()
        cases = [
            ("post", "/v1/policies/policy-9/canary", {}, 404),
            ("post", "/v1/policies/policy-0/canary", {}, 409),
            ("post", "/v1/policies/policy-2/canary", {}, 400),
            ("post", "/v1/policies/policy-1/canary", {"fraction": 0}, 400),
            ("post", "/v1/policies/policy-1/canary", {"fraction": 1.0}, 400),
            ("post", "/v1/policies/policy-1/canary", {"fraction": "lots"}, 400),
            ("delete", "/v1/policies/policy-1/canary", None, 404),
        ]
        for method, url, body, status in cases:
            response = a.request(method.upper(), url, json=body)
            assert response.status_code in (status, 422 if status == 400 else status), (
                url, body, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert state() == before
        assert a.post("/v1/policies/policy-1/canary").status_code == 201
        second = a.post("/v1/policies/policy-3/canary")
        assert second.status_code == 409 and second.json()["error"]["code"] == "canary_running"
        wrong = a.delete("/v1/policies/policy-3/canary")
        assert wrong.status_code == 404
        assert state() == {**before, "policy-1": "canary"}
        forced = a.post("/v1/policies/policy-2/canary", json={"force": True})
        assert forced.status_code == 409  # still one canary at a time


def test_canary_survives_a_redis_restart(settings: Settings, store: Store, tmp_path: Path,
                                         own_redis: EmbeddedRedis) -> None:
    """A canary ended while Redis is down stays ended when Redis comes back with a stale key;
    one started while it is down reaches the replicas through SQL."""
    settings = _settings_on(settings, own_redis)
    keys = RedisKeys(settings.redis_namespace)
    active = checkpoint(settings, store, tmp_path, "policy-0", status="active")
    stale = checkpoint(settings, store, tmp_path, "policy-1")
    checkpoint(settings, store, tmp_path, "policy-2")
    with serving(settings, store) as (a, _), serving(settings, store) as (b, _):
        assert redis_followed(a) and redis_followed(b)
        assert a.post("/v1/policies/policy-1/canary").json()["published"] is True
        assert wait_for(lambda: canary_of(b), lambda v: v == "policy-1") == "policy-1"
        own_redis.stop()
        assert redis_followed(b, connected=False)
        assert a.delete("/v1/policies/policy-1/canary").json()["published"] is False
        assert wait_for(lambda: canary_of(b), lambda v: v is None) is None
        started = a.post("/v1/policies/policy-2/canary", json={"fraction": 0.4})
        assert started.status_code == 201 and started.json()["published"] is False
        assert wait_for(lambda: canary_of(b), lambda v: v == "policy-2") == "policy-2"
        # Redis comes back remembering policy-1 on canary: SQL wins on every replica.
        with EmbeddedRedis(own_redis.directory) as scratch:  # leaves a dump.rdb with the keys
            client = redis.Redis.from_url(scratch.url)
            client.set(keys.active_policy, active.to_json())
            client.set(keys.canary_policy,
                       CanaryMessage(stale.version, stale.path, stale.sha256, 0.9).to_json())
            client.save()
            client.close()
        own_redis.start()
        assert redis_followed(a) and redis_followed(b)
        assert canary_of(a) == canary_of(b) == "policy-2"
