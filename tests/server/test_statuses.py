"""Status codes: 404 for unknown ids of any size, Allow on 405, 401 versus 403, idempotency keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.helpers import feedback_counts
from tests.server.conftest import make_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(tmp_path: Path, db_url: str, store: Store) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, db_url, api_keys="k1, k2", admin_key="root")
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        yield c


@pytest.mark.parametrize("run_id", [7, 2**31 - 1, 2835719709, 2**63 - 1, 2**63 + 5, 10**30,
                                    0, -1, -(2**63) - 1])
def test_unknown_run_of_any_size_is_404(client: TestClient, run_id: int) -> None:
    response = client.get(f"/v1/training/runs/{run_id}")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "run_not_found"
    assert error["message"] == f"No training run {run_id}"  # no database text


def test_known_run_is_found(client: TestClient) -> None:
    run = client.post("/v1/training/runs").json()
    assert client.get(f"/v1/training/runs/{run['id']}").json()["id"] == run["id"]


@pytest.mark.parametrize("policy_id", ["policy-999", "x" * 300, "2835719709"])
def test_unknown_policy_is_404(client: TestClient, policy_id: str) -> None:
    for method, path in (("GET", ""), ("POST", "/activate"), ("POST", "/canary"),
                         ("DELETE", "/canary")):
        response = client.request(method, f"/v1/policies/{policy_id}{path}")
        assert response.status_code == 404, (method, path, response.text)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("DELETE", "/v1/chat/completions", "POST"),
    ("GET", "/v1/completions", "POST"),
    ("PUT", "/v1/training/runs", "GET, POST"),  # two routes: Starlette names one of them
    ("PATCH", "/v1/policies/policy-0/canary", "DELETE, POST"),
    ("POST", "/v1/models", "GET"),
    ("DELETE", "/metrics", "GET"),
])
def test_every_405_names_the_allowed_methods(client: TestClient, method: str, path: str,
                                             allow: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_missing_or_wrong_key_is_401_with_a_bearer_challenge(keyed: TestClient) -> None:
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/feedback/export", "GET"),
                         ("/v1/training/runs", "POST")):
        json = CHAT if path == "/v1/chat/completions" else None
        missing = keyed.request(method, path, json=json)
        assert missing.status_code == 401, path
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = keyed.request(method, path, json=json, headers=bearer("nope"))
        assert wrong.status_code == 401, path
        assert wrong.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert wrong.json()["error"]["type"] == "authentication_error"


def test_a_valid_user_key_on_an_admin_route_is_403(keyed: TestClient) -> None:
    for method, path in (("GET", "/v1/feedback/export"), ("POST", "/v1/training/runs"),
                         ("GET", "/v1/training/runs/1"),
                         ("POST", "/v1/policies/policy-0/activate")):
        response = keyed.request(method, path, headers=bearer("k2"))
        assert response.status_code == 403, path
        assert "WWW-Authenticate" not in response.headers
        assert response.json()["error"]["type"] == "permission_error"
    assert keyed.get("/v1/feedback/export", headers=bearer("root")).status_code == 200


def test_admin_closed_without_admin_key_tells_401_from_403(tmp_path: Path,
                                                           sqlite_url: str) -> None:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1")
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        assert c.get("/v1/training/runs", headers=bearer("bad")).status_code == 401
        assert c.get("/v1/training/runs", headers=bearer("k1")).status_code == 403
    store.close()


def test_empty_idempotency_key_is_400(client: TestClient, store: Store) -> None:
    cid = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    for key in ("", "   "):
        response = client.post("/v1/feedback", json={"completion_id": cid, "rating": "up"},
                               headers={"Idempotency-Key": key})
        assert response.status_code == 400, (key, response.text)
        assert response.json()["error"]["param"] in ("Idempotency-Key", "idempotency_key")
        ranking = client.post("/v1/rankings", json={"completion_id": cid, "ranking": [0, 1]},
                              headers={"Idempotency-Key": key})
        assert ranking.status_code == 400, (key, ranking.text)
    assert feedback_counts(store)["up"] == 0


def test_idempotency_keys_are_scoped_per_api_key(keyed: TestClient, store: Store) -> None:
    cid = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer("k1")).json()["id"]
    cid2 = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer("k2")).json()["id"]
    body, body2 = {"completion_id": cid, "rating": "up"}, {"completion_id": cid2, "rating": "up"}
    same = {"Idempotency-Key": "retry-1"}
    first = keyed.post("/v1/feedback", json=body, headers={**same, **bearer("k1")})
    other = keyed.post("/v1/feedback", json=body2, headers={**same, **bearer("k2")})
    assert first.status_code == other.status_code == 201
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
    again = keyed.post("/v1/feedback", json=body, headers={**same, **bearer("k1")})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert feedback_counts(store)["up"] == 2
    # A different body under the key k2 already used: refused within k2's scope only.
    down = {**body, "rating": "down"}
    assert keyed.post("/v1/feedback", json={**body2, "rating": "down"},
                      headers={**same, **bearer("k2")}).status_code == 422
    assert keyed.post("/v1/feedback", json=down, headers={"Idempotency-Key": "retry-1",
                                                          **bearer("root")}).status_code == 201

    ranking = {"completion_id": cid, "ranking": [1, 0]}
    r1 = keyed.post("/v1/rankings", json=ranking, headers={**same, **bearer("k1")})
    r2 = keyed.post("/v1/rankings", json={**ranking, "completion_id": cid2},
                    headers={**same, **bearer("k2")})
    assert r1.status_code == r2.status_code == 201
    assert r1.json()["id"] != r2.json()["id"]
    r1_again = keyed.post("/v1/rankings", json=ranking, headers={**same, **bearer("k1")})
    assert r1_again.json()["id"] == r1.json()["id"]


def test_unscoped_keys_without_api_keys(client: TestClient, store: Store) -> None:
    """Without keys every caller shares one scope, whatever bearer token it sends."""
    cid = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    body = {"completion_id": cid, "rating": "up"}
    first = client.post("/v1/feedback", json=body,
                        headers={"Idempotency-Key": "k", **bearer("a")})
    second = client.post("/v1/feedback", json=body,
                         headers={"Idempotency-Key": "k", **bearer("b")})
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
