"""What a durable consumer reads, its delivery settings and its inbox table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message
from sqlalchemy import Column, DateTime, MetaData, String, Table

from services.runtime.database import Transaction
from services.runtime.events import ReceivedEvent

Handler = Callable[[Transaction, ReceivedEvent, Message], Awaitable[None]]


def processed_events_table(metadata: MetaData) -> Table:
    """Define the ``processed_events`` (inbox) table on a service's metadata."""
    return Table(
        "processed_events",
        metadata,
        Column("consumer", String(128), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
    )


@dataclass(frozen=True)
class ConsumerSpec:
    """What one durable consumer reads and which handler each event type gets.

    Attributes:
        durable: Durable consumer name, shared by every replica of the service.
        stream: Stream to read, such as ``USERS``.
        subjects: Subject filters within the stream.
        handlers: Handler per CloudEvents type (full protobuf name). Events of
            other types on the subjects go to the dead letters.
        max_deliver: Attempts before an event goes to the dead letters;
            TIDINGS_CONSUMER_MAX_DELIVER when None.
        backoff: Seconds to wait before the 2nd, 3rd, ... attempt after a
            failure (the last value repeats); TIDINGS_CONSUMER_BACKOFF when None.
    """

    durable: str
    stream: str
    subjects: tuple[str, ...]
    handlers: Mapping[str, Handler]
    max_deliver: int | None = None
    backoff: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ConsumerSettings:
    """Delivery settings of a consumer; see Settings for their meaning."""

    batch_size: int
    ack_wait: float
    max_deliver: int
    backoff: tuple[float, ...]
    handler_timeout: float = 30.0
