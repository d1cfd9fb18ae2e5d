"""Crash safety of the outbox: a user committed before a crash is published and notified exactly once.

The users and notifications services run as real processes against a
nats-server of the test. A crash is a SIGKILL, so no shutdown code runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from nats.js import JetStreamContext

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.cli.supervisor import wait_until_serving
from services.runtime.events import cloudevent_headers
from tests.e2e.processes import (
    ChildProcess,
    clean_environment,
    kill_process,
    service_command,
    start_process,
    stop_process,
)
from tests.helpers import wait_for
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

pytestmark = pytest.mark.e2e

SERVING_TIMEOUT = 20.0
DELIVERY_TIMEOUT = 15.0
STREAM = "USERS"
DURABLE = "notifications-users"
CREATED_SUBJECT = "tidings.users.user.created"


@dataclass
class Services:
    """Launcher of the users and notifications service processes of one test."""

    log_dir: Path
    data_dir: Path
    nats_url: str
    ports: dict[str, int]
    started: list[ChildProcess] = field(default_factory=list)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def start(self, service: str, *, relay_enabled: bool) -> ChildProcess:
        environment = clean_environment({
            "NATS_URL": self.nats_url,
            "TIDINGS_DATA_DIR": str(self.data_dir),
            "TIDINGS_USERS_PORT": str(self.ports["users"]),
            "TIDINGS_NOTIFICATIONS_PORT": str(self.ports["notifications"]),
            "TIDINGS_RELAY_ENABLED": "true" if relay_enabled else "false",
            "TIDINGS_RELAY_POLL_INTERVAL": "0.2",
            "TIDINGS_SHUTDOWN_GRACE": "5",
            # No collector runs in this test, so span export is off instead of aimed at a default port.
            "OTEL_SDK_DISABLED": "true",
        })
        child = start_process(service, service_command(service), environment, self.log_dir)
        self.started.append(child)
        return child

    async def start_serving(self, service: str, *, relay_enabled: bool) -> ChildProcess:
        """Start a service and return once its health check reports SERVING."""
        child = self.start(service, relay_enabled=relay_enabled)

        async def exited() -> None:
            while child.process.poll() is None:
                await asyncio.sleep(0.1)

        serving = asyncio.create_task(wait_until_serving(self.address(service)))
        exit_watch = asyncio.create_task(exited())
        done, _ = await asyncio.wait({serving, exit_watch}, timeout=SERVING_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in (serving, exit_watch):
            task.cancel()
        if serving not in done:
            pytest.fail(f"{service} (pid {child.pid}) was not SERVING within {SERVING_TIMEOUT}s "
                        f"(exit code {child.process.poll()})\n" + child.log_tail())
        return child


@pytest.fixture
def services(tmp_path: Path, nats_server: EmbeddedNats) -> Iterator[Services]:
    """Service processes on free ports with SQLite files in tmp_path, stopped by PID at the end."""
    launcher = Services(
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        nats_url=nats_server.url,
        ports={"users": free_port(), "notifications": free_port()},
    )
    try:
        yield launcher
    finally:
        for child in launcher.started:
            stop_process(child)


@asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    connection = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        yield connection.jetstream(timeout=5)
    finally:
        await connection.close()


async def create_user(address: str, email: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
            user_service_pb2.CreateUserRequest(user=user_pb2.User(email=email, display_name="Grace")),
            timeout=10,
        )
    return response.user.id


async def list_notifications(address: str, user_id: str) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await notification_service_pb2_grpc.NotificationServiceStub(
            channel
        ).ListNotifications(
            notification_service_pb2.ListNotificationsRequest(user_id=user_id), timeout=5
        )
    return list(response.notifications)


def outbox_rows(data_dir: Path) -> list[sqlite3.Row]:
    """Read the users service's outbox from its SQLite file, which WAL mode allows while it runs."""
    with closing(sqlite3.connect(data_dir / "users.sqlite3", timeout=10)) as database:
        database.row_factory = sqlite3.Row
        return database.execute("SELECT * FROM outbox ORDER BY seq").fetchall()


async def stream_messages(js: JetStreamContext) -> int:
    return (await js.stream_info(STREAM)).state.messages


async def events_for(js: JetStreamContext, aggregate_id: str) -> list[str]:
    """Return the ce-id of every stored USERS message whose ce-subject is aggregate_id."""
    state = (await js.stream_info(STREAM)).state
    if state.messages == 0:
        return []
    event_ids = []
    for sequence in range(state.first_seq, state.last_seq + 1):
        message = await js.get_msg(STREAM, sequence)
        headers = message.headers or {}
        if headers.get("ce-subject") == aggregate_id:
            event_ids.append(headers.get("ce-id", ""))
    return event_ids


async def wait_until_consumed(js: JetStreamContext, services: Services, user_id: str) -> None:
    """Wait until the user's notification exists and the durable consumer has acked every message."""
    async def caught_up() -> bool:
        info = await js.consumer_info(STREAM, DURABLE)
        last = (await js.stream_info(STREAM)).state.last_seq
        return info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq == last

    try:
        await wait_for(
            lambda: list_notifications(services.address("notifications"), user_id),
            timeout=DELIVERY_TIMEOUT,
        )
        await wait_for(caught_up, timeout=DELIVERY_TIMEOUT)
    except TimeoutError:
        logs = "\n".join(child.log_tail(2000) for child in services.started[-2:])
        pytest.fail(f"the event of user {user_id} was not consumed within {DELIVERY_TIMEOUT}s\n{logs}")


async def wait_until_outbox_sent(data_dir: Path) -> None:
    async def all_sent() -> bool:
        return all(row["sent_at"] is not None for row in outbox_rows(data_dir))

    try:
        await wait_for(all_sent, timeout=DELIVERY_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"outbox rows still pending after {DELIVERY_TIMEOUT}s: "
                    f"{[dict(row) for row in outbox_rows(data_dir)]}")


async def create_user_then_crash(services: Services, email: str) -> str:
    """Create a user with the relay off, kill users with SIGKILL and return the user id."""
    users = await services.start_serving("users", relay_enabled=False)
    user_id = await create_user(services.address("users"), email)
    exit_code = await asyncio.to_thread(kill_process, users)
    assert exit_code == -9, f"users exited with {exit_code} instead of being killed\n" + users.log_tail()
    return user_id


async def test_relay_publishes_after_crash_once(services: Services, nats_server: EmbeddedNats) -> None:
    user_id = await create_user_then_crash(services, "grace@example.com")

    rows = outbox_rows(services.data_dir)
    assert len(rows) == 1, f"expected the user's event in the outbox, found {len(rows)} rows"
    assert rows[0]["aggregate_id"] == user_id, f"outbox row is about {rows[0]['aggregate_id']}"
    assert rows[0]["sent_at"] is None, f"outbox row marked sent with the relay off: {dict(rows[0])}"

    async with jetstream(nats_server.url) as js:
        published = await stream_messages(js)
        assert published == 0, f"{STREAM} contains {published} messages although the relay was off"

        await services.start_serving("notifications", relay_enabled=True)
        users = await services.start_serving("users", relay_enabled=True)
        await wait_until_outbox_sent(services.data_dir)
        await wait_until_consumed(js, services, user_id)

        event_ids = await events_for(js, user_id)
        assert len(event_ids) == 1, f"{STREAM} contains {len(event_ids)} events of the user: {event_ids}"
        notifications = await list_notifications(services.address("notifications"), user_id)
        assert len(notifications) == 1, f"expected one notification, got {notifications}"

        # A clean restart must not publish the sent row again. The relay publishes in outbox
        # order, so once a second user's event is consumed, any such copy would be too.
        exit_code = await asyncio.to_thread(stop_process, users)
        assert exit_code == 0, f"users exited with code {exit_code} on SIGTERM\n" + users.log_tail()
        await services.start_serving("users", relay_enabled=True)
        later_user_id = await create_user(services.address("users"), "grace-later@example.com")
        await wait_until_outbox_sent(services.data_dir)
        await wait_until_consumed(js, services, later_user_id)

        event_ids = await events_for(js, user_id)
        assert len(event_ids) == 1, (
            f"after restart {STREAM} contains {len(event_ids)} events of the user: {event_ids}"
        )
        published = await stream_messages(js)
        assert published == 2, f"expected the two users' events in {STREAM}, found {published}"
        notifications = await list_notifications(services.address("notifications"), user_id)
        assert len(notifications) == 1, f"after restart expected one notification, got {notifications}"


async def test_republish_after_ack_deduplicated(services: Services, nats_server: EmbeddedNats) -> None:
    user_id = await create_user_then_crash(services, "hopper@example.com")
    rows = outbox_rows(services.data_dir)
    assert len(rows) == 1, f"expected the user's event in the outbox, found {len(rows)} rows"
    row = rows[0]

    async with jetstream(nats_server.url) as js:
        # What a relay that died after the publish ack and before the UPDATE left behind:
        # the event in the stream, the row still pending.
        event_time = datetime.fromisoformat(row["event_time"]).replace(tzinfo=UTC)
        headers = cloudevent_headers(
            event_id=row["event_id"],
            source="/tidings/users",
            event_type=row["event_type"],
            time=event_time,
            subject=row["aggregate_id"],
        )
        ack = await js.publish(row["subject"], row["payload"], headers=headers)
        assert not ack.duplicate, "the first publish of the event was taken for a duplicate"

        await services.start_serving("notifications", relay_enabled=True)
        await services.start_serving("users", relay_enabled=True)
        await wait_until_outbox_sent(services.data_dir)
        await wait_until_consumed(js, services, user_id)

        event_ids = await events_for(js, user_id)
        assert event_ids == [row["event_id"]], (
            f"{STREAM} should contain only the first copy of event {row['event_id']}, contains {event_ids}"
        )
        published = await stream_messages(js)
        assert published == 1, f"{STREAM} contains {published} messages, expected 1"
        notifications = await list_notifications(services.address("notifications"), user_id)
        assert len(notifications) == 1, f"expected one notification, got {notifications}"
        assert notifications[0].source_event_id == row["event_id"], (
            f"notification came from event {notifications[0].source_event_id}"
        )
