"""Bearer keys on /v1/*, the admin key on admin routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.server.conftest import make_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def keyed(tmp_path: Path, sqlite_url: str) -> Iterator[TestClient]:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1, k2", admin_key="root")
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        yield c
    store.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_user_routes_need_a_key(keyed: TestClient) -> None:
    assert keyed.post("/v1/chat/completions", json=CHAT).status_code == 401
    wrong = keyed.post("/v1/chat/completions", json=CHAT, headers=bearer("nope"))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert keyed.post("/v1/chat/completions", json=CHAT, headers=bearer("k2")).status_code == 200
    assert keyed.get("/v1/models", headers=bearer("k1")).status_code == 200


def test_open_routes_stay_open(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 404  # closed with keys: see test_exposure.py


def test_admin_routes_need_the_admin_key(keyed: TestClient) -> None:
    assert keyed.get("/v1/feedback/export").status_code == 401
    assert keyed.get("/v1/feedback/export", headers=bearer("k1")).status_code == 403
    assert keyed.get("/v1/feedback/export", headers=bearer("root")).status_code == 200
    assert keyed.post("/v1/training/runs", headers=bearer("k1")).status_code == 403
    assert keyed.post("/v1/training/runs", headers=bearer("root")).status_code == 201


def test_admin_closed_without_admin_key(tmp_path: Path, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url, api_keys="k1")
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        response = c.get("/v1/training/runs", headers=bearer("k1"))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_disabled"
    store.close()
