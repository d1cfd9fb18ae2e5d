"""The SQLite database: start-up errors and the connection kept across transactions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, insert, select
from sqlalchemy.exc import IntegrityError

from services.runtime.cli.embedded_nats import free_port
from services.runtime.database import Database
from services.runtime.errors import ConfigurationError

metadata = MetaData()
counters = Table("counters", metadata, Column("id", Integer, primary_key=True))
# A foreign key checked only at COMMIT, so that a transaction can fail in its commit.
parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
children = Table(
    "children",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("parent_id", Integer, ForeignKey("parents.id", deferrable=True, initially="DEFERRED")),
)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    opened = Database(f"sqlite:///{tmp_path}/counters.db", metadata)
    await opened.create_schema()
    yield opened
    await opened.close()


async def _ids(database: Database) -> list[int]:
    async with database.transaction() as tx:
        return sorted((await tx.execute(select(counters.c.id))).scalars().all())


def test_data_dir_error_names_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    with pytest.raises(ConfigurationError, match="set TIDINGS_DATA_DIR"):
        Database(f"sqlite:///{blocker}/data/users.db", metadata)


def test_data_dir_error_names_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")

    with pytest.raises(ConfigurationError, match=str(blocker / "data")):
        Database(f"sqlite:///{blocker}/data/users.db", metadata)


async def test_database_commits_across_transactions(database: Database) -> None:
    for row_id in (1, 2):
        async with database.transaction() as tx:
            await tx.execute(insert(counters).values(id=row_id))

    ids = await _ids(database)

    assert ids == [1, 2]


async def test_rollback_keeps_connection_usable(database: Database) -> None:
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            await tx.execute(insert(counters).values(id=1))
            raise RuntimeError("handler failed")

    async with database.transaction() as tx:
        await tx.execute(insert(counters).values(id=1))
    ids = await _ids(database)

    assert ids == [1]


async def test_savepoint_failure_rolls_back_only_block(database: Database) -> None:
    async with database.transaction() as tx:
        await tx.execute(insert(counters).values(id=1))
        with pytest.raises(RuntimeError):
            async with tx.savepoint():
                await tx.execute(insert(counters).values(id=2))
                raise RuntimeError("handler failed")
        await tx.execute(insert(counters).values(id=3))

    ids = await _ids(database)

    assert ids == [1, 3]


async def test_savepoint_success_keeps_block(database: Database) -> None:
    async with database.transaction() as tx, tx.savepoint():
        await tx.execute(insert(counters).values(id=1))
        async with tx.savepoint():
            await tx.execute(insert(counters).values(id=2))

    ids = await _ids(database)

    assert ids == [1, 2]


async def test_savepoint_integrity_error_keeps_transaction(database: Database) -> None:
    async with database.transaction() as tx:
        await tx.execute(insert(counters).values(id=1))
        with pytest.raises(IntegrityError):
            async with tx.savepoint():
                await tx.execute(insert(counters).values(id=1))
        await tx.execute(insert(counters).values(id=2))

    ids = await _ids(database)

    assert ids == [1, 2]


@pytest.mark.parametrize("failures", [1, 2])
async def test_failed_commits_keep_connection_usable(database: Database, failures: int) -> None:
    for _ in range(failures):
        with pytest.raises(IntegrityError):
            async with database.transaction() as tx:
                await tx.execute(insert(children).values(id=1, parent_id=99))

    async with database.transaction() as tx:
        await tx.execute(insert(counters).values(id=7))
    ids = await _ids(database)

    assert ids == [7]


def test_insert_ignoring_conflicts_is_cached(database: Database) -> None:
    # One statement object per table keeps SQLAlchemy's compiled cache hits cheap.
    assert database.insert_ignoring_conflicts(counters) is database.insert_ignoring_conflicts(counters)


async def _unreachable_database_error() -> str:
    # Nothing listens on a fresh free loopback port, so the connection is refused.
    url = f"postgresql+asyncpg://tidings:hunter2-secret@127.0.0.1:{free_port()}/tidings"
    database = Database(url, MetaData())

    with pytest.raises(ConfigurationError) as failure:
        await database.create_schema()
    return str(failure.value)


async def test_unreachable_database_names_the_setting() -> None:
    assert "TIDINGS_DATABASE_URL" in await _unreachable_database_error()


async def test_unreachable_database_error_masks_the_password() -> None:
    assert "hunter2-secret" not in await _unreachable_database_error()
