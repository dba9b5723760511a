"""Alembic from code: the URL comes from the caller, the scripts from the installed package."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

import migrations
from feedback_store.base import UNAVAILABLE, normalize_url
from feedback_store.errors import StoreUnavailableError

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    """An Alembic config for this database; env.py reads the URL from `attributes`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["url"] = normalize_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database up to `revision` (the newest schema by default)."""
    try:
        with _sqlite_file_lock(url):
            command.upgrade(alembic_config(url), revision)
    except UNAVAILABLE as error:
        raise StoreUnavailableError(f"The database is unavailable: {error}") from error


@contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    """Upgrades of one SQLite file, one process at a time.

    BEGIN IMMEDIATE alone did not suffice: two processes creating a new file together could
    both run a migration (seen under load, "duplicate column"). PostgreSQL upgrades hold an
    advisory lock in migrations/env.py instead.
    """
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        yield
        return
    lock_path = Path(parsed.database).with_name(Path(parsed.database).name + ".migrate-lock")
    if not lock_path.parent.is_dir():
        yield  # SQLite itself will say that the database cannot be opened
        return
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database down to `revision` (an empty database by default)."""
    try:
        command.downgrade(alembic_config(url), revision)
    except UNAVAILABLE as error:
        raise StoreUnavailableError(f"The database is unavailable: {error}") from error
