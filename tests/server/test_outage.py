"""The database goes away under a running server: feedback gets 503, completions go on."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from feedback_store import Store
from server.app import create_app
from server.engines.fake import FakeEngine
from tests.conftest import POSTGRES_URL
from tests.helpers import feedback_counts
from tests.server.conftest import make_settings


@contextmanager
def database_down(url: str) -> Iterator[None]:
    """Refuse new connections to the database and cut the open ones."""
    name = url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


@pytest.mark.postgres
def test_feedback_503_while_completions_continue(tmp_path: Path, postgres_url: str) -> None:
    store = Store(postgres_url)
    settings = make_settings(tmp_path, postgres_url)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        served = c.post("/v1/chat/completions", json=chat).json()
        with database_down(postgres_url):
            response = c.post("/v1/feedback", json={"completion_id": served["id"],
                                                     "rating": "up"})
            assert response.status_code == 503
            assert response.headers["Retry-After"]
            assert response.json()["error"]["code"] == "database_unavailable"
            ranking = c.post("/v1/rankings", json={"completion_id": served["id"],
                                                    "ranking": [0, 0]})
            assert ranking.status_code == 400  # validation still answers without the database
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
            assert c.get("/readyz").status_code == 503
        assert c.get("/readyz").status_code == 200
        retry = c.post("/v1/feedback", json={"completion_id": served["id"], "rating": "up"})
        assert retry.status_code == 201
    assert feedback_counts(store)["up"] == 1
    store.close()


@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make the SQLite file unwritable even for root (the immutable attribute)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_sqlite_writable_again_after_a_read_only_spell(tmp_path: Path, sqlite_url: str) -> None:
    """Connections SQLite opened while the file was read-only stay read-only; the store drops
    them on the first such error, and readiness checks that a write would succeed."""
    store = Store(sqlite_url)
    settings = make_settings(tmp_path, sqlite_url)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 4}
    with TestClient(create_app(settings, engine=FakeEngine(), store=store, watch=False)) as c:
        served = c.post("/v1/chat/completions", json=chat).json()
        assert c.get("/readyz").status_code == 200
        with read_only_file(Path(store.engine.url.database or "")):
            store.engine.dispose()  # the pool opens its next connections during the outage
            assert c.get("/readyz").status_code == 503
            for i in range(4):
                response = c.post("/v1/feedback", json={"completion_id": served["id"],
                                                         "choice_index": i, "rating": "up"})
                assert response.status_code == 503, response.text
        assert c.get("/readyz").status_code == 200
        for i in range(4):
            response = c.post("/v1/feedback", json={"completion_id": served["id"],
                                                     "choice_index": i, "rating": "down"})
            assert response.status_code == 201, response.text
    assert feedback_counts(store) == {"up": 0, "down": 4, "rankings": 0}
    store.close()
