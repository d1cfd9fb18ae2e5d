"""A three-node JetStream cluster on loopback losing a node under load: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.notifications.main import SPEC as NOTIFICATIONS
from services.runtime.cli.embedded_nats import EmbeddedCluster
from services.runtime.config import Settings
from services.users.main import SPEC as USERS
from tests.helpers import running_service, wait_for
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    nodes = EmbeddedCluster(tmp_path / "cluster", 3)
    nodes.start()
    yield nodes
    nodes.stop()


async def _notified(
    stub: notification_service_pb2_grpc.NotificationServiceStub, user_ids: list[str]
) -> dict[str, int] | None:
    counts = {}
    for user_id in user_ids:
        response = await stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(user_id=user_id)
        )
        counts[user_id] = len(response.notifications)
    return counts if all(counts.values()) else None


async def test_cluster_node_loss_loses_no_event(cluster: EmbeddedCluster, settings: Settings) -> None:
    clustered = settings.model_copy(update={"nats_url": cluster.url, "stream_replicas": 3})
    created: list[str] = []
    failed_calls = 0
    async with (
        running_service(USERS, clustered) as users_service,
        running_service(NOTIFICATIONS, clustered),
        grpc.aio.insecure_channel(clustered.address_of("users")) as users_channel,
        grpc.aio.insecure_channel(clustered.address_of("notifications")) as notifications_channel,
    ):
        users = user_service_pb2_grpc.UserServiceStub(users_channel)
        notifications = notification_service_pb2_grpc.NotificationServiceStub(notifications_channel)

        async def create(index: int) -> None:
            nonlocal failed_calls
            try:
                response = await users.CreateUser(user_service_pb2.CreateUserRequest(
                    user=user_pb2.User(email=f"u{index}@example.com", display_name=f"U{index}")
                ), timeout=10)
            except grpc.aio.AioRpcError:
                failed_calls += 1
                return
            created.append(response.user.id)

        await asyncio.gather(*(create(index) for index in range(40)))
        victim = cluster.nodes[0]
        victim.kill()
        await asyncio.gather(*(create(index) for index in range(40, 80)))
        await asyncio.to_thread(victim.start)
        await asyncio.gather(*(create(index) for index in range(80, 120)))

        counts = await wait_for(lambda: _notified(notifications, created), timeout=60, interval=0.2)
        published = users_service.relay.published if users_service.relay else 0

    print(f"\ncluster node loss: {len(created)} users created, {failed_calls} calls failed, "
          f"{published} events published, {sum(counts.values())} notifications stored")
    assert failed_calls == 0
    assert len(created) == 120
    assert set(counts.values()) == {1}
