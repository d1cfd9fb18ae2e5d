"""A service's gRPC port: taken ports fail the start instead of being shared."""

from __future__ import annotations

import grpc
import pytest

from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError
from services.users.main import SPEC as USERS
from tests.helpers import running_service


async def test_service_port_taken_by_grpc(settings: Settings) -> None:
    # A gRPC server with the default options binds with SO_REUSEPORT, which
    # would let a second server share the port if that one allowed it too.
    other = grpc.aio.server()
    other.add_insecure_port(settings.address_of("users"))
    await other.start()
    try:
        with pytest.raises(ConfigurationError, match="cannot listen on"):
            async with running_service(USERS, settings):
                pass
    finally:
        await other.stop(None)


async def test_second_service_on_same_port_fails(settings: Settings) -> None:
    async with running_service(USERS, settings):
        with pytest.raises(ConfigurationError, match="TIDINGS_USERS_PORT"):
            async with running_service(USERS, settings):
                pass
