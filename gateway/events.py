"""Live domain events for HTTP clients: ``GET /v1/events`` as server-sent events (SSE).

Each JetStream message becomes one SSE event of the default ``message`` type,
so a browser's ``EventSource.onmessage`` receives every event without naming
types up front::

    id: 42
    data: {"specversion":"1.0","id":"…","source":"…","type":"tidings.users.v1.UserCreated",…}

``id`` is the message's stream sequence and ``data`` is the event in the
CloudEvents JSON format (structured mode). Its ``data`` member is the protobuf
message in the proto3 JSON mapping. An event whose protobuf type this process
cannot decode is sent with ``data_base64`` and datacontenttype
``application/protobuf`` instead. Lines that start with ``:`` are SSE comments,
which EventSource ignores. They mark the start of a stream, keep idle
connections open through proxies and state why a stream ended.

Query parameters and headers:

- ``subject`` (required): a NATS subject filter inside one context, such as
  ``tidings.orders.>`` or ``tidings.users.user.created``.
- ``Last-Event-ID`` header or ``last_event_id`` parameter: resume after that
  stream sequence. The header wins, because a browser reconnects with the URL
  it first used plus the header of the last event it received.
- ``start``: ``new`` (default) streams only events published after the
  request, ``all`` replays the stream from its first event. A resume point
  overrides it.

Every request gets its own ephemeral push consumer. The consumer acknowledges
with AckAll after events are written to the client, and its max_ack_pending
bounds the events held in the gateway per stream. A slow client therefore
slows delivery from JetStream instead of filling memory. A client that stops
reading is disconnected once a write has blocked for ``send_timeout`` seconds.
When the gateway ends a stream early (shutdown, a stalled client, a lost
delivery or consumer), the browser reconnects with Last-Event-ID and resumes
after the last event it received.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import nats.errors
from aiohttp import web
from google.protobuf import json_format
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header
from nats.js.errors import NotFoundError

# The event modules register their message types in the default descriptor
# pool, which ReceivedEvent.message() decodes with.
import tidings.inventory.v1.inventory_events_pb2
import tidings.orders.v1.order_events_pb2
import tidings.payments.v1.payment_events_pb2
import tidings.users.v1.user_events_pb2  # noqa: F401
from gateway.errors import bad_request, error_response
from services.runtime.events import SPEC_VERSION, EventDecodeError, ReceivedEvent, decode_event
from services.runtime.streams import ALL_STREAMS, StreamSpec

logger = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx buffers a proxied response unless this header is "no".
    "X-Accel-Buffering": "no",
}

# Interval of the consumer's idle heartbeats. A stream with no message and no
# heartbeat for _CONSUMER_LOST_AFTER seconds lost its consumer (deleted, or the
# server restarted) and ends.
_CONSUMER_IDLE_HEARTBEAT = 5.0
_CONSUMER_LOST_AFTER = 3 * _CONSUMER_IDLE_HEARTBEAT

# nats-server deletes a consumer this long after its subscriber went away, so a
# gateway that crashed leaves no consumers behind for long.
_CONSUMER_INACTIVE_THRESHOLD = 30.0

# With handler_cancellation off (the aiohttp default), a closed connection shows
# only in the transport state, which an idle stream checks this often.
_DISCONNECT_CHECK_INTERVAL = 1.0

# The consumer-create request carries the filter in its subject, which must fit
# nats-server's default max_control_line of 4 KiB with room to spare.
_MAX_SUBJECT_LENGTH = 512

_MAX_SEQUENCE = 2**64 - 1
_SEQUENCE_PATTERN = re.compile(r"[0-9]{1,20}")
_FORBIDDEN_SUBJECT_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f]")

_TRACE_EXTENSIONS = ("traceparent", "tracestate")

# Reasons a stream ends that are logged at INFO. Any other reason is a fault
# and logged as a warning.
_CLIENT_DISCONNECTED = "the client disconnected"
_HANDLER_CANCELLED = "the handler was cancelled"
_SHUTTING_DOWN = "the gateway is shutting down"
_ORDINARY_END_REASONS = frozenset({_CLIENT_DISCONNECTED, _HANDLER_CANCELLED, _SHUTTING_DOWN})


class _InvalidRequest(Exception):
    """Invalid query parameter or header, rejected with a 400 that names the field."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True)
class _StartPoint:
    """Start position of a new consumer in the stream."""

    deliver_policy: DeliverPolicy
    # Set for a resume, with BY_START_SEQUENCE: the sequence the client saw
    # last and the header or parameter that named it.
    after_sequence: int | None = None
    source_field: str = ""

    def consumer_fields(self) -> dict[str, Any]:
        if self.after_sequence is None:
            return {"deliver_policy": self.deliver_policy}
        return {"deliver_policy": self.deliver_policy, "opt_start_seq": self.after_sequence + 1}


@dataclass(eq=False)
class _OpenStream:
    """State shared by one response, its NATS subscription callback and close()."""

    filter_subject: str
    stream_name: str
    consumer_name: str
    max_pending: int
    queue: asyncio.Queue[Msg | None] = field(default_factory=asyncio.Queue)
    end_reason: str | None = None
    last_nats_activity: float = 0.0
    received_consumer_sequence: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, reason: str) -> None:
        """Ask the handler to end the stream. The first reason given is kept."""
        if self.end_reason is None:
            self.end_reason = reason
            self.queue.put_nowait(None)  # wakes the handler if it waits for a message

    async def on_message(self, msg: Msg) -> None:
        """Queue a delivered event, or act on a status message of the consumer."""
        self.last_nats_activity = asyncio.get_running_loop().time()
        headers = msg.headers or {}
        status = headers.get(Header.STATUS)
        if status == "100":
            # An idle heartbeat names the last consumer sequence the server sent.
            # A higher one than received means a delivery was lost on the way.
            last_sent = headers.get(Header.LAST_CONSUMER)
            if last_sent and int(last_sent) > self.received_consumer_sequence:
                self.end("an event was lost between NATS and the gateway")
            return
        if status:
            self.end(f"the consumer sent status {status} {headers.get(Header.DESCRIPTION, '')}".strip())
            return

        self.received_consumer_sequence = msg.metadata.sequence.consumer
        # max_ack_pending keeps the server from sending more than max_pending
        # unacknowledged events, so the queue stays within this bound unless the
        # server breaks that contract.
        if self.queue.qsize() >= self.max_pending:
            self.end("the client fell behind")
            return
        self.queue.put_nowait(msg)


class EventStream:
    """Serve JetStream events of the Tidings streams as server-sent events.

    Args:
        nc: Connected NATS client. The caller owns it and closes it after close().
        heartbeat: Seconds without output after which an SSE comment is sent,
            so proxies keep an idle connection open.
        max_pending: Events delivered by JetStream but not yet written to the
            client, per stream (the consumer's max_ack_pending).
        send_timeout: Seconds one write to the client may block before the
            client counts as stalled and is disconnected.
        streams: Streams clients may read; each must cover ``tidings.<context>.>``.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        heartbeat: float = 15.0,
        max_pending: int = 128,
        send_timeout: float = 30.0,
        streams: Iterable[StreamSpec] = ALL_STREAMS,
    ) -> None:
        if heartbeat <= 0 or send_timeout <= 0:
            raise ValueError("heartbeat and send_timeout must be positive seconds")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._nc = nc
        self._js = nc.jetstream()
        self._heartbeat = heartbeat
        self._max_pending = max_pending
        self._send_timeout = send_timeout
        self._stream_of_context = _streams_by_context(streams)
        self._open: set[_OpenStream] = set()
        self._closing = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Stream the events that match the ``subject`` query parameter until the client leaves."""
        if self._closing:
            return error_response(503, "the gateway is shutting down; retry later", reason="SHUTTING_DOWN")
        if not self._nc.is_connected:
            # Before the first connection and while reconnecting to NATS.
            return error_response(
                503, "live events are unavailable until the gateway reaches NATS; retry later",
                reason="EVENTS_UNAVAILABLE", headers={"Retry-After": "2"},
            )
        try:
            filter_subject, stream_name = self._parse_subject(request.query.get("subject"))
            start = _parse_start_point(request)
        except _InvalidRequest as exc:
            return bad_request(exc.field, exc.description)

        rejected = await self._check_stream(filter_subject, stream_name, start)
        if rejected is not None:
            return rejected
        if request.method == "HEAD":
            return web.Response(headers=SSE_HEADERS)

        stream = _OpenStream(
            filter_subject=filter_subject,
            stream_name=stream_name,
            consumer_name=f"gateway-events-{uuid.uuid4().hex}",
            max_pending=self._max_pending,
        )
        try:
            subscription, start_sequence = await self._subscribe(stream, start)
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning(
                "event stream consumer not created",
                extra={"filter_subject": filter_subject, "stream": stream_name, "error": repr(exc)},
            )
            return _events_unavailable()

        try:
            self._open.add(stream)
            if self._closing:
                # close() began while the consumer was being created.
                stream.end(_SHUTTING_DOWN)
            return await self._serve(request, stream, start_sequence)
        finally:
            await asyncio.shield(self._release(stream, subscription))

    async def close(self) -> None:
        """End every open stream with a comment, delete its consumer and wait for that.

        Later requests get 503. Call it on gateway shutdown, before the NATS
        client closes.
        """
        self._closing = True
        open_streams = list(self._open)
        for stream in open_streams:
            stream.end(_SHUTTING_DOWN)
        for stream in open_streams:
            await stream.finished.wait()

    def _parse_subject(self, subject: str | None) -> tuple[str, str]:
        """Return the filter subject and the name of the stream that contains it."""
        contexts = ", ".join(sorted(self._stream_of_context))
        expected = (
            f"expected a NATS subject filter inside one context ({contexts}), "
            "such as tidings.orders.> or tidings.users.user.created"
        )
        if not subject:
            raise _InvalidRequest("subject", f"missing; {expected}")
        if len(subject) > _MAX_SUBJECT_LENGTH:
            raise _InvalidRequest("subject", f"longer than {_MAX_SUBJECT_LENGTH} characters")
        if _FORBIDDEN_SUBJECT_CHARACTERS.search(subject):
            raise _InvalidRequest("subject", f"{subject!r} contains whitespace or control characters")

        tokens = subject.split(".")
        if "" in tokens:
            raise _InvalidRequest("subject", f"{subject!r} has an empty token; {expected}")
        for position, token in enumerate(tokens):
            if token not in ("*", ">") and ("*" in token or ">" in token):
                raise _InvalidRequest(
                    "subject", f"{subject!r}: wildcards * and > must be whole tokens, not part of {token!r}"
                )
            if token == ">" and position != len(tokens) - 1:
                raise _InvalidRequest("subject", f"{subject!r}: > is allowed only as the last token")

        if len(tokens) < 3 or tokens[0] != "tidings":
            raise _InvalidRequest("subject", f"{subject!r} is outside the Tidings streams; {expected}")
        context = tokens[1]
        if context in ("*", ">"):
            raise _InvalidRequest(
                "subject", f"{subject!r}: the context token must not be a wildcard; {expected}"
            )
        stream = self._stream_of_context.get(context)
        if stream is None:
            raise _InvalidRequest("subject", f"{subject!r}: unknown context {context!r}; {expected}")
        return subject, stream.name

    async def _check_stream(
        self, filter_subject: str, stream_name: str, start: _StartPoint
    ) -> web.Response | None:
        """Return an error response unless the stream exists and can serve start."""
        try:
            info = await self._js.stream_info(stream_name)
        except NotFoundError:
            return bad_request(
                "subject",
                f"{filter_subject!r} belongs to stream {stream_name}, which does not exist yet; "
                "the service of that context creates it when it first starts",
            )
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("stream info failed", extra={"stream": stream_name, "error": repr(exc)})
            return _events_unavailable()

        # NOTE: events that the stream's limits removed after the resume point
        # are skipped without notice. The Tidings streams currently set no limits.
        # A client cannot have seen a sequence beyond the stream's last unless the
        # stream was deleted and created again. Resuming there would skip every
        # event up to that sequence.
        last_sequence = info.state.last_seq
        if start.after_sequence is not None and start.after_sequence > last_sequence:
            return bad_request(
                start.source_field,
                f"{start.after_sequence} is after the last event ({last_sequence}) of stream "
                f"{stream_name}, which may have been recreated; reconnect without it",
            )
        return None

    async def _subscribe(self, stream: _OpenStream, start: _StartPoint) -> tuple[Subscription, int]:
        """Create the consumer and its subscription.

        Returns the subscription and the first stream sequence the consumer can send.
        """
        inbox = self._nc.new_inbox()
        # Subscribing first means no delivery can arrive before a subscriber exists.
        subscription = await self._nc.subscribe(inbox, cb=stream.on_message)
        config = ConsumerConfig(
            name=stream.consumer_name,
            description="GET /v1/events stream of the HTTP gateway",
            filter_subject=stream.filter_subject,
            deliver_subject=inbox,
            ack_policy=AckPolicy.ALL,
            max_ack_pending=self._max_pending,
            # No redelivery: events are acknowledged once written, and
            # send_timeout ends a stalled stream long before ack_wait expires.
            max_deliver=1,
            ack_wait=22 * 3600.0,
            idle_heartbeat=_CONSUMER_IDLE_HEARTBEAT,
            inactive_threshold=_CONSUMER_INACTIVE_THRESHOLD,
            mem_storage=True,
            num_replicas=1,
            **start.consumer_fields(),
        )
        try:
            info = await self._js.add_consumer(stream.stream_name, config)
        except BaseException:
            await _unsubscribe(subscription)
            raise
        stream.last_nats_activity = asyncio.get_running_loop().time()
        # delivered.stream_seq of a new consumer is the sequence before its first.
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        return subscription, delivered + 1

    async def _serve(
        self, request: web.Request, stream: _OpenStream, start_sequence: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        logger.info(
            "event stream started",
            extra={
                "filter_subject": stream.filter_subject,
                "stream": stream.stream_name,
                "consumer": stream.consumer_name,
                "start_sequence": start_sequence,
            },
        )
        writer = _EventWriter(request, response, stream, self._heartbeat, self._send_timeout)
        # With handler_cancellation on, aiohttp cancels the handler when the
        # client disconnects, and this reason stays.
        reason = _HANDLER_CANCELLED
        try:
            await writer.write_comment(f"streaming {stream.filter_subject} from sequence {start_sequence}")
            reason = await writer.run()
        except ConnectionResetError:
            reason = _CLIENT_DISCONNECTED
        except TimeoutError:
            # The socket buffer stayed full for send_timeout seconds. Writing a
            # last comment would block too, so the connection is dropped. The
            # client resumes from the last event it read completely.
            reason = "the client stalled"
            if request.transport is not None:
                request.transport.abort()
        finally:
            level = logging.INFO if reason in _ORDINARY_END_REASONS else logging.WARNING
            logger.log(
                level,
                "event stream ended",
                extra={
                    "filter_subject": stream.filter_subject,
                    "stream": stream.stream_name,
                    "consumer": stream.consumer_name,
                    "start_sequence": start_sequence,
                    "last_sequence": writer.last_sequence,
                    "events_sent": writer.events_sent,
                    "reason": reason,
                },
            )
        return response

    async def _release(self, stream: _OpenStream, subscription: Subscription) -> None:
        """Unsubscribe and delete the consumer. If deleting fails, the server removes it when inactive."""
        try:
            await _unsubscribe(subscription)
            try:
                await self._js.delete_consumer(stream.stream_name, stream.consumer_name)
            except NotFoundError:
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                logger.warning(
                    "event stream consumer not deleted; the server removes it when inactive",
                    extra={
                        "stream": stream.stream_name,
                        "consumer": stream.consumer_name,
                        "inactive_threshold": _CONSUMER_INACTIVE_THRESHOLD,
                        "error": repr(exc),
                    },
                )
        finally:
            self._open.discard(stream)
            stream.finished.set()


class _EventWriter:
    """Write the events of one open stream to its response, with heartbeats and acknowledgements."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        stream: _OpenStream,
        heartbeat: float,
        send_timeout: float,
    ) -> None:
        self._request = request
        self._response = response
        self._stream = stream
        self._heartbeat = heartbeat
        self._send_timeout = send_timeout
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._expected_consumer_sequence = 1
        self._unacknowledged = 0
        self.last_sequence: int | None = None
        self.events_sent = 0

    async def run(self) -> str:
        """Write events until the stream ends, and return the reason it ended.

        Raises:
            ConnectionResetError: The client disconnected during a write.
            TimeoutError: A write blocked for longer than send_timeout.
        """
        stream = self._stream
        while True:
            if stream.end_reason is not None:
                await self.write_comment(f"stream ended: {stream.end_reason}; reconnect with Last-Event-ID")
                return stream.end_reason
            transport = self._request.transport
            if transport is None or transport.is_closing():
                return _CLIENT_DISCONNECTED

            now = self._loop.time()
            wait = min(self._last_write + self._heartbeat - now, _DISCONNECT_CHECK_INTERVAL)
            try:
                async with asyncio.timeout(max(wait, 0)):
                    msg = await stream.queue.get()
            except TimeoutError:
                await self._on_idle()
                continue
            if msg is not None:
                await self._send_event(msg)

    async def _on_idle(self) -> None:
        now = self._loop.time()
        # Everything is acknowledged while the queue is empty, so the server
        # sends idle heartbeats, and their absence means the consumer is gone.
        if now - self._stream.last_nats_activity > _CONSUMER_LOST_AFTER:
            self._stream.end("the NATS consumer stopped responding")
        elif now - self._last_write >= self._heartbeat:
            await self.write_comment("keep-alive")

    async def _send_event(self, msg: Msg) -> None:
        metadata = msg.metadata
        if metadata.sequence.consumer != self._expected_consumer_sequence:
            self._stream.end("an event was lost between NATS and the gateway")
            return
        self._expected_consumer_sequence += 1

        await self._write(format_sse_event(msg, metadata.sequence.stream))
        self.last_sequence = metadata.sequence.stream
        self.events_sent += 1

        # AckAll: acknowledging the newest written event acknowledges all
        # before it. Acknowledge when caught up, or after half the window, so
        # the server can keep sending while the client reads.
        self._unacknowledged += 1
        if self._stream.queue.empty() or self._unacknowledged >= max(1, self._stream.max_pending // 2):
            try:
                await msg.ack()
            except nats.errors.Error as exc:
                self._stream.end(f"acknowledging to NATS failed: {exc!r}")
                return
            self._unacknowledged = 0

    async def write_comment(self, text: str) -> None:
        """Write text as an SSE comment. The text must not contain a line break."""
        await self._write(f": {text}\n\n".encode())

    async def _write(self, frame: bytes) -> None:
        async with asyncio.timeout(self._send_timeout):
            await self._response.write(frame)
        self._last_write = self._loop.time()


def format_sse_event(msg: Msg, sequence: int) -> bytes:
    """Return one SSE event for a JetStream message: its stream sequence as id, a CloudEvent as data.

    A message without valid CloudEvents headers is no Tidings event. It becomes
    a comment plus an ``id`` line, which moves the browser's Last-Event-ID past
    it without dispatching an event.
    """
    try:
        event = decode_event(msg.headers, msg.data)
    except EventDecodeError as exc:
        logger.warning(
            "message skipped: not a Tidings event",
            extra={"subject": msg.subject, "sequence": sequence, "error": str(exc)},
        )
        return f": sequence {sequence} skipped: not a Tidings event\nid: {sequence}\n\n".encode()

    body = json.dumps(cloudevent_json(event), separators=(",", ":"), ensure_ascii=False)
    return f"id: {sequence}\ndata: {body}\n\n".encode()


def cloudevent_json(event: ReceivedEvent) -> dict[str, Any]:
    """Return the event in the CloudEvents JSON format, its protobuf data in proto3 JSON.

    Data that does not decode (an unknown type or a corrupt body) is sent as
    ``data_base64`` with datacontenttype ``application/protobuf``.
    """
    document: dict[str, Any] = {
        "specversion": SPEC_VERSION,
        "id": event.id,
        "source": event.source,
        "type": event.type,
    }
    if event.subject:
        document["subject"] = event.subject
    if event.time is not None:
        document["time"] = event.time.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if event.data_schema:
        document["dataschema"] = event.data_schema
    for name in _TRACE_EXTENSIONS:
        value = event.headers.get(name)
        if value:
            document[name] = value

    try:
        data = json_format.MessageToDict(event.message())
    except (EventDecodeError, json_format.Error) as exc:
        logger.debug("event data sent as base64", extra={"event_id": event.id, "error": str(exc)})
        document["datacontenttype"] = "application/protobuf"
        document["data_base64"] = base64.b64encode(event.data).decode("ascii")
    else:
        document["datacontenttype"] = "application/json"
        document["data"] = data
    return document


def _parse_start_point(request: web.Request) -> _StartPoint:
    """Return the consumer's start position from Last-Event-ID, last_event_id and start."""
    start = request.query.get("start", "new")
    if start not in ("new", "all"):
        raise _InvalidRequest("start", f"{start!r} is not new or all")

    for field_name, value in (
        ("Last-Event-ID", request.headers.get("Last-Event-ID")),
        ("last_event_id", request.query.get("last_event_id")),
    ):
        # An empty value counts as absent: browsers send no Last-Event-ID
        # before the first event with an id.
        if value:
            sequence = _parse_sequence(field_name, value)
            return _StartPoint(DeliverPolicy.BY_START_SEQUENCE, sequence, field_name)

    if start == "all":
        return _StartPoint(DeliverPolicy.ALL)
    return _StartPoint(DeliverPolicy.NEW)


def _parse_sequence(field_name: str, value: str) -> int:
    if not _SEQUENCE_PATTERN.fullmatch(value) or not 0 < int(value) <= _MAX_SEQUENCE:
        raise _InvalidRequest(
            field_name, f"{value!r} is not a stream sequence: expected the id of an event, a positive integer"
        )
    return int(value)


def _streams_by_context(streams: Iterable[StreamSpec]) -> dict[str, StreamSpec]:
    """Map each context to its stream, from stream subjects of the form ``tidings.<context>.>``."""
    by_context: dict[str, StreamSpec] = {}
    for spec in streams:
        for subject in spec.subjects:
            tokens = subject.split(".")
            if len(tokens) != 3 or tokens[0] != "tidings" or tokens[2] != ">":
                raise ValueError(f"stream {spec.name}: subject {subject!r} is not tidings.<context>.>")
            by_context[tokens[1]] = spec
    return by_context


def _events_unavailable() -> web.Response:
    return error_response(
        503, "events are unavailable: NATS JetStream did not answer; retry later", reason="EVENTS_UNAVAILABLE"
    )


async def _unsubscribe(subscription: Subscription) -> None:
    try:
        await subscription.unsubscribe()
    except nats.errors.Error as exc:
        logger.debug("unsubscribe failed", extra={"error": repr(exc)})
