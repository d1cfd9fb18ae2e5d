"""Unit tests of services/runtime/events.py."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.runtime.events import (
    Event,
    EventDecodeError,
    ReceivedEvent,
    cloudevent_headers,
    decode_event,
)
from tidings.users.v1 import user_events_pb2, user_pb2

EVENT_ID = "5f2b9c3e-8a51-4d2e-9c4b-0d8e6f1a2b3c"
USER_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
USER_CREATED = "tidings.users.v1.UserCreated"


def _user_created() -> user_events_pb2.UserCreated:
    return user_events_pb2.UserCreated(
        user=user_pb2.User(id=USER_ID, email="ada@example.com", display_name="Ada", revision=1)
    )


def _headers(**overrides: str) -> dict[str, str]:
    headers = cloudevent_headers(
        event_id=EVENT_ID,
        source="tidings.users",
        event_type=USER_CREATED,
        time=datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC),
        subject=USER_ID,
    )
    headers.update(overrides)
    return headers


def test_headers_spec_version() -> None:
    headers = _headers()

    assert headers["ce-specversion"] == "1.0"


def test_headers_id_source_type_subject() -> None:
    headers = _headers()

    assert headers["ce-id"] == EVENT_ID
    assert headers["ce-source"] == "tidings.users"
    assert headers["ce-type"] == USER_CREATED
    assert headers["ce-subject"] == USER_ID


def test_headers_time_rfc3339_utc() -> None:
    headers = _headers()

    assert headers["ce-time"] == "2024-05-01T12:30:15.250000Z"


def test_headers_time_converted_to_utc() -> None:
    berlin_summer = timezone(timedelta(hours=2))

    headers = cloudevent_headers(
        event_id=EVENT_ID,
        source="tidings.users",
        event_type=USER_CREATED,
        time=datetime(2024, 5, 1, 14, 0, tzinfo=berlin_summer),
        subject=USER_ID,
    )

    assert headers["ce-time"] == "2024-05-01T12:00:00Z"


def test_headers_time_matches_rfc3339() -> None:
    rfc3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")

    headers = cloudevent_headers(
        event_id=EVENT_ID,
        source="tidings.users",
        event_type=USER_CREATED,
        time=datetime.now(UTC),
        subject=USER_ID,
    )

    assert rfc3339.fullmatch(headers["ce-time"])


def test_headers_dataschema_names_proto() -> None:
    headers = _headers()

    assert headers["ce-dataschema"] == "proto:tidings.users.v1.UserCreated"


def test_headers_content_type_protobuf() -> None:
    headers = _headers()

    assert headers["content-type"] == "application/protobuf"


def test_headers_nats_msg_id_is_event_id() -> None:
    headers = _headers()

    assert headers["Nats-Msg-Id"] == EVENT_ID


def test_event_type_is_protobuf_full_name() -> None:
    event = Event(subject="tidings.users.user.created", message=_user_created(), aggregate_id=USER_ID)

    assert event.type == USER_CREATED


def test_event_default_id_is_uuid() -> None:
    event = Event(subject="tidings.users.user.created", message=_user_created(), aggregate_id=USER_ID)

    assert str(uuid.UUID(event.id)) == event.id


def test_event_default_time_is_utc() -> None:
    event = Event(subject="tidings.users.user.created", message=_user_created(), aggregate_id=USER_ID)

    assert event.time.utcoffset() == timedelta(0)


def test_decode_event_round_trip() -> None:
    data = _user_created().SerializeToString()

    received = decode_event(_headers(), data)

    assert received.id == EVENT_ID
    assert received.source == "tidings.users"
    assert received.type == USER_CREATED
    assert received.subject == USER_ID
    assert received.time == datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
    assert received.data_schema == "proto:tidings.users.v1.UserCreated"
    assert received.data == data


def test_decode_event_message_decodes_body() -> None:
    received = decode_event(_headers(), _user_created().SerializeToString())

    message = received.message()

    assert isinstance(message, user_events_pb2.UserCreated)
    assert message.user.email == "ada@example.com"
    assert message.user.id == USER_ID


def test_decode_event_without_dataschema_uses_type() -> None:
    headers = _headers()
    del headers["ce-dataschema"]

    message = decode_event(headers, _user_created().SerializeToString()).message()

    assert message == _user_created()


def test_decode_event_optional_headers_missing() -> None:
    headers = _headers()
    for name in ("ce-time", "ce-subject", "content-type"):
        del headers[name]

    received = decode_event(headers, b"")

    assert received.time is None
    assert received.subject == ""


def test_decode_event_missing_id_rejected() -> None:
    headers = _headers()
    del headers["ce-id"]

    with pytest.raises(EventDecodeError) as raised:
        decode_event(headers, b"")

    assert str(raised.value) == "message lacks CloudEvents headers ce-id"


def test_decode_event_empty_id_rejected() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(_headers(**{"ce-id": ""}), b"")

    assert "ce-id" in str(raised.value)


def test_decode_event_missing_headers_all_named() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event({"ce-id": EVENT_ID}, b"")

    assert str(raised.value) == "message lacks CloudEvents headers ce-source, ce-type, ce-specversion"


def test_decode_event_no_headers_rejected() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(None, b"")

    assert "ce-id" in str(raised.value)


def test_decode_event_wrong_specversion_rejected() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(_headers(**{"ce-specversion": "0.3"}), b"")

    assert str(raised.value) == f"event {EVENT_ID}: ce-specversion '0.3' is not 1.0"


def test_decode_event_wrong_content_type_rejected() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(_headers(**{"content-type": "application/json"}), b"{}")

    assert str(raised.value) == (
        f"event {EVENT_ID}: content-type 'application/json' is not application/protobuf"
    )


def test_decode_event_bad_time_rejected() -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(_headers(**{"ce-time": "yesterday at noon"}), b"")

    assert str(raised.value) == f"event {EVENT_ID}: ce-time 'yesterday at noon' is not RFC 3339"


def test_decode_event_time_with_offset() -> None:
    received = decode_event(_headers(**{"ce-time": "2024-05-01T14:30:15+02:00"}), b"")

    assert received.time == datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)


def test_received_event_unknown_type_rejected() -> None:
    headers = _headers(**{"ce-type": "tidings.users.v1.UserRenamed", "ce-dataschema": ""})
    received = decode_event(headers, b"")

    with pytest.raises(EventDecodeError) as raised:
        received.message()

    assert "unknown event type 'tidings.users.v1.UserRenamed'" in str(raised.value)


def test_received_event_corrupt_body_rejected() -> None:
    received = decode_event(_headers(), b"\x0a\x05ab")

    with pytest.raises(EventDecodeError) as raised:
        received.message()

    assert str(raised.value) == f"event {EVENT_ID}: body is not a valid {USER_CREATED}"


def test_received_event_is_frozen() -> None:
    received = decode_event(_headers(), b"")

    with pytest.raises(AttributeError):
        received.id = "other"  # type: ignore[misc]


def test_received_event_keeps_all_headers() -> None:
    headers = _headers(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

    received = decode_event(headers, b"")

    assert isinstance(received, ReceivedEvent)
    assert received.headers["traceparent"] == headers["traceparent"]


def test_tail_describe_decodes_order_event() -> None:
    from types import SimpleNamespace

    from services.runtime.cli.tail import describe
    from tidings.orders.v1 import order_events_pb2, order_pb2

    body = order_events_pb2.OrderPlaced(order=order_pb2.Order(id="o-1")).SerializeToString()
    headers = cloudevent_headers(
        event_id="e-1", source="/tidings/orders", event_type="tidings.orders.v1.OrderPlaced",
        time=datetime.now(UTC), subject="o-1",
    )
    message = SimpleNamespace(subject="tidings.orders.order.placed", headers=headers, data=body)

    line = json.loads(describe(message))  # type: ignore[arg-type]

    assert line["payload"] == {"order": {"id": "o-1"}}
