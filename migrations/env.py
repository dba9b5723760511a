"""Alembic environment: the URL comes from the caller (feedback_store.migrate) or, for the
alembic CLI, from FLYWHEEL_DATABASE_URL; never from alembic.ini."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from feedback_store.base import create_store_engine, normalize_url
from feedback_store.models import Base

config = context.config
target_metadata = Base.metadata

# PostgreSQL advisory lock key ("FLYW"): replicas that start together upgrade one at a time.
MIGRATION_LOCK_ID = 0x464C5957


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("FLYWHEEL_DATABASE_URL")
    if not url:
        raise RuntimeError(
            "No database URL: pass one to feedback_store.migrate or set FLYWHEEL_DATABASE_URL"
        )
    return normalize_url(url)


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (`alembic upgrade head --sql`)."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run in one transaction, serialized against concurrent upgrades of the same database."""
    # On PostgreSQL an advisory lock; on SQLite the store's engine takes the write lock at
    # BEGIN (BEGIN IMMEDIATE). Either way a second upgrader waits, then finds the schema current.
    engine = create_store_engine(_url(), pool_size=1)
    try:
        with engine.connect() as connection:
            is_sqlite = connection.dialect.name == "sqlite"
            if is_sqlite:
                # A batch operation copies a table into a new one; the copy of a table others
                # reference (choices) must not trip their foreign keys half-way. SQLite takes
                # this pragma outside a transaction only: on the driver's connection, before
                # SQLAlchemy begins one.
                driver = connection.connection.driver_connection
                assert driver is not None
                driver.execute("PRAGMA foreign_keys = OFF")
            _configure(connection=connection, render_as_batch=is_sqlite)
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_ID}
                    )
                context.run_migrations()
                if is_sqlite and (broken := connection.exec_driver_sql(
                        "PRAGMA foreign_key_check").first()) is not None:
                    raise RuntimeError(f"a migration broke a foreign key: {tuple(broken)}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
