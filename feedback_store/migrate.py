"""Alembic from code: the URL comes from the caller, the scripts from the installed package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

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
        command.upgrade(alembic_config(url), revision)
    except UNAVAILABLE as error:
        raise StoreUnavailableError(f"The database is unavailable: {error}") from error


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database down to `revision` (an empty database by default)."""
    try:
        command.downgrade(alembic_config(url), revision)
    except UNAVAILABLE as error:
        raise StoreUnavailableError(f"The database is unavailable: {error}") from error
