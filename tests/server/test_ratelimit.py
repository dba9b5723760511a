"""Per-identity rate limit on the feedback routes, identities of keyed callers, the admin view."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from feedback_store.identities import Tally
from flywheel.settings import FeedbackLimits
from server.app import create_app
from server.engines.fake import FakeEngine
from server.ratelimit import RateLimiter
from tests.server.conftest import make_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1.0)  # one token a second
    assert limiter.take("b") == 0.0  # each identity its own bucket
    now[0] = 1.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] = 100.0
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]  # refilled to the burst only
    assert limiter.take("a") > 0
    assert not RateLimiter(0, 5).enabled and RateLimiter(0, 5).take("a") == 0.0


@pytest.fixture
def keyed(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[TestClient, Store]]:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1, k2", admin_key="root",
                             feedback=FeedbackLimits(rate_per_minute=1, rate_burst=2))
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        yield c, store
    store.close()


def _completion(client: TestClient, key: str) -> str:
    response = client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert response.status_code == 200
    return str(response.json()["id"])


def test_feedback_past_the_rate_is_429(keyed: tuple[TestClient, Store]) -> None:
    """The bucket is the rater's: an untrusted key's users share one, so a new `user` per post
    buys no more posts; another key has its own."""
    client, store = keyed
    cid, other = _completion(client, "k1"), _completion(client, "k2")

    def thumb(key: str, user: str | None = None, index: int = 0, on: str = cid) -> int:
        body = {"completion_id": on, "choice_index": index, "rating": "up", "user": user}
        return client.post("/v1/feedback", json=body, headers=bearer(key)).status_code

    assert [thumb("k1"), thumb("k1", index=1)] == [201, 201]
    limited = client.post("/v1/rankings", json={"completion_id": cid, "ranking": [0, 1]},
                          headers=bearer("k1"))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "feedback_rate_limited"
    assert [thumb("k1", "alice"), thumb("k1", "mallory-2")] == [429, 429]  # minted: one bucket
    assert thumb("k2", on=other) == 201  # another key, another rater
    assert thumb("k2", on=cid) == 403  # k1's answer
    identities = sorted(t.identity for t in store.reward_data("all").thumbs)
    assert len(identities) == 3 and all(i.startswith("key:") for i in identities)
    assert len(set(identities)) == 2  # k1 and k2


def test_no_limit_by_default(tmp_path: Path, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url)
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        cid = c.post("/v1/chat/completions", json=CHAT).json()["id"]
        codes = {c.post("/v1/feedback", json={"completion_id": cid, "choice_index": 0,
                                              "rating": "up"}).status_code for _ in range(40)}
        assert codes == {201}
    store.close()


def test_admin_sees_identities_and_weights(keyed: tuple[TestClient, Store]) -> None:
    client, store = keyed
    store.record_tallies({"user:mallory": Tally(200, 200, 30), "user:alice": Tally(50, 50, 40)},
                         0.1)
    assert client.get("/v1/identities", headers=bearer("k1")).status_code == 403
    body = client.get("/v1/identities", headers=bearer("root")).json()
    assert [(r["identity"], r["weight"]) for r in body["data"]] == [
        ("user:mallory", 0.1), ("user:alice", 1.0)]
    assert body["user_share"] == 0.1 and body["data"][0]["agreement"] == 0.15
    page = client.get("/v1/identities", params={"limit": 1, "offset": 1}, headers=bearer("root"))
    assert [r["identity"] for r in page.json()["data"]] == ["user:alice"]
    assert client.get("/v1/identities", params={"limit": 0},
                      headers=bearer("root")).status_code == 400
