"""The whole system as `tidings up` starts it: one user creation seen on NATS, in notifications and in traces.

`tidings up` runs as a subprocess with its own nats-server and exports spans
by OTLP/gRPC to a receiver that this test runs on a loopback port.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime.cli.embedded_nats import free_port
from services.runtime.clients import traced_channel
from tests.e2e.otlp_receiver import CollectedSpan, OtlpTraceReceiver, from_sdk_span, serve_otlp_receiver
from tests.e2e.processes import (
    ChildProcess,
    clean_environment,
    pid_running,
    start_process,
    stop_pid,
    stop_process,
    wait_until,
)
from tests.helpers import wait_for
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.users.v1 import user_events_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc

pytestmark = pytest.mark.e2e

READY_TIMEOUT = 45.0
EVENT_TIMEOUT = 15.0
EXIT_TIMEOUT = 30.0

CREATE_USER_METHOD = "/tidings.users.v1.UserService/CreateUser"
CREATED_SUBJECT = "tidings.users.user.created"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
STARTED_LINE = re.compile(r"^started ([\w-]+) \(pid (\d+)\)", re.MULTILINE)


@dataclass
class RunningSystem:
    """`tidings up` after it printed "tidings is ready"."""

    supervisor: ChildProcess
    users_address: str
    notifications_address: str
    nats_url: str
    gateway_url: str
    data_dir: Path
    # PID per process name from the "started NAME (pid N)" lines, nats-server included.
    child_pids: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpTraceReceiver]:
    """An OTLP/gRPC trace receiver on a free loopback port, served from its own threads."""
    with serve_otlp_receiver() as receiver:
        yield receiver


def _tidings_command() -> list[str]:
    # services.runtime.cli has no __main__ module, so `python -m` cannot run it.
    # The console script installed next to this interpreter is what users run.
    script = Path(sys.executable).parent / "tidings"
    if not script.exists():
        found = shutil.which("tidings")
        if found is None:
            pytest.fail(f"tidings console script not found next to {sys.executable} or on PATH; "
                        "install the project with `pip install -e .`")
        script = Path(found)
    # Text logs, as at a terminal, so that the tests cover the output relay too.
    return [str(script), "up", "--log-format", "text"]


@pytest.fixture
def tidings_up(tmp_path: Path, otlp_receiver: OtlpTraceReceiver) -> Iterator[RunningSystem]:
    """`tidings up` with its data in tmp_path, free ports and spans sent to otlp_receiver."""
    data_dir = tmp_path / "data"
    users_port = free_port()
    notifications_port = free_port()
    gateway_port = free_port()
    environment = clean_environment({
        "TIDINGS_DATA_DIR": str(data_dir),
        "TIDINGS_USERS_PORT": str(users_port),
        "TIDINGS_NOTIFICATIONS_PORT": str(notifications_port),
        # `tidings up` starts every service, so each needs a free port.
        "TIDINGS_ORDERS_PORT": str(free_port()),
        "TIDINGS_INVENTORY_PORT": str(free_port()),
        "TIDINGS_PAYMENTS_PORT": str(free_port()),
        "TIDINGS_EMBEDDED_NATS_PORT": str(free_port()),
        "TIDINGS_GATEWAY_PORT": str(gateway_port),
        "TIDINGS_SHUTDOWN_GRACE": "5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    supervisor = start_process("tidings-up", _tidings_command(), environment, tmp_path / "logs")
    try:
        wait_until(
            lambda: "tidings is ready" in supervisor.stdout() or supervisor.process.poll() is not None,
            timeout=READY_TIMEOUT,
        )
        assert supervisor.process.poll() is None, (
            f"tidings up exited with code {supervisor.process.returncode} during start\n"
            + supervisor.log_tail()
        )
        output = supervisor.stdout()
        assert "tidings is ready" in output, (
            f"tidings up printed no 'tidings is ready' within {READY_TIMEOUT}s\n" + supervisor.log_tail()
        )
        child_pids = {name: int(pid) for name, pid in STARTED_LINE.findall(output)}
        nats_url = (data_dir / "nats.url").read_text().strip()
        yield RunningSystem(
            supervisor=supervisor,
            users_address=f"127.0.0.1:{users_port}",
            notifications_address=f"127.0.0.1:{notifications_port}",
            nats_url=nats_url,
            gateway_url=f"http://127.0.0.1:{gateway_port}",
            data_dir=data_dir,
            child_pids=child_pids,
        )
    finally:
        stop_process(supervisor)
        # The output is read again because a failed start may have printed more PIDs since.
        for name, pid in STARTED_LINE.findall(supervisor.stdout()):
            markers = {"nats-server": "nats-server", "gateway": "gateway.main"}
            marker = markers.get(name, f"services.{name}.main")
            stop_pid(int(pid), marker)


async def _list_notifications(address: str, user_id: str) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
        response = await stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(user_id=user_id), timeout=5
        )
    return list(response.notifications)


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _parse_rfc3339(value: str) -> datetime | None:
    """Parse a timestamp such as 2024-05-01T12:00:00.5Z, or return None if it is invalid or has no offset."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _single_span(spans: list[CollectedSpan], service: str, kind: str, name: str) -> CollectedSpan:
    matches = [s for s in spans if (s.service, s.kind, s.name) == (service, kind, name)]
    listing = "\n".join(s.describe() for s in spans)
    assert len(matches) == 1, (
        f"expected one {service} {kind} span {name!r} in the trace, found {len(matches)}; "
        f"spans of the trace:\n{listing}"
    )
    return matches[0]


async def test_user_creation_end_to_end(
    tidings_up: RunningSystem, otlp_receiver: OtlpTraceReceiver, spans: InMemorySpanExporter
) -> None:
    system = tidings_up
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    tracer = trace.get_tracer(__name__)

    # A plain core NATS subscriber receives what the relay publishes to JetStream.
    connection = await nats.connect(system.nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        subscription = await connection.subscribe("tidings.users.>")
        await connection.flush(timeout=5)

        with tracer.start_as_current_span("create user from test") as test_span:
            async with traced_channel(system.users_address) as channel:
                response = await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
                    user_service_pb2.CreateUserRequest(
                        user=user_pb2.User(email=email, display_name="Ada Lovelace")
                    ),
                    timeout=10,
                )
        user_id = response.user.id
        trace_id = format(test_span.get_span_context().trace_id, "032x")

        try:
            message = await subscription.next_msg(timeout=EVENT_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"no message on tidings.users.> within {EVENT_TIMEOUT}s after CreateUser\n"
                        + system.supervisor.log_tail())
    finally:
        await connection.close()

    # The event as a CloudEvent in binary content mode.
    headers = dict(message.headers or {})
    assert message.subject == CREATED_SUBJECT, f"event published on {message.subject!r}"
    expected_headers = {
        "ce-specversion": "1.0",
        "ce-type": "tidings.users.v1.UserCreated",
        "ce-subject": user_id,
        "ce-dataschema": "proto:tidings.users.v1.UserCreated",
        "content-type": "application/protobuf",
    }
    for name, value in expected_headers.items():
        assert headers.get(name) == value, (
            f"header {name} is {headers.get(name)!r}, expected {value!r}; headers: {headers}"
        )
    event_id = headers.get("ce-id", "")
    assert _is_uuid(event_id), f"ce-id {event_id!r} is not a UUID"
    assert headers.get("Nats-Msg-Id") == event_id, (
        f"Nats-Msg-Id {headers.get('Nats-Msg-Id')!r} differs from ce-id {event_id!r}, "
        "so JetStream cannot drop a republished copy"
    )
    assert headers.get("ce-source"), f"ce-source is missing or empty; headers: {headers}"
    event_time = _parse_rfc3339(headers.get("ce-time", ""))
    assert event_time is not None, f"ce-time {headers.get('ce-time')!r} is not an RFC 3339 time with offset"
    assert abs(datetime.now(UTC) - event_time) < timedelta(minutes=5), (
        f"ce-time {headers['ce-time']!r} is more than 5 minutes away from now"
    )
    traceparent = TRACEPARENT.match(headers.get("traceparent", ""))
    assert traceparent is not None, f"traceparent header missing or malformed; headers: {headers}"
    assert traceparent.group(1) == trace_id, (
        f"traceparent {headers['traceparent']} is not in the client's trace {trace_id}"
    )
    created = user_events_pb2.UserCreated.FromString(message.data)
    assert created.user.email == email, f"UserCreated body carries email {created.user.email!r}"
    assert created.user.id == user_id, f"UserCreated body carries user id {created.user.id!r}"

    # The notifications service consumed the event from JetStream.
    try:
        notifications = await wait_for(
            lambda: _list_notifications(system.notifications_address, user_id), timeout=EVENT_TIMEOUT
        )
    except TimeoutError:
        pytest.fail(f"no notification for user {user_id} within {EVENT_TIMEOUT}s\n"
                    + system.supervisor.log_tail())
    assert len(notifications) == 1, f"expected one notification, got {notifications}"
    assert notifications[0].source_event_id == event_id, (
        f"notification came from event {notifications[0].source_event_id}, expected {event_id}"
    )

    # Spans: the test's own from the in-memory exporter, the services' from the OTLP receiver.
    # Each service exports on its own schedule, so the consumer span can arrive before the producer span.
    expected_service_spans = {
        ("users", "SERVER", CREATE_USER_METHOD),
        ("users", "PRODUCER", f"publish {CREATED_SUBJECT}"),
        ("notifications", "CONSUMER", f"process {CREATED_SUBJECT}"),
    }

    async def service_spans_exported() -> bool:
        received = {(s.service, s.kind, s.name) for s in otlp_receiver.spans_of_trace(trace_id)}
        return expected_service_spans <= received

    try:
        await wait_for(service_spans_exported, timeout=EVENT_TIMEOUT)
    except TimeoutError:
        found = "\n".join(s.describe() for s in otlp_receiver.spans_of_trace(trace_id))
        pytest.fail(f"the OTLP receiver did not get all of {sorted(expected_service_spans)} for trace "
                    f"{trace_id} within {EVENT_TIMEOUT}s. Spans of the trace so far:\n{found}")

    test_spans = [from_sdk_span(s) for s in spans.get_finished_spans()]
    test_spans = [s for s in test_spans if s.trace_id == trace_id]
    service_spans = otlp_receiver.spans_of_trace(trace_id)
    trace_spans = test_spans + service_spans

    root = _single_span(trace_spans, "test", "INTERNAL", "create user from test")
    client = _single_span(trace_spans, "test", "CLIENT", CREATE_USER_METHOD)
    server = _single_span(trace_spans, "users", "SERVER", CREATE_USER_METHOD)
    producer = _single_span(trace_spans, "users", "PRODUCER", f"publish {CREATED_SUBJECT}")
    consumer = _single_span(trace_spans, "notifications", "CONSUMER", f"process {CREATED_SUBJECT}")

    assert client.parent_span_id == root.span_id, f"client span parent: {client.describe()}"
    assert server.parent_span_id == client.span_id, f"server span parent: {server.describe()}"
    assert producer.parent_span_id == server.span_id, f"producer span parent: {producer.describe()}"
    assert consumer.parent_span_id == producer.span_id, f"consumer span parent: {consumer.describe()}"
    assert traceparent.group(2) == producer.span_id, (
        f"traceparent {headers['traceparent']} does not name the producer span {producer.span_id}"
    )

    for span in (producer, consumer):
        assert span.attributes.get("messaging.system") == "nats", (
            f"messaging.system of {span.describe()}: {span.attributes}"
        )
        assert span.attributes.get("messaging.destination.name") == CREATED_SUBJECT, (
            f"messaging.destination.name of {span.describe()}: {span.attributes}"
        )

    # SIGTERM stops the supervisor, which stops every process it started.
    supervisor = system.supervisor
    supervisor.process.send_signal(signal.SIGTERM)
    try:
        exit_code = await asyncio.to_thread(supervisor.process.wait, EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tidings up did not exit within {EXIT_TIMEOUT}s of SIGTERM\n" + supervisor.log_tail())
    assert exit_code == 0, f"tidings up exited with code {exit_code}\n" + supervisor.log_tail()
    assert {"nats-server", "users", "notifications"} <= system.child_pids.keys(), (
        f"tidings up did not print a 'started NAME (pid N)' line for each process: {system.child_pids}"
    )
    for name, pid in system.child_pids.items():
        exited = await asyncio.to_thread(wait_until, lambda pid=pid: not pid_running(pid), timeout=5.0)
        assert exited, f"{name} (pid {pid}) still runs after tidings up exited"

    # Shutdown flushed every span, so the trace is complete: one root and no missing parent.
    trace_spans = test_spans + otlp_receiver.spans_of_trace(trace_id)
    listing = "\n".join(s.describe() for s in trace_spans)
    span_ids = {s.span_id for s in trace_spans}
    roots = [s for s in trace_spans if s.parent_span_id is None]
    assert roots == [root], f"the trace must have one root, the test's span. Spans:\n{listing}"
    orphans = [s for s in trace_spans if s.parent_span_id and s.parent_span_id not in span_ids]
    assert not orphans, f"spans whose parent was never exported:\n{listing}"
    services = {s.service for s in trace_spans}
    assert services == {"test", "users", "notifications"}, f"services in the trace: {services}"


async def test_http_call_through_the_gateway_end_to_end(
    tidings_up: RunningSystem, otlp_receiver: OtlpTraceReceiver
) -> None:
    system = tidings_up
    minted = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "tidings"), "token", "--scope", "users:write"],
        env=clean_environment({"TIDINGS_DATA_DIR": str(system.data_dir)}),
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert minted.returncode == 0, f"tidings token failed: {minted.stderr}"
    trace_id = "5e1f7a3b9c2d4e6f8a0b1c2d3e4f5a6b"
    headers = {
        "Authorization": f"Bearer {minted.stdout.strip()}",
        "traceparent": f"00-{trace_id}-1a2b3c4d5e6f7a8b-01",
    }

    async with aiohttp.ClientSession() as session, session.post(
        f"{system.gateway_url}/v1/users", json={"email": "http@example.com", "displayName": "Ada"},
        headers=headers,
    ) as reply:
        body = await reply.json()

    assert reply.status == 200, f"gateway answered {reply.status}: {body}\n" + system.supervisor.log_tail()
    try:
        spans = await wait_for(
            lambda: _spans_when(otlp_receiver, trace_id, ("gateway", "SERVER"), ("users", "PRODUCER")),
            timeout=EVENT_TIMEOUT,
        )
    except TimeoutError:
        found = "\n".join(s.describe() for s in otlp_receiver.spans_of_trace(trace_id))
        pytest.fail(f"trace {trace_id} lacks the gateway or users spans; it has:\n{found}")
    gateway_span = _single_span(spans, "gateway", "SERVER", "POST /v1/users")
    users_span = _single_span(spans, "users", "SERVER", CREATE_USER_METHOD)
    assert gateway_span.parent_span_id == "1a2b3c4d5e6f7a8b", "the gateway span does not continue the client"
    assert users_span.parent_span_id in {s.span_id for s in spans if s.service == "gateway"}, (
        "the users span is not a descendant of the gateway's spans"
    )


async def _spans_when(
    receiver: OtlpTraceReceiver, trace_id: str, *wanted: tuple[str, str]
) -> list[CollectedSpan] | None:
    spans = receiver.spans_of_trace(trace_id)
    present = {(s.service, s.kind) for s in spans}
    return spans if all(item in present for item in wanted) else None


def test_tidings_up_prints_service_logs_as_text(tidings_up: RunningSystem) -> None:
    ready_line = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} users +INFO +service ready +port=\d+$", re.MULTILINE)

    assert ready_line.search(tidings_up.supervisor.stdout()), tidings_up.supervisor.log_tail()


def test_tidings_up_records_the_gateway_url(tidings_up: RunningSystem) -> None:
    recorded = (tidings_up.data_dir / "gateway.url").read_text()

    assert recorded == tidings_up.gateway_url
