"""Transactional outbox: events are written in the same transaction as the state change."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from observability.propagation import inject_context
from services.runtime.database import Transaction
from services.runtime.errors import FieldViolation, InvalidArgument
from services.runtime.events import Event, cloudevent_headers, encoded_header_size


def outbox_table(metadata: MetaData) -> Table:
    """Define the ``outbox`` table on a service's metadata."""
    table = Table(
        "outbox",
        metadata,
        # Publish order; SQLite needs INTEGER (not BIGINT) for an autoincrementing rowid.
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("aggregate_id", String(128), nullable=False),
        Column("subject", String(255), nullable=False),
        Column("event_type", String(255), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("event_time", DateTime(timezone=True), nullable=False),
        # traceparent/tracestate/baggage of the request that wrote the row, as JSON.
        Column("trace_headers", Text, nullable=False),
        Column("sent_at", DateTime(timezone=True), nullable=True),
    )
    Index(
        "outbox_pending",
        table.c.seq,
        sqlite_where=table.c.sent_at.is_(None),
        postgresql_where=table.c.sent_at.is_(None),
    )
    return table


# Room for the headers the relay adds at publish time (its traceparent may
# differ from the stored one, and tracestate values can grow).
_HEADER_HEADROOM = 512

# nats-server's default max_payload; the real value comes from the server.
DEFAULT_MAX_PAYLOAD = 1024 * 1024


class Outbox:
    """Writes events into the outbox inside a caller's transaction."""

    def __init__(
        self, table: Table, source: str = "", max_payload: Callable[[], int] = lambda: DEFAULT_MAX_PAYLOAD
    ) -> None:
        self.table = table
        self._source = source
        self._max_payload = max_payload
        self._insert = table.insert()
        self._listeners: list[Callable[[], None]] = []

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call listener after each commit that wrote events (the relay's wake-up)."""
        self._listeners.append(listener)

    async def add(self, tx: Transaction, events: Iterable[Event]) -> None:
        """Insert events into the outbox as part of tx.

        The current trace context is stored with each row, so that the relay's
        publish span joins the trace of the request that made the change.
        """
        trace_headers: dict[str, str] = {}
        inject_context(trace_headers)
        encoded_trace = json.dumps(trace_headers)

        for event in events:
            self._check_size(event, trace_headers)
        rows = [
            {
                "event_id": event.id,
                "aggregate_id": event.aggregate_id,
                "subject": event.subject,
                "event_type": event.type,
                "payload": event.message.SerializeToString(),
                "event_time": event.time,
                "trace_headers": encoded_trace,
            }
            for event in events
        ]
        if not rows:
            return
        await tx.execute(self._insert, rows)
        for listener in self._listeners:
            tx.after_commit(listener)

    def _check_size(self, event: Event, trace_headers: dict[str, str]) -> None:
        """Reject an event that NATS would refuse, before the transaction commits.

        A message above the server's max_payload (body plus headers) is
        refused by the server, which also closes the connection, so it must
        never reach the outbox.
        """
        headers = cloudevent_headers(
            event_id=event.id, source=self._source, event_type=event.type, time=event.time,
            subject=event.aggregate_id,
        )
        size = event.message.ByteSize() + encoded_header_size({**headers, **trace_headers})
        limit = self._max_payload()
        if size + _HEADER_HEADROOM > limit:
            raise InvalidArgument([FieldViolation(
                "event",
                f"the {event.type} event for {event.aggregate_id} would be {size} bytes with its "
                f"headers; NATS accepts at most {limit - _HEADER_HEADROOM} here, so send less data",
            )])
