"""Outbox relay against a real nats-server that goes away and comes back."""

from __future__ import annotations

import logging

import nats
import pytest

from services.runtime.cli.embedded_nats import EmbeddedNats
from services.runtime.clients import traced_channel
from services.runtime.config import Settings
from services.users.main import SPEC as USERS
from tests.helpers import running_service, wait_for
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc


async def _stored_subjects(url: str, expected: int) -> list[str] | None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        if (await js.stream_info("USERS")).state.messages < expected:
            return None
        subscription = await js.subscribe("tidings.users.>", ordered_consumer=True)
        return [(await subscription.next_msg(timeout=5)).headers["ce-subject"] for _ in range(expected)]
    finally:
        await client.close()


async def test_relay_drains_backlog_after_outage(
    settings: Settings, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime.relay")
    async with (
        running_service(USERS, settings) as service,
        traced_channel(settings.address_of("users")) as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        nats_server.stop()

        created = []
        for index in range(5):
            response = await stub.CreateUser(
                user_service_pb2.CreateUserRequest(
                    user=user_pb2.User(email=f"u{index}@example.com", display_name=f"U{index}")
                )
            )
            created.append(response.user.id)
        await wait_for(lambda: _outage_reported(caplog), timeout=15)
        nats_server.start()

        subjects = await wait_for(lambda: _stored_subjects(nats_server.url, 5), timeout=30)

        assert subjects == created
        assert service.relay is not None and service.relay.published == 5
    outage_lines = [r for r in caplog.records if "cannot publish" in r.getMessage()]
    assert len(outage_lines) == 1


async def _outage_reported(caplog: pytest.LogCaptureFixture) -> bool:
    return any("cannot publish" in record.getMessage() for record in caplog.records)
