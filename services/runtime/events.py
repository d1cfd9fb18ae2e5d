"""Domain events as NATS messages in CloudEvents binary content mode.

The CloudEvents attributes travel as ``ce-*`` headers, the body is the
protobuf-encoded event, ``content-type`` is ``application/protobuf`` and
``ce-dataschema`` is ``proto:<full message name>``. ``Nats-Msg-Id`` repeats
the event id so that JetStream drops a duplicate publish.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from services.runtime.errors import TidingsError

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/protobuf"
SCHEMA_PREFIX = "proto:"
MSG_ID_HEADER = "Nats-Msg-Id"

_REQUIRED_HEADERS = ("ce-id", "ce-source", "ce-type", "ce-specversion")


class EventDecodeError(TidingsError):
    """A message is not a decodable Tidings event; it can never be processed."""


@dataclass(frozen=True)
class Event:
    """A domain event about to be written to the outbox.

    Attributes:
        subject: NATS subject, ``tidings.<context>.<entity>.<verb>``.
        message: The protobuf event message.
        aggregate_id: Id of the entity the event is about (``ce-subject``);
            events of one aggregate are published in the order written.
        id: Event id, a UUID unless given.
        time: When the change happened, UTC.
    """

    subject: str
    message: Message
    aggregate_id: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def type(self) -> str:
        """CloudEvents type: the full protobuf name, such as ``tidings.users.v1.UserCreated``."""
        return self.message.DESCRIPTOR.full_name


@dataclass(frozen=True)
class ReceivedEvent:
    """An event decoded from a NATS message."""

    id: str
    source: str
    type: str
    subject: str
    time: datetime | None
    data_schema: str
    data: bytes
    headers: Mapping[str, str]

    def message(self) -> Message:
        """Decode the body into its protobuf message class.

        Raises:
            EventDecodeError: The type is unknown in this process or the body
                does not parse as that type.
        """
        message_class = _message_class(self.data_schema.removeprefix(SCHEMA_PREFIX) or self.type)
        try:
            return message_class.FromString(self.data)
        except DecodeError as exc:
            raise EventDecodeError(f"event {self.id}: body is not a valid {self.type}") from exc


def cloudevent_headers(
    *, event_id: str, source: str, event_type: str, time: datetime, subject: str
) -> dict[str, str]:
    """Return the NATS headers of an event in CloudEvents binary content mode."""
    return {
        "ce-specversion": SPEC_VERSION,
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": event_type,
        "ce-time": time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "ce-subject": subject,
        "ce-dataschema": SCHEMA_PREFIX + event_type,
        "content-type": CONTENT_TYPE,
        MSG_ID_HEADER: event_id,
    }


def decode_event(headers: Mapping[str, str] | None, data: bytes) -> ReceivedEvent:
    """Read the CloudEvents attributes of a NATS message.

    Raises:
        EventDecodeError: A required ``ce-*`` header is missing, the spec
            version is not 1.0 or the content type is not protobuf.
    """
    headers = headers or {}
    missing = [name for name in _REQUIRED_HEADERS if not headers.get(name)]
    if missing:
        raise EventDecodeError(f"message lacks CloudEvents headers {', '.join(missing)}")

    event_id = headers["ce-id"]
    if headers["ce-specversion"] != SPEC_VERSION:
        raise EventDecodeError(
            f"event {event_id}: ce-specversion {headers['ce-specversion']!r} is not {SPEC_VERSION}"
        )
    content_type = headers.get("content-type", CONTENT_TYPE)
    if content_type != CONTENT_TYPE:
        raise EventDecodeError(
            f"event {event_id}: content-type {content_type!r} is not {CONTENT_TYPE}"
        )

    return ReceivedEvent(
        id=event_id,
        source=headers["ce-source"],
        type=headers["ce-type"],
        subject=headers.get("ce-subject", ""),
        time=_parse_time(event_id, headers.get("ce-time")),
        data_schema=headers.get("ce-dataschema", ""),
        data=data,
        headers=headers,
    )


def _parse_time(event_id: str, value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise EventDecodeError(f"event {event_id}: ce-time {value!r} is not RFC 3339") from exc
    if parsed.tzinfo is None:
        raise EventDecodeError(
            f"event {event_id}: ce-time {value!r} lacks a UTC offset, which RFC 3339 requires"
        )
    return parsed


def _message_class(full_name: str) -> type[Message]:
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError as exc:
        raise EventDecodeError(
            f"unknown event type {full_name!r}: import its generated _pb2 module first"
        ) from exc
    return message_factory.GetMessageClass(descriptor)


def encoded_header_size(headers: Mapping[str, str]) -> int:
    """Return the bytes NATS sends for headers: the version line, one line each, a blank line."""
    return len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())
