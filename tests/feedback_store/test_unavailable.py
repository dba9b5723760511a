"""Unreachable or failing databases raise StoreUnavailableError and leave nothing written."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from feedback_store import Store, migrate
from feedback_store.errors import StoreUnavailableError
from tests.helpers import feedback_counts

from .conftest import _empty_postgres, add_completion, count

CLOSED_PORT_URL = "postgresql+psycopg://postgres@127.0.0.1:1/flywheel"


@pytest.mark.parametrize(
    "url", [CLOSED_PORT_URL, "sqlite:////nonexistent-dir/flywheel.db"], ids=["postgres", "sqlite"]
)
def test_unreachable_database(url: str) -> None:
    store = Store(url)
    with pytest.raises(StoreUnavailableError):
        store.ping()
    with pytest.raises(StoreUnavailableError):
        add_completion(store, "chatcmpl-1")
    with pytest.raises(StoreUnavailableError):
        store.add_feedback(completion_id="chatcmpl-1", choice_index=0, rating="up")
    with pytest.raises(StoreUnavailableError):
        store.list_policies()
    with pytest.raises(StoreUnavailableError):
        migrate.upgrade(url)
    store.close()


@pytest.mark.postgres
def test_connection_lost_mid_transaction(migrated_postgres_url: str) -> None:
    """The server kills the session between two inserts: nothing stays, the next call works."""
    _empty_postgres(migrated_postgres_url)
    store = Store(migrated_postgres_url)
    admin = sa.create_engine(migrated_postgres_url)

    def kill_before_choices(conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO choices"):
            pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
            with admin.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})

    event.listen(store.engine, "before_cursor_execute", kill_before_choices)
    with pytest.raises(StoreUnavailableError):
        add_completion(store, "chatcmpl-1")
    event.remove(store.engine, "before_cursor_execute", kill_before_choices)
    assert (count(store, "prompts"), count(store, "completions")) == (0, 0)
    add_completion(store, "chatcmpl-2")
    assert count(store, "choices") == 2
    store.close()
    admin.dispose()


def test_sqlite_lock_timeout(sqlite_url: str) -> None:
    """Another writer holding the file lock past busy_timeout is a retryable 503, not a 500."""
    migrate.upgrade(sqlite_url)
    store = Store(sqlite_url)

    @event.listens_for(store.engine, "connect")
    def _short_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout = 50")

    blocker = sqlite3.connect(Path(sqlite_url.removeprefix("sqlite:///")), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError):
            add_completion(store, "chatcmpl-1")
        assert feedback_counts(store) == {"up": 0, "down": 0, "rankings": 0}  # reads go on
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (count(store, "prompts"), count(store, "completions")) == (0, 0)
    store.close()
