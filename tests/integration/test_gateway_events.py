"""GET /v1/events against a real nats-server: SSE framing, resume, validation and cleanup."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

import gateway.events
from gateway.events import EventStream
from services.runtime.events import cloudevent_headers
from services.runtime.streams import USERS, ensure_stream
from tests.helpers import wait_for
from tidings.users.v1 import user_events_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CREATED = "tidings.users.user.created"
UPDATED = "tidings.users.user.updated"


@dataclass
class Frame:
    """One SSE block: the text of its comment lines and its fields."""

    comments: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> int:
        return int(self.fields["id"])

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.fields["data"])


class SseReader:
    """Parses the SSE blocks of a streamed response, each bounded by a timeout."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next_frame(self, timeout: float = 10.0) -> Frame:
        frame = Frame()
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise EOFError("the server ended the stream")
                line = raw.decode().rstrip("\n")
                if not line:
                    if frame.comments or frame.fields:
                        return frame
                    continue
                if line.startswith(":"):
                    frame.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                frame.fields[name] = value.removeprefix(" ")

    async def next_event(self, timeout: float = 10.0) -> Frame:
        """Return the next frame with data, skipping comments."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next_frame()
                if "data" in frame.fields:
                    return frame

    async def events(self, count: int) -> list[Frame]:
        return [await self.next_event() for _ in range(count)]


@pytest.fixture
async def js(nats_client: NATS) -> JetStreamContext:
    """JetStream with the USERS stream created."""
    context = nats_client.jetstream()
    await ensure_stream(context, USERS, replicas=1, duplicate_window=60.0)
    return context


@asynccontextmanager
async def serving(events: EventStream, *, handler_cancellation: bool = True) -> AsyncIterator[str]:
    """Serve events.handle at /v1/events on a free loopback port and yield its URL."""
    app = web.Application()
    app.router.add_get("/v1/events", events.handle)

    async def close_events(_: web.Application) -> None:
        await events.close()

    app.on_shutdown.append(close_events)
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1/events"
    finally:
        await runner.cleanup()


@pytest.fixture
async def events(nats_client: NATS) -> EventStream:
    return EventStream(nats_client, heartbeat=30.0)


@pytest.fixture
async def url(events: EventStream) -> AsyncIterator[str]:
    async with serving(events) as address:
        yield address


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@asynccontextmanager
async def open_stream(
    session: aiohttp.ClientSession,
    url: str,
    subject: str = "tidings.users.>",
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[SseReader]:
    """Open an event stream and return once its start comment arrived, so its consumer exists."""
    query = {"subject": subject, **(params or {})}
    async with session.get(url, params=query, headers=headers) as response:
        assert response.status == 200, await response.text()
        reader = SseReader(response)
        start = await reader.next_frame()
        assert start.comments[0].startswith("streaming "), start
        yield reader


async def publish_user_event(
    js: JetStreamContext,
    subject: str = CREATED,
    *,
    display_name: str = "Ada",
    event_type: str = "tidings.users.v1.UserCreated",
    traceparent: str | None = TRACEPARENT,
) -> int:
    """Publish a CloudEvents-encoded user event like the relay does, and return its stream sequence."""
    user = user_pb2.User(id=str(uuid.uuid4()), email="ada@example.com", display_name=display_name)
    headers = cloudevent_headers(
        event_id=str(uuid.uuid4()),
        source="/tests",
        event_type=event_type,
        time=datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC),
        subject=user.id,
    )
    if traceparent:
        headers["traceparent"] = traceparent
    body = user_events_pb2.UserCreated(user=user).SerializeToString()
    ack = await js.publish(subject, body, headers=headers)
    return ack.seq


async def consumer_count(js: JetStreamContext) -> int:
    return (await js.stream_info(USERS.name)).state.consumer_count


async def no_consumers(js: JetStreamContext) -> bool:
    return await consumer_count(js) == 0


def violated_fields(body: dict[str, Any]) -> list[str]:
    """Return the fields of the BadRequest detail of a google.rpc.Status JSON body."""
    for detail in body.get("details", []):
        if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest":
            return [violation["field"] for violation in detail["fieldViolations"]]
    return []


async def test_events_stream_sends_events_in_order(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        sequences = [await publish_user_event(js) for _ in range(3)]
        received = await reader.events(3)

    assert [frame.id for frame in received] == sequences


async def test_events_data_is_structured_cloudevent(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        await publish_user_event(js, display_name="Grace")
        frame = await reader.next_event()

    document = frame.data
    assert document["specversion"] == "1.0"
    assert document["type"] == "tidings.users.v1.UserCreated"
    assert document["source"] == "/tests"
    assert document["subject"] == document["data"]["user"]["id"]
    assert document["time"] == "2025-05-06T07:08:09Z"
    assert document["dataschema"] == "proto:tidings.users.v1.UserCreated"
    assert document["datacontenttype"] == "application/json"
    assert document["data"]["user"]["displayName"] == "Grace"
    assert document["traceparent"] == TRACEPARENT
    assert len(document["id"]) == 36


async def test_events_frame_uses_default_message_type(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        await publish_user_event(js)
        frame = await reader.next_event()

    assert set(frame.fields) == {"id", "data"}


async def test_events_response_has_sse_headers(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with session.get(url, params={"subject": "tidings.users.>"}) as response:
        headers = response.headers

    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"


async def test_events_head_request_creates_no_consumer(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with session.head(url, params={"subject": "tidings.users.>"}) as response:
        status = response.status
        content_type = response.headers["Content-Type"]

    assert status == 200
    assert content_type == "text/event-stream"
    assert await consumer_count(js) == 0


async def test_events_users_service_event_arrives(
    session: aiohttp.ClientSession,
    url: str,
    users: user_service_pb2_grpc.UserServiceStub,
) -> None:
    async with open_stream(session, url, CREATED) as reader:
        request = user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email="ada@example.com", display_name="Ada")
        )
        created = await users.CreateUser(request)
        frame = await reader.next_event()

    assert frame.data["type"] == "tidings.users.v1.UserCreated"
    assert frame.data["subject"] == created.user.id
    assert frame.data["data"]["user"]["email"] == "ada@example.com"


async def test_events_unknown_type_sent_as_base64(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        await publish_user_event(js, event_type="tidings.users.v9.NotCompiledIn")
        frame = await reader.next_event()

    stored = await js.get_msg(USERS.name, frame.id)
    assert frame.data["datacontenttype"] == "application/protobuf"
    assert base64.b64decode(frame.data["data_base64"]) == stored.data
    assert "data" not in frame.data


async def test_events_non_cloudevent_skipped_with_id(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        plain = (await js.publish(CREATED, b"not a CloudEvent")).seq
        sequence = await publish_user_event(js)
        skipped = await reader.next_frame()
        event = await reader.next_event()

    assert skipped.fields == {"id": str(plain)}
    assert "skipped" in skipped.comments[0]
    assert event.id == sequence


async def test_events_subject_filter_narrows_events(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url, CREATED) as reader:
        await publish_user_event(js, UPDATED)
        created = await publish_user_event(js, CREATED)
        frame = await reader.next_event()

    assert frame.id == created


async def test_events_default_start_skips_earlier_events(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    await publish_user_event(js)

    async with open_stream(session, url) as reader:
        later = await publish_user_event(js)
        frame = await reader.next_event()

    assert frame.id == later


async def test_events_start_all_replays_stream(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    earlier = [await publish_user_event(js) for _ in range(2)]

    async with open_stream(session, url, params={"start": "all"}) as reader:
        received = await reader.events(2)

    assert [frame.id for frame in received] == earlier


async def test_events_resume_with_last_event_id_header(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    sequences = [await publish_user_event(js) for _ in range(5)]

    async with open_stream(session, url, params={"start": "all"}) as reader:
        first = await reader.events(2)
    resume_headers = {"Last-Event-ID": str(first[-1].id)}
    async with open_stream(session, url, params={"start": "all"}, headers=resume_headers) as reader:
        rest = await reader.events(3)
        sequences.append(await publish_user_event(js))
        live = await reader.next_event()

    assert [frame.id for frame in [*first, *rest, live]] == sequences


async def test_events_resume_with_query_parameter(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    sequences = [await publish_user_event(js) for _ in range(3)]

    async with open_stream(session, url, params={"last_event_id": str(sequences[0])}) as reader:
        rest = await reader.events(2)

    assert [frame.id for frame in rest] == sequences[1:]


async def test_events_header_overrides_query_resume_point(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    sequences = [await publish_user_event(js) for _ in range(4)]

    async with open_stream(
        session,
        url,
        params={"last_event_id": str(sequences[0])},
        headers={"Last-Event-ID": str(sequences[2])},
    ) as reader:
        frame = await reader.next_event()

    assert frame.id == sequences[3]


@pytest.mark.parametrize(
    "subject",
    [
        "tidings.users",
        "tidings.*.>",
        "tidings.>",
        "tidings.users..created",
        ".tidings.users.>",
        "tidings.users.>.created",
        "tidings.users.user created",
        "tidings.users.us*r.>",
        "tidings.unknown.>",
        "tidings.deadletter.>",
        "orders.users.>",
        ">",
        "",
        "tidings.users." + "x" * 600,
    ],
)
async def test_events_invalid_subject_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext, subject: str
) -> None:
    async with session.get(url, params={"subject": subject}) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["subject"]


async def test_events_missing_subject_rejected(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["subject"]
    assert "tidings.orders.>" in body["message"]


async def test_events_missing_stream_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with session.get(url, params={"subject": "tidings.orders.>"}) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["subject"]
    assert "ORDERS" in body["message"]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "+3", "1e3", "99999999999999999999"])
async def test_events_invalid_last_event_id_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext, value: str
) -> None:
    params = {"subject": "tidings.users.>"}
    async with session.get(url, params=params, headers={"Last-Event-ID": value}) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["Last-Event-ID"]


async def test_events_invalid_last_event_id_parameter_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    params = {"subject": "tidings.users.>", "last_event_id": "latest"}
    async with session.get(url, params=params) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["last_event_id"]


async def test_events_last_event_id_beyond_stream_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    last = await publish_user_event(js)

    params = {"subject": "tidings.users.>"}
    async with session.get(url, params=params, headers={"Last-Event-ID": str(last + 1)}) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["Last-Event-ID"]


async def test_events_invalid_start_rejected(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with session.get(url, params={"subject": "tidings.users.>", "start": "first"}) as response:
        status = response.status
        body = await response.json()

    assert status == 400
    assert violated_fields(body) == ["start"]


async def test_events_rejected_request_creates_no_consumer(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext
) -> None:
    async with session.get(url, params={"subject": "tidings.users.>", "start": "first"}) as response:
        await response.read()

    assert await consumer_count(js) == 0


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_events_consumer_deleted_after_disconnect(
    nats_client: NATS, session: aiohttp.ClientSession, js: JetStreamContext, handler_cancellation: bool
) -> None:
    events = EventStream(nats_client, heartbeat=30.0)
    async with serving(events, handler_cancellation=handler_cancellation) as address:
        async with open_stream(session, address):
            consumers_while_open = await consumer_count(js)

        await wait_for(lambda: no_consumers(js))

        assert consumers_while_open == 1


async def test_events_heartbeat_comment_sent(
    nats_client: NATS, session: aiohttp.ClientSession, js: JetStreamContext
) -> None:
    events = EventStream(nats_client, heartbeat=0.2)
    async with serving(events) as address, open_stream(session, address) as reader:
        frame = await reader.next_frame(timeout=5)

    assert frame.comments == ["keep-alive"]


async def test_events_lost_consumer_ends_stream(
    nats_client: NATS, session: aiohttp.ClientSession, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.events, "_CONSUMER_IDLE_HEARTBEAT", 0.2)
    monkeypatch.setattr(gateway.events, "_CONSUMER_LOST_AFTER", 0.6)
    events = EventStream(nats_client, heartbeat=30.0)
    async with serving(events) as address, open_stream(session, address) as reader:
        consumers = await js.consumers_info(USERS.name)
        await js.delete_consumer(USERS.name, consumers[0].name)
        final = await reader.next_frame()
        with pytest.raises(EOFError):
            await reader.next_frame()

    assert "stopped responding" in final.comments[0]


async def test_events_close_ends_open_streams(
    session: aiohttp.ClientSession, events: EventStream, url: str, js: JetStreamContext
) -> None:
    async with open_stream(session, url) as reader:
        await events.close()
        final = await reader.next_frame()
        with pytest.raises(EOFError):
            await reader.next_frame()

    assert "shutting down" in final.comments[0]
    assert await consumer_count(js) == 0


async def test_events_request_after_close_unavailable(
    session: aiohttp.ClientSession, events: EventStream, url: str, js: JetStreamContext
) -> None:
    await events.close()

    async with session.get(url, params={"subject": "tidings.users.>"}) as response:
        status = response.status

    assert status == 503


async def test_events_stalled_client_resumes_without_loss(
    nats_client: NATS, session: aiohttp.ClientSession, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.events")
    events = EventStream(nats_client, heartbeat=30.0, max_pending=8, send_timeout=0.5)
    big_name = "x" * 128_000
    published: list[int] = []

    async def publish_until_stream_ends() -> bool:
        published.append(await publish_user_event(js, display_name=big_name))
        return await no_consumers(js)

    async with serving(events) as address:
        received: list[int] = []
        async with open_stream(session, address) as reader:
            # The client reads nothing until the socket buffers are full and
            # the gateway gives up on it. Then it reads what got through.
            await wait_for(publish_until_stream_ends, timeout=60, interval=0.01)
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                while True:
                    received.append((await reader.next_event()).id)

        resume_headers = {"Last-Event-ID": str(received[-1])}
        async with open_stream(session, address, headers=resume_headers) as reader:
            received.extend(frame.id for frame in await reader.events(len(published) - len(received)))

    assert received == published
    assert any(getattr(r, "reason", None) == "the client stalled" for r in caplog.records)


async def test_events_logs_start_and_end(
    session: aiohttp.ClientSession, url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.events")
    last = await publish_user_event(js)

    async with open_stream(session, url, CREATED, headers={"Last-Event-ID": str(last)}):
        pass
    await wait_for(lambda: no_consumers(js))

    started = [r for r in caplog.records if r.getMessage() == "event stream started"]
    ended = [r for r in caplog.records if r.getMessage() == "event stream ended"]
    assert [(r.filter_subject, r.start_sequence) for r in started] == [(CREATED, last + 1)]
    assert [r.filter_subject for r in ended] == [CREATED]

