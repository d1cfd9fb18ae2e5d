"""A service whose NATS server does not answer says so while it keeps trying."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from services.runtime.service import Service
from services.users.main import SPEC as USERS
from tests.helpers import wait_for


async def test_service_warns_while_nats_unreachable(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on this loopback port, so every connection attempt is refused.
    unreachable = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{free_port()}"})
    service = Service(USERS, unreachable)
    caplog.set_level(logging.WARNING, logger="services.runtime.service")
    starting = asyncio.create_task(service.start())

    async def warned() -> bool:
        return any("cannot connect to NATS" in record.getMessage() for record in caplog.records)

    try:
        await wait_for(warned, timeout=10.0)
    finally:
        # As serve() does on SIGTERM: stop waiting for NATS, then shut down.
        service.stopping.set()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await service.stop()

    warning = next(record for record in caplog.records if "cannot connect to NATS" in record.getMessage())
    assert warning.__dict__["nats_url"] == unreachable.nats_url
