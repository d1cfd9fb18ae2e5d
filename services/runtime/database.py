"""Database engine and transactions: SQLite by default, PostgreSQL by URL.

SQLite runs one writer at a time, so a service's SQLite database has one
connection, used through the standard ``sqlite3`` driver directly on the
event loop thread. Each transaction takes an asyncio lock, starts with
``BEGIN IMMEDIATE`` and runs its statements without leaving the thread. In one
measurement on the 2-CPU benchmark machine, a CreateUser transaction took about 0.14 ms in plain
sqlite3 but several ms through an async driver's thread hop per statement.
Transactions queue for the lock instead of failing with "database is
locked". A second process on the
same file (a replica) waits up to ``busy_timeout`` for the write lock, which
blocks that process's event loop meanwhile.

PostgreSQL uses asyncpg through SQLAlchemy's asyncio engine and a pool.
Transaction hides the difference: its methods are awaited either way. The
asyncio engine and the PostgreSQL dialect are imported only for a PostgreSQL
URL, which keeps about 9 MiB out of every SQLite service process.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, MetaData, Table, create_engine, event, func, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from observability.logging import redact_url
from services.runtime.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger(__name__)

# Names of SQLite savepoints, unique within the process so that nested ones never clash.
_savepoint_numbers = itertools.count()

_SQLITE_BUSY_TIMEOUT_MS = 30_000


class Transaction:
    """An open database transaction plus callbacks to run once it commits."""

    def __init__(self, connection: AsyncConnection | Connection) -> None:
        self.connection = connection
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run callback after a successful commit; it is dropped on rollback."""
        self._after_commit.append(callback)

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        """Execute a SQLAlchemy statement in this transaction and return its buffered result."""
        if isinstance(self.connection, Connection):
            return self.connection.execute(statement, parameters)
        return await self.connection.execute(statement, parameters)

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite (else PostgreSQL)."""
        return self.connection.dialect.name == "sqlite"

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """Run a block whose changes roll back alone if it raises, leaving the transaction open."""
        if isinstance(self.connection, Connection):
            # SQLite: straight on the sqlite3 connection, because SQLAlchemy's
            # nested transaction cost about 6 % of a consumer's CPU under load.
            driver = self.connection.connection.dbapi_connection
            assert driver is not None
            name = f"tidings_{next(_savepoint_numbers)}"
            driver.execute(f"SAVEPOINT {name}")
            try:
                yield
            except BaseException:
                driver.execute(f"ROLLBACK TO SAVEPOINT {name}")
                driver.execute(f"RELEASE SAVEPOINT {name}")
                raise
            driver.execute(f"RELEASE SAVEPOINT {name}")
        else:
            async with self.connection.begin_nested():
                yield

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
        self._sqlite: Engine | None = None
        self._async: AsyncEngine | None = None
        backend = make_url(url).get_backend_name()
        self._sqlite_connection: Connection | None = None
        if backend == "sqlite":
            self._sqlite = _create_sqlite_engine(url)
            self._sqlite_lock = asyncio.Lock()
        elif backend == "postgresql":
            from sqlalchemy.ext.asyncio import create_async_engine

            self._async = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        else:
            raise ConfigurationError(
                f"invalid TIDINGS_DATABASE_URL={redact_url(url)!r}: use sqlite:///PATH "
                "or postgresql+asyncpg://USER@HOST/DB"
            )

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite (else PostgreSQL)."""
        return self._sqlite is not None

    async def create_schema(self) -> None:
        """Create missing tables and indexes; existing ones are left as they are.

        Raises:
            ConfigurationError: The database cannot be reached or changed; the
                message names it (password masked) and the setting to check.
        """
        try:
            if self._sqlite is not None:
                async with self._sqlite_lock:
                    sqlite_connection = self._open_sqlite_connection()
                    with sqlite_connection.begin():
                        self.metadata.create_all(sqlite_connection)
            else:
                assert self._async is not None
                async with self._async.begin() as connection:
                    await connection.run_sync(self.metadata.create_all)
        except (SQLAlchemyError, OSError) as exc:
            cause = getattr(exc, "orig", None) or exc
            reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
            raise ConfigurationError(
                f"cannot open the database {redact_url(self.url)}: {reason}; check that it runs and "
                "that TIDINGS_DATABASE_URL (or TIDINGS_DATA_DIR for SQLite) names it"
            ) from exc
        logger.info("database ready", extra={"database": redact_url(self.url)})

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Open a transaction that commits on exit and rolls back on an exception."""
        if self._sqlite is not None:
            async with self._sqlite_lock:
                connection = self._open_sqlite_connection()
                try:
                    with connection.begin():
                        tx = Transaction(connection)
                        yield tx
                except BaseException:
                    _end_failed_transaction(connection)
                    raise
        else:
            assert self._async is not None
            async with self._async.begin() as async_connection:
                tx = Transaction(async_connection)
                yield tx
        for callback in tx._after_commit:
            callback()

    def _open_sqlite_connection(self) -> Connection:
        """Return the service's one SQLite connection, opening it again if an error invalidated it.

        Keeping it open saves the pool checkout, the reset and the return of
        each transaction: about 30 µs per transaction in a micro-benchmark.
        """
        assert self._sqlite is not None
        connection = self._sqlite_connection
        if connection is None or connection.closed or connection.invalidated:
            if connection is not None:
                connection.close()
            connection = self._sqlite.connect()
            self._sqlite_connection = connection
        return connection

    def insert_ignoring_conflicts(self, table: Table) -> Any:
        """Return an INSERT that skips rows violating a unique constraint."""
        return _insert_ignoring_conflicts(self.is_sqlite, table)

    async def close(self) -> None:
        """Close every connection."""
        if self._sqlite_connection is not None:
            self._sqlite_connection.close()
            self._sqlite_connection = None
        if self._sqlite is not None:
            self._sqlite.dispose()
        if self._async is not None:
            await self._async.dispose()


def _end_failed_transaction(connection: Connection) -> None:
    """Leave the kept-open SQLite connection outside any transaction after a failure.

    A failed COMMIT (a deferred constraint, for one) leaves sqlite3 inside
    the transaction, and SQLAlchemy sends no ROLLBACK for it. The connection is
    kept for the next transaction, which would then fail to begin, so it is
    rolled back here, or dropped when even that fails.
    """
    driver = connection.connection.dbapi_connection
    if driver is None or not driver.in_transaction:
        return
    try:
        driver.rollback()
    except Exception:
        logger.exception("rollback after a failed transaction failed; reopening the SQLite connection")
        connection.invalidate()


@functools.cache
def _insert_ignoring_conflicts(is_sqlite: bool, table: Table) -> Any:
    # Cached, so that each call site executes one statement object whose
    # compiled form SQLAlchemy finds by the key memoized on it.
    if is_sqlite:
        return sqlite.insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects import postgresql

    return postgresql.insert(table).on_conflict_do_nothing()


def as_utc(value: datetime) -> datetime:
    """Return value as an aware UTC datetime; SQLite returns naive ones even for aware columns."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _create_sqlite_engine(url: str) -> Engine:
    # The default URL names the aiosqlite driver; the file is the same for sqlite3.
    parsed = make_url(url).set(drivername="sqlite")
    if parsed.database and parsed.database != ":memory:":
        directory = Path(parsed.database).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the directory {str(directory)!r} of the SQLite database: "
                f"{exc.strerror}; set TIDINGS_DATA_DIR (or TIDINGS_DATABASE_URL) to a writable directory"
            ) from exc
    engine = create_engine(
        parsed,
        poolclass=StaticPool,
        connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_immediate)
    return engine


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
    # Straight on the sqlite3 connection: exec_driver_sql's statement
    # machinery took about as long as the BEGIN itself.
    connection.connection.dbapi_connection.execute("BEGIN IMMEDIATE")
