"""Tables and queries of the users service."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from services.runtime.database import Transaction, as_utc
from services.runtime.errors import AlreadyExists, NotFound
from tidings.users.v1 import user_pb2

metadata = MetaData()

users = Table(
    "users",
    metadata,
    # Insertion order; the keyset for pagination.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("email", String(254), nullable=False),
    # Lower-cased email; unique, so addresses differing only in case collide.
    Column("email_key", String(254), nullable=False, unique=True),
    Column("display_name", String(100), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)


# Built once: a statement with bound parameters skips SQLAlchemy's per-call
# construction and cache-key work on the hottest path.
_INSERT_USER = users.insert()
_OWNER_OF_EMAIL = select(users.c.id).where(users.c.email_key == bindparam("email_key"))


def to_message(row: Any) -> user_pb2.User:
    """Convert a users row to its protobuf message."""
    user = user_pb2.User(
        id=row.id, email=row.email, display_name=row.display_name, revision=row.revision
    )
    user.create_time.FromDatetime(as_utc(row.create_time))
    user.update_time.FromDatetime(as_utc(row.update_time))
    return user


async def insert_user(tx: Transaction, user_id: str, email: str, display_name: str) -> user_pb2.User:
    """Insert a user and return it.

    Raises:
        AlreadyExists: Another user has this email.
    """
    now = datetime.now(UTC)
    await _ensure_email_free(tx, email, user_id=None)
    values = {
        "id": user_id,
        "email": email,
        "email_key": email.lower(),
        "display_name": display_name,
        "revision": 1,
        "create_time": now,
        "update_time": now,
    }
    await tx.execute(_INSERT_USER, values)
    return to_message(SimpleNamespace(**values))


async def get_user(tx: Transaction, user_id: str) -> Any:
    """Return the row of a user.

    Raises:
        NotFound: No user has this id.
    """
    row = (await tx.execute(select(users).where(users.c.id == user_id))).first()
    if row is None:
        raise NotFound(
            f"user {user_id} not found", reason="USER_NOT_FOUND", metadata={"user_id": user_id}
        )
    return row


async def list_users(tx: Transaction, after: int | None, limit: int) -> list[Any]:
    """Return up to limit users with seq greater than after, oldest first."""
    query = select(users).order_by(users.c.seq).limit(limit)
    if after is not None:
        query = query.where(users.c.seq > after)
    return list((await tx.execute(query)).all())


async def update_user(tx: Transaction, user_id: str, changes: dict[str, str]) -> Any:
    """Apply changes to a user, bump its revision and return the new row.

    Raises:
        NotFound: No user has this id.
        AlreadyExists: The new email belongs to another user.
    """
    if "email" in changes:
        await _ensure_email_free(tx, changes["email"], user_id=user_id)
        changes = {**changes, "email_key": changes["email"].lower()}
    await tx.execute(
        update(users)
        .where(users.c.id == user_id)
        .values(**changes, revision=users.c.revision + 1, update_time=datetime.now(UTC))
    )
    return await get_user(tx, user_id)


async def delete_user(tx: Transaction, user_id: str) -> None:
    """Delete a user; the caller has checked that it exists."""
    await tx.execute(delete(users).where(users.c.id == user_id))


async def count_users(tx: Transaction) -> int:
    """Return the number of users."""
    return int((await tx.execute(select(func.count()).select_from(users))).scalar_one())


async def _ensure_email_free(tx: Transaction, email: str, user_id: str | None) -> None:
    owner = (await tx.execute(_OWNER_OF_EMAIL, {"email_key": email.lower()})).scalar_one_or_none()
    if owner is not None and owner != user_id:
        raise AlreadyExists(
            f"email {email!r} is already used by another user; choose another address",
            reason="EMAIL_TAKEN",
            metadata={"email": email},
        )


def translate_integrity_error(exc: IntegrityError, email: str) -> AlreadyExists:
    """Map a unique-constraint race (two creates with one email) to ALREADY_EXISTS."""
    return AlreadyExists(
        f"email {email!r} is already used by another user; choose another address",
        reason="EMAIL_TAKEN",
        metadata={"email": email},
    )

