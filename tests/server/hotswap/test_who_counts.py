"""Who counts, live: raters bound to API keys on a server with keys, a trusted front-end, a key
minting `user` ids against a canary, a re-vote, and a key rating another key's answer (fake
engines, SQLite, a real Redis; the judge's own rules decide)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from feedback_store import Store
from feedback_store.models import Completion
from flywheel.serving_plan import Publisher
from flywheel.settings import Settings
from tests.server.hotswap.conftest import CHAT, checkpoint, serving, wait_for
from trainer_worker.promotion import Promotion

KEYS = {"alice": "alice-key", "bob": "bob-key", "app": "app-key", "mint": "mint-key"}
ADMIN = "admin-key"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "api_keys": ",".join(KEYS.values()), "admin_key": ADMIN, "trusted_keys": KEYS["app"]})


@pytest.fixture
def client(keyed: Settings, store: Store, tmp_path: Path) -> Iterator[TestClient]:
    checkpoint(keyed, store, tmp_path, "policy-0", status="active")
    with serving(keyed, store) as (client, _):
        yield client


def _answer(client: TestClient, key: str, user: str | None = None) -> tuple[str, str]:
    """(completion id, the version that answered)."""
    body = {**CHAT, **({"user": user} if user else {})}
    response = client.post("/v1/chat/completions", json=body, headers=_auth(key))
    assert response.status_code == 200, response.text
    return response.json()["id"], response.json()["system_fingerprint"]


def _thumb(client: TestClient, key: str, completion: str, rating: str,
           user: str | None = None) -> int:
    body = {"completion_id": completion, "rating": rating, **({"user": user} if user else {})}
    return client.post("/v1/feedback", json=body, headers=_auth(key)).status_code


def test_a_key_rates_only_the_answers_it_received(client: TestClient) -> None:
    mine, _ = _answer(client, KEYS["alice"], "alice")
    other, _ = _answer(client, KEYS["alice"], "alice")
    refused = client.post("/v1/feedback", json={"completion_id": mine, "rating": "down",
                                                "user": "alice"}, headers=_auth(KEYS["bob"]))
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "not_your_completion"
    ranked = client.post("/v1/rankings", json={"items": [
        {"completion_id": mine}, {"completion_id": other}]}, headers=_auth(KEYS["bob"]))
    assert ranked.status_code == 403, ranked.text
    assert _thumb(client, KEYS["alice"], mine, "up", "alice") == 201
    assert _thumb(client, ADMIN, other, "down") == 201  # the admin key may rate any answer
    live = client.get("/v1/policies", headers=_auth(ADMIN)).json()["data"][0]["live"]
    assert live["ratings"] == 2  # bob's refused thumb counted nowhere


def test_a_new_vote_replaces_the_old_one(client: TestClient) -> None:
    answer, _ = _answer(client, KEYS["app"], "carol")
    for rating in ("up", "down", "up", "down"):
        assert _thumb(client, KEYS["app"], answer, rating, "carol") == 201
    assert _thumb(client, KEYS["app"], answer, "up", "dave") == 201  # another of app's raters
    live = client.get("/v1/policies", headers=_auth(ADMIN)).json()["data"][0]["live"]
    assert live["ratings"] == 2 and live["approval"] == 0.5


def _canary(client: TestClient, keyed: Settings, store: Store, tmp_path: Path) -> None:
    checkpoint(keyed, store, tmp_path, "policy-1")
    started = client.post("/v1/policies/policy-1/canary", json={"fraction": 0.5},
                          headers=_auth(ADMIN))
    assert started.status_code == 201, started.text
    assert started.json()["canary"]["unit"] == "request"  # few raters: each sees both arms
    # Rate only once the server splits requests: answers served before are the active's alone,
    # and their raters would count on one arm only.
    assert wait_for(lambda: client.get("/readyz").json().get("canary"),
                    lambda version: version == "policy-1") == "policy-1"


def _rate_arms(client: TestClient, key: str, users: list[str], answers: int, p_canary: float,
               p_active: float, rng: random.Random) -> None:
    """Each user asks `answers` times and thumbs what it got: the canary's answers up with
    probability `p_canary`, the active version's with `p_active`."""
    for user in users:
        for _ in range(answers):
            completion, version = _answer(client, key, user)
            p = p_canary if version == "policy-1" else p_active
            assert _thumb(client, key, completion, "up" if rng.random() < p else "down",
                          user) == 201


def _judge(keyed: Settings, store: Store) -> tuple[str | None, dict]:
    publisher = Publisher.from_url(keyed.redis_url, keyed.redis_namespace)
    try:
        outcome = Promotion(keyed, store, publisher).tick()
    finally:
        publisher.close()
    return outcome, store.get_policy("policy-1")


@pytest.mark.slow
def test_minted_ids_under_one_key_decide_nothing(client: TestClient, keyed: Settings,
                                                 store: Store, tmp_path: Path) -> None:
    """One key sending 300 chats, each under a new `user`, thumbing the canary up and the
    active version down: one rater, alone, so the canary stays undecided and says why."""
    _canary(client, keyed, store, tmp_path)
    _rate_arms(client, KEYS["mint"], [f"minted-{i}" for i in range(300)], 1, 1.0, 0.0,
               random.Random(0))
    outcome, row = _judge(keyed, store)
    assert outcome is None and row["status"] == "canary"
    assert "one untrusted API key" in row["metrics"]["canary/reason"]
    listed = client.get("/v1/policies", headers=_auth(ADMIN)).json()["data"]
    assert "one untrusted API key" in next(p for p in listed if p["id"] == "policy-1")["reason"]


@pytest.mark.slow
def test_a_trusted_front_end_decides_against_a_minting_key(
        client: TestClient, keyed: Settings, store: Store, tmp_path: Path) -> None:
    """A trusted front-end's 30 users find the canary worse; a key minting 300 ids thumbs it up
    as much as all of them together. The 30 users decide: rejected."""
    _canary(client, keyed, store, tmp_path)
    rng = random.Random(1)
    _rate_arms(client, KEYS["app"], [f"user-{i}" for i in range(30)], 10, 0.3, 0.7, rng)
    _rate_arms(client, KEYS["mint"], [f"minted-{i}" for i in range(300)], 1, 1.0, 0.0, rng)
    outcome, row = _judge(keyed, store)
    assert outcome == "rejected", row["metrics"]
    assert row["status"] == "rejected"


def test_a_canary_counts_answers_from_its_first_second(client: TestClient, keyed: Settings,
                                                       store: Store, tmp_path: Path) -> None:
    """Answers are stored at the time they were made, to the microsecond (`created` is whole
    seconds): those served in the second the canary started are its evidence too."""
    _canary(client, keyed, store, tmp_path)
    before = time.time()
    served: dict[str, str] = {}
    while len(served) < 2:
        completion, version = _answer(client, KEYS["app"], "erin")
        served.setdefault(version, completion)
    for completion in served.values():
        assert _thumb(client, KEYS["app"], completion, "up", "erin") == 201
    with store.engine.connect() as conn:
        made = conn.scalar(sa.select(sa.func.min(Completion.created_at)))
    assert made is not None and made.replace(tzinfo=timezone.utc).timestamp() >= before
    evidence = store.canary_evidence() or {}
    assert all(evidence[version] for version in ("policy-0", "policy-1")), evidence
