"""Client request ids (AIP-155): a retried mutation returns the first response."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Column, DateTime, LargeBinary, MetaData, String, Table, bindparam, select
from sqlalchemy.exc import IntegrityError

from services.runtime.database import Transaction
from services.runtime.errors import FailedPrecondition

ResponseT = TypeVar("ResponseT", bound=Message)


def request_log_table(metadata: MetaData) -> Table:
    """Define the ``request_log`` table on a service's metadata."""
    return Table(
        "request_log",
        metadata,
        Column("request_id", String(128), primary_key=True),
        Column("method", String(128), nullable=False),
        # SHA-256 of the deterministic request encoding without its request_id.
        Column("fingerprint", String(64), nullable=False),
        Column("response", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


def fingerprint(request: Message) -> str:
    """Hash a request, ignoring its ``request_id`` field."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


class RequestLog:
    """Stores each mutation's response under its request id, in the mutation's transaction."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._insert = table.insert()
        self._select = select(table).where(table.c.request_id == bindparam("request_id"))

    async def replay(
        self, tx: Transaction, method: str, request: Message, response_type: type[ResponseT]
    ) -> ResponseT | None:
        """Return the stored response for the request's id, or None on its first use.

        Raises:
            FailedPrecondition: The id was used before for another method or
                for a request with other fields.
        """
        request_id = getattr(request, "request_id", "")
        if not request_id:
            return None
        row = (await tx.execute(self._select, {"request_id": request_id})).first()
        if row is None:
            return None
        if row.method != method or row.fingerprint != fingerprint(request):
            raise FailedPrecondition(
                f"request_id {request_id!r} was already used for a different request; "
                "send a new request_id for a new request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": request_id},
            )
        return response_type.FromString(row.response)

    async def record(self, tx: Transaction, method: str, request: Message, response: Message) -> None:
        """Store the response of a first-time request that carries a request id."""
        request_id = getattr(request, "request_id", "")
        if not request_id:
            return
        await tx.execute(
            self._insert,
            {
                "request_id": request_id,
                "method": method,
                "fingerprint": fingerprint(request),
                "response": response.SerializeToString(),
                "created_at": datetime.now(UTC),
            },
        )


async def retry_once_on_conflict(
    attempt: Callable[[], Awaitable[ResponseT]],
    translate: Callable[[IntegrityError], Exception] | None = None,
) -> ResponseT:
    """Run a mutation, and run it once more if it lost a unique-key race.

    On PostgreSQL two concurrent calls can both pass a uniqueness check (an
    email, a request id) before either commits, so the loser's INSERT fails.
    Its second attempt finds the winner's row and replays the stored response
    or raises the service's own error. A conflict on the second attempt is
    passed to translate, when given, and raised from it.
    """
    try:
        return await attempt()
    except IntegrityError as first:
        if translate is None:
            return await attempt()
        try:
            return await attempt()
        except IntegrityError:
            raise translate(first) from first
