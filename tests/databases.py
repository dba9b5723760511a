"""Throwaway databases for the tests, migrated once per test session.

SQLite: one file is migrated per session (Alembic, once) and copied for each test that takes
`store` (a file copy, under a millisecond). PostgreSQL: one database is migrated per session and
emptied for each such test: sessions left over from earlier tests are closed, every row is
deleted and every sequence restarted (~40 ms, where a database per test cost ~1.5 s to create,
migrate and drop). Tests that need an empty database of their own (migrations, outages) still get
a fresh one, dropped after. Creating and dropping PostgreSQL databases is bench/_databases.py,
shared with the benches.
"""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench._databases import create_database, drop_database

POSTGRES_URL = os.environ.get(
    "FLYWHEEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@functools.cache
def postgres_unreachable() -> str | None:
    """None when PostgreSQL answers, else the reason it does not (asked once per process)."""
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc.__class__.__name__}: {exc}"


def require_postgres() -> None:
    """Skip the test where PostgreSQL is not reachable; fail it on CI, where it must run."""
    reason = postgres_unreachable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason + " (on CI these tests must run)")
        pytest.skip(reason)


@contextmanager
def fresh_postgres(prefix: str = "flywheel_test") -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped (with its sessions) afterwards."""
    require_postgres()
    url = create_database(POSTGRES_URL, prefix)
    try:
        yield url
    finally:
        drop_database(POSTGRES_URL, url)


def migrate_sqlite(path: Path) -> str:
    """Migrate a new SQLite file at ``path`` to the newest schema; returns its URL.

    The write-ahead log is folded into the file, so copying the file alone copies everything.
    """
    from feedback_store import migrate

    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return url


def copy_sqlite(template: Path, path: Path) -> None:
    """Put a copy of the migrated ``template`` at ``path``, which must not exist yet."""
    if path.exists():
        raise FileExistsError(f"{path} exists: the test's database was opened before its copy")
    shutil.copyfile(template, path)


_migrated_postgres: str | None = None


def migrated_postgres() -> str:
    """This process's migrated PostgreSQL database: made and migrated on the first call."""
    global _migrated_postgres
    if _migrated_postgres is None:
        from feedback_store import migrate

        require_postgres()
        url = create_database(POSTGRES_URL, "flywheel_test_migrated")
        try:
            migrate.upgrade(url)
        except BaseException:
            drop_database(POSTGRES_URL, url)
            raise
        _migrated_postgres = url
    return _migrated_postgres


def drop_migrated_postgres() -> None:
    """Drop this process's migrated database, if one was made (at the end of the session)."""
    global _migrated_postgres
    url, _migrated_postgres = _migrated_postgres, None
    if url is not None:
        _engine(url).dispose()
        _engine.cache_clear()
        drop_database(POSTGRES_URL, url)


@functools.cache
def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)


def empty_postgres(url: str) -> None:
    """Empty a migrated database: close other sessions on it, delete every row (the schema and
    Alembic's version stay), restart every sequence. Faster here than TRUNCATE by 3-10x."""
    from feedback_store.models import Base

    with _engine(url).begin() as conn:
        # What DROP DATABASE ... WITH (FORCE) did: nothing an earlier test left behind (a pool, a
        # thread still writing) holds a lock or a connection into this test.
        conn.execute(sa.text(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"))
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(sa.text(
            "SELECT setval(format('%I.%I', schemaname, sequencename)::regclass, start_value, false)"
            " FROM pg_sequences WHERE schemaname = current_schema()"))
