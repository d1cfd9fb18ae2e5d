"""Notifications consumer against a real nats-server: one notification per event, once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import Column, MetaData, String, Table, func, select

from services.runtime.consumer import ConsumerSpec
from services.runtime.database import Transaction
from services.runtime.events import ReceivedEvent, cloudevent_headers
from services.runtime.service import Runtime, Service, ServiceSpec
from services.runtime.streams import USERS
from tests.helpers import running_service, wait_for
from tidings.notifications.v1 import notification_pb2, notification_service_pb2
from tidings.notifications.v1 import notification_service_pb2_grpc as notification_grpc
from tidings.users.v1 import user_events_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc

NotificationStub = notification_grpc.NotificationServiceStub


async def list_notifications(stub: NotificationStub, user_id: str) -> list[notification_pb2.Notification]:
    request = notification_service_pb2.ListNotificationsRequest(user_id=user_id)
    return list((await stub.ListNotifications(request)).notifications)


async def publish_user_created(
    nats_client: NATS, user_id: str, *, event_id: str, msg_id: str | None = None
) -> None:
    """Publish a UserCreated event the way the relay does, optionally with another Nats-Msg-Id."""
    headers = cloudevent_headers(
        event_id=event_id,
        source="/tests",
        event_type="tidings.users.v1.UserCreated",
        time=datetime.now(UTC),
        subject=user_id,
    )
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    body = user_events_pb2.UserCreated(
        user=user_pb2.User(id=user_id, email="ada@example.com", display_name="Ada")
    ).SerializeToString()
    await nats_client.jetstream().publish("tidings.users.user.created", body, headers=headers)


async def test_user_created_stores_welcome(
    users: user_service_pb2_grpc.UserServiceStub, notifications: NotificationStub
) -> None:
    created = await users.CreateUser(
        user_service_pb2.CreateUserRequest(user=user_pb2.User(email="ada@example.com", display_name="Ada"))
    )

    stored = await wait_for(lambda: list_notifications(notifications, created.user.id))

    assert [n.kind for n in stored] == [notification_pb2.NOTIFICATION_KIND_WELCOME]


async def test_redelivered_event_applied_once(
    notifications: NotificationStub, notifications_service: Service, nats_client: NATS
) -> None:
    user_id = str(uuid.uuid4())
    event_id = str(uuid.uuid4())
    # A second copy under another Nats-Msg-Id passes JetStream's duplicate
    # check, as a redelivery or a republish after the window would.
    await publish_user_created(nats_client, user_id, event_id=event_id)
    await publish_user_created(nats_client, user_id, event_id=event_id, msg_id=str(uuid.uuid4()))
    consumer = notifications_service.consumers[0]

    await wait_for(lambda: _settled(consumer, 2))

    assert consumer.duplicates == 1
    assert len(await list_notifications(notifications, user_id)) == 1


async def _settled(consumer, total: int) -> bool:
    return consumer.applied + consumer.duplicates >= total


async def test_undecodable_event_is_skipped(
    notifications: NotificationStub, notifications_service: Service, nats_client: NATS
) -> None:
    user_id = str(uuid.uuid4())
    await nats_client.jetstream().publish("tidings.users.user.created", b"no headers at all")
    await publish_user_created(nats_client, user_id, event_id=str(uuid.uuid4()))

    stored = await wait_for(lambda: list_notifications(notifications, user_id))

    assert len(stored) == 1


async def test_list_notifications_missing_user_invalid(notifications: NotificationStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await notifications.ListNotifications(notification_service_pb2.ListNotificationsRequest())

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_notifications_token_of_other_user_invalid(
    notifications: NotificationStub, nats_client: NATS
) -> None:
    user_id = str(uuid.uuid4())
    for _ in range(3):
        await publish_user_created(nats_client, user_id, event_id=str(uuid.uuid4()))
    await wait_for(lambda: _at_least(notifications, user_id, 3))
    first = await notifications.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(user_id=user_id, page_size=1)
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await notifications.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(
                user_id=str(uuid.uuid4()), page_token=first.next_page_token
            )
        )

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _at_least(stub: NotificationStub, user_id: str, count: int) -> bool:
    return len(await list_notifications(stub, user_id)) >= count


# A consumer whose handler fails a given number of times, to test retries.
_probe_metadata = MetaData()
_applied = Table("applied", _probe_metadata, Column("event_id", String(64), primary_key=True))


def _flaky_spec(failures: int, attempts: list[str]) -> ServiceSpec:
    async def handle(tx: Transaction, event: ReceivedEvent, message: object) -> None:
        attempts.append(event.id)
        await tx.execute(_applied.insert().values(event_id=event.id))
        if len(attempts) <= failures:
            raise RuntimeError("simulated transient failure")

    def consumers(runtime: Runtime) -> list[ConsumerSpec]:
        return [ConsumerSpec("probe", USERS.name, ("tidings.users.>",),
                             {"tidings.users.v1.UserCreated": handle})]

    return ServiceSpec(name="users", metadata=_probe_metadata, servicers=lambda runtime: [],
                       streams=(USERS,), consumers=consumers)


async def test_failed_handler_retried_and_rolled_back(settings, nats_client: NATS) -> None:
    attempts: list[str] = []
    async with running_service(_flaky_spec(2, attempts), settings) as service:
        await publish_user_created(nats_client, str(uuid.uuid4()), event_id="evt-retry")

        await wait_for(lambda: _applied_count(service, 1))

        assert attempts == ["evt-retry"] * 3
        assert await _applied_count(service, 1)


async def _applied_count(service: Service, expected: int) -> bool:
    async with service.runtime.database.transaction() as tx:
        count = (await tx.execute(select(func.count()).select_from(_applied))).scalar_one()
    return count == expected and service.consumers[0].applied == 1
