"""Fixtures for integration tests: users and notifications running in this event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import nats
import pytest
from nats.aio.client import Client as NATS

from services.notifications.main import SPEC as NOTIFICATIONS
from services.runtime.clients import traced_channel
from services.runtime.config import Settings
from services.runtime.service import Service
from services.users.main import SPEC as USERS
from tests.helpers import running_service
from tidings.notifications.v1 import notification_service_pb2_grpc
from tidings.users.v1 import user_service_pb2_grpc


@pytest.fixture
async def users_service(settings: Settings) -> AsyncIterator[Service]:
    async with running_service(USERS, settings) as service:
        yield service


@pytest.fixture
async def notifications_service(settings: Settings) -> AsyncIterator[Service]:
    async with running_service(NOTIFICATIONS, settings) as service:
        yield service


@pytest.fixture
async def users(
    users_service: Service, settings: Settings
) -> AsyncIterator[user_service_pb2_grpc.UserServiceStub]:
    async with traced_channel(settings.address_of("users")) as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)


@pytest.fixture
async def notifications(
    notifications_service: Service, settings: Settings
) -> AsyncIterator[notification_service_pb2_grpc.NotificationServiceStub]:
    async with grpc.aio.insecure_channel(settings.address_of("notifications")) as channel:
        yield notification_service_pb2_grpc.NotificationServiceStub(channel)


@pytest.fixture
async def nats_client(settings: Settings) -> AsyncIterator[NATS]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()
