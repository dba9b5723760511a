"""Engine set-up for SQLite and PostgreSQL, and the one-transaction-per-call helpers."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from feedback_store.errors import InvalidInputError, StoreUnavailableError

SQLITE_BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for the file lock, then 503
POSTGRES_CONNECT_TIMEOUT_S = 5  # an unreachable server fails fast into a 503, not a hang
UNAVAILABLE = (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)


def normalize_url(url: str) -> str:
    """Plain `postgresql://` (and `postgres://`) URLs use psycopg 3, the driver we ship."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_store_engine(url: str, *, pool_size: int = 20) -> Engine:
    """An engine with the per-backend settings the store relies on."""
    url = normalize_url(url)
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            # Each pooled connection would see its own empty database.
            raise ValueError("in-memory SQLite is not supported; give a file path")
        engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size)
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size // 2,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for writes."""
    # The driver's deferred BEGIN lets two writers both read, then fail to upgrade their locks
    # with SQLITE_BUSY (no busy wait); taking the write lock up front makes them queue on
    # busy_timeout instead. Readers use a plain BEGIN: WAL never blocks them. Recipe from the
    # SQLAlchemy docs, "Enabling Non-Legacy SQLite Transactional Modes".

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get("flywheel_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _read_only_is_a_lost_connection(context: sa.engine.ExceptionContext) -> None:
        # SQLite opens a connection read-only when the file is not writable at that moment, and it
        # stays read-only after the file is writable again. Treating the error as a disconnect
        # makes SQLAlchemy drop the whole pool, so the next connections open read-write.
        if "readonly database" in str(context.original_exception):
            context.is_disconnect = True


def _reason(error: Exception) -> str:
    """The driver's first line about a failure, without the SQL and parameters."""
    if isinstance(error, exc.DBAPIError):
        lines = str(error.orig).strip().splitlines()
        return f"{type(error.orig).__name__}: {lines[0] if lines else ''}"
    return type(error).__name__


@contextmanager
def _store_errors() -> Iterator[None]:
    """Connection failures, at connect or mid-transaction, become StoreUnavailableError; values
    the database refuses become InvalidInputError."""
    try:
        yield
    except UNAVAILABLE as error:
        raise StoreUnavailableError(f"The database is unavailable ({_reason(error)})") from error
    except exc.DataError as error:  # e.g. a NUL character, which PostgreSQL text refuses
        raise InvalidInputError(f"The database refused a value ({_reason(error)})") from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            raise StoreUnavailableError("The database connection was lost") from error
        raise


def storable(value: Any) -> Any:
    """`value` with every NUL character in its strings replaced by U+FFFD: PostgreSQL's text and
    JSON types refuse NUL, which a byte-level model can emit and a user can send. Applied on
    both databases, so what is stored does not depend on the backend."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def unix(value: datetime | None) -> int | None:
    """Unix seconds of a stored timestamp, as the records expose them."""
    return None if value is None else int(value.timestamp())


def request_hash(body: dict[str, Any]) -> str:
    """A stable fingerprint of a request body, to tell an idempotent retry from a new request."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def public_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class StoreBase:
    """Holds the engine and opens one transaction per public call."""

    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        self.url = normalize_url(url)
        self.engine = create_store_engine(self.url, pool_size=pool_size)
        self._reader = self.engine.execution_options(flywheel_write=False)
        self._autocommit = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "postgresql"
            else self.engine
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction, committed on success and rolled back on any error;
        connection failures, at connect or mid-transaction, become StoreUnavailableError."""
        bind = self.engine if write else self._reader
        with _store_errors(), Session(bind, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _writes(self) -> Iterator[sa.Connection]:
        """A Core connection in one write transaction (`_tx` without the ORM session, for the
        serving path's hottest writes). Errors as in `_tx`."""
        with _store_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _statement(self) -> Iterator[sa.Connection]:
        """A Core connection for a write that is one statement: it commits by itself on
        PostgreSQL, without the round trips of BEGIN and COMMIT; SQLite still takes its write
        lock with BEGIN IMMEDIATE and commits at the end. Errors as in `_tx`."""
        with _store_errors(), self._autocommit.begin() as conn:
            yield conn
