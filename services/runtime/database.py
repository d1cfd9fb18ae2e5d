"""Database engine and transactions: SQLite by default, PostgreSQL by URL.

SQLite allows one writer at a time, so a SQLite database gets one pooled
connection and every transaction starts with ``BEGIN IMMEDIATE``: concurrent
handlers queue for the connection instead of failing with "database is
locked", and a second process on the same file waits up to ``busy_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from observability.logging import redact_url
from services.runtime.errors import ConfigurationError

logger = logging.getLogger(__name__)

_SQLITE_BUSY_TIMEOUT_MS = 30_000


class Transaction:
    """An open database transaction plus callbacks to run once it commits."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run callback after a successful commit; it is dropped on rollback."""
        self._after_commit.append(callback)

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        """Execute a SQLAlchemy statement in this transaction."""
        return await self.connection.execute(statement, parameters)

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite (else PostgreSQL)."""
        return self.connection.dialect.name == "sqlite"

    def insert_ignoring_conflicts(self, table: Table) -> Any:
        """Return an INSERT that skips rows violating a unique constraint."""
        return _insert_ignoring_conflicts(self.is_sqlite, table)

    async def lock(self, key: str) -> None:
        """Hold a lock on key until this transaction ends, so work on one key runs serially.

        On PostgreSQL this is a transaction-scoped advisory lock on a 64-bit
        hash of key (a collision only makes two keys wait for each other).
        SQLite needs none because it runs one write transaction at a time.
        """
        if self.is_sqlite:
            return
        await self.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(key, 0))))


class Database:
    """One service's database: engine, schema creation and transactions."""

    def __init__(self, url: str, metadata: MetaData) -> None:
        self.url = url
        self.metadata = metadata
        self.engine: AsyncEngine = _create_engine(url)

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite (else PostgreSQL)."""
        return self.engine.dialect.name == "sqlite"

    async def create_schema(self) -> None:
        """Create missing tables and indexes; existing ones are left as they are."""
        async with self.engine.begin() as connection:
            await connection.run_sync(self.metadata.create_all)
        logger.info("database ready", extra={"database": redact_url(self.url)})

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Open a transaction that commits on exit and rolls back on an exception."""
        async with self.engine.begin() as connection:
            tx = Transaction(connection)
            yield tx
        for callback in tx._after_commit:
            callback()

    def insert_ignoring_conflicts(self, table: Table) -> Any:
        """Return an INSERT that skips rows violating a unique constraint."""
        return _insert_ignoring_conflicts(self.is_sqlite, table)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def _insert_ignoring_conflicts(is_sqlite: bool, table: Table) -> Any:
    dialect_insert = sqlite.insert if is_sqlite else postgresql.insert
    return dialect_insert(table).on_conflict_do_nothing()


def as_utc(value: datetime) -> datetime:
    """Return value as an aware UTC datetime; SQLite returns naive ones even for aware columns."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()

    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=120)
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        return engine

    if backend == "postgresql":
        return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)

    raise ConfigurationError(
        f"invalid TIDINGS_DATABASE_URL={redact_url(url)!r}: use sqlite+aiosqlite:///PATH "
        "or postgresql+asyncpg://USER@HOST/DB"
    )


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Leave transaction control to the "begin" hook below instead of the
    # driver's implicit BEGIN, which would start a deferred transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL keeps committed data through a process crash; a power loss can
    # lose the last transactions (FULL would sync every commit).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
