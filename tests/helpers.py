"""Helpers for tests: run services in-process, wait for conditions with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from services.runtime.config import Settings
from services.runtime.service import Service, ServiceSpec

T = TypeVar("T")


@asynccontextmanager
async def running_service(spec: ServiceSpec, settings: Settings) -> AsyncIterator[Service]:
    """Start a service in this event loop, yield it once SERVING, stop it on exit."""
    service = Service(spec, settings)
    await service.start()
    try:
        yield service
    finally:
        service.stopping.set()
        await service.stop()


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Call probe until it returns a truthy value and return it; fail after timeout seconds."""
    async with asyncio.timeout(timeout):
        while True:
            result = await probe()
            if result:
                return result
            await asyncio.sleep(interval)
