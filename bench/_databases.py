"""Throwaway PostgreSQL databases, made beside an existing one and dropped after: the one
implementation for the benches and the tests (tests/databases.py)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa


def create_database(admin_url: str, prefix: str) -> str:
    """A new, empty database on ``admin_url``'s server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database at ``url``, closing its sessions."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()
