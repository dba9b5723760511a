"""A migrated Store on each database, and helpers that store served completions."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from feedback_store import NewChoice, NewCompletion, Store, migrate
from feedback_store.models import Base
from tests.conftest import _PG_REASON, POSTGRES_URL


@pytest.fixture(scope="session")
def migrated_postgres_url() -> Iterator[str]:
    """One PostgreSQL database for this folder, migrated once (CREATE DATABASE costs ~1 s)."""
    if _PG_REASON is not None:
        if os.environ.get("CI"):
            pytest.fail(_PG_REASON + " (on CI these tests must run)")
        pytest.skip(_PG_REASON)
    name = f"flywheel_store_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Store]:
    """A Store on an empty, migrated database: SQLite, then PostgreSQL (emptied per test).

    Migration tests use `db_url` (a fresh database each); the rest share one PostgreSQL
    database and empty it, which keeps the folder fast.
    """
    if request.param == "postgres":
        url = request.getfixturevalue("migrated_postgres_url")
        _empty_postgres(url)
    else:
        url = sqlite_url
        migrate.upgrade(url)
    s = Store(url)
    yield s
    s.close()


def _empty_postgres(url: str) -> None:
    """Delete every row and restart the id sequences (10x faster than TRUNCATE here)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
        for table in Base.metadata.sorted_tables:
            id_column = table.c.get("id")
            if id_column is not None and isinstance(id_column.type, sa.Integer):
                sequence = f"pg_get_serial_sequence('{table.name}', 'id')"
                conn.execute(sa.text(f"SELECT setval({sequence}, 1, false)"))
    engine.dispose()


def add_completion(
    store: Store,
    cid: str,
    *,
    prompt: str = "Hello?",
    texts: tuple[str, ...] = ("Hi!", "Go away."),
    kind: str = "chat",
    policy_version: str = "policy-0",
) -> None:
    """Store a completion of `prompt` with one choice per text (token ids from the text)."""
    store.record_completion(
        NewCompletion(
            id=cid,
            kind=kind,  # type: ignore[arg-type]
            prompt_text=prompt,
            prompt_token_ids=[ord(ch) for ch in prompt],
            messages=[{"role": "user", "content": prompt}] if kind == "chat" else None,
            model="flywheel",
            policy_version=policy_version,
            params={"n": len(texts), "temperature": 1.0},
            choices=[
                NewChoice(i, text, [ord(ch) for ch in text], [-0.5] * len(text), "stop")
                for i, text in enumerate(texts)
            ],
        )
    )


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0
