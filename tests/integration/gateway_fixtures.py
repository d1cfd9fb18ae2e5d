"""A running system behind the gateway, for tests that call it over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
from aiohttp.test_utils import TestServer
from pydantic import SecretStr

from gateway.app import Gateway
from gateway.auth import mint_hs256_token
from gateway.events import EventStream
from gateway.settings import GatewaySettings
from services.inventory.main import SPEC as INVENTORY
from services.notifications.main import SPEC as NOTIFICATIONS
from services.orders.main import SPEC as ORDERS
from services.payments.main import SPEC as PAYMENTS
from services.runtime.config import Settings
from services.runtime.service import ServiceSpec
from services.users.main import SPEC as USERS
from tests.helpers import running_service

JWT_SECRET = "test-secret-of-the-gateway-0123456789"
ALL_SCOPES = (
    "users:read", "users:write", "orders:read", "orders:write", "inventory:read", "inventory:write",
    "payments:read", "payments:write", "notifications:read", "events:read",
)
SERVICES: dict[str, ServiceSpec] = {
    "users": USERS,
    "orders": ORDERS,
    "inventory": INVENTORY,
    "payments": PAYMENTS,
    "notifications": NOTIFICATIONS,
}


def gateway_settings(**overrides: Any) -> GatewaySettings:
    """Settings with HS256 auth and limits loose enough that only tests of them hit them."""
    values: dict[str, Any] = {
        "jwt_hs256_secret": SecretStr(JWT_SECRET),
        "rate_limit_per_second": 1000.0,
        "rate_limit_burst": 1000,
        "backend_timeout": 10.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


def token(subject: str = "ada", scopes: Iterable[str] = ALL_SCOPES) -> str:
    """A valid HS256 token for the test gateway."""
    return mint_hs256_token(JWT_SECRET, subject, scopes)


@dataclass
class Api:
    """An HTTP client of the test gateway that sends a bearer token unless bearer=None."""

    session: aiohttp.ClientSession
    base: str
    bearer: str | None

    async def call(
        self, method: str, path: str, *, json: Any = None, data: bytes | str | None = None,
        headers: dict[str, str] | None = None, bearer: str | None = "default",
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        """Send one request; return the status, the decoded JSON body (or text) and headers."""
        sent = dict(headers or {})
        chosen = self.bearer if bearer == "default" else bearer
        if chosen is not None:
            sent["Authorization"] = f"Bearer {chosen}"
        url = self.base + path
        async with self.session.request(method, url, json=json, data=data, headers=sent) as reply:
            text = await reply.text()
            body: Any = text
            if reply.content_type == "application/json":
                body = await reply.json()
            return reply.status, body, reply.headers


@asynccontextmanager
async def running_gateway(
    settings: Settings, gateway: GatewaySettings, *, identity_secret: str | None = None,
    events: bool = False,
) -> AsyncIterator[tuple[Gateway, Api]]:
    """Serve a Gateway on a free loopback port; yield it with a client holding a valid token.

    With events, the gateway also serves GET /v1/events from the test's nats-server.
    """
    client = await nats.connect(settings.nats_url) if events else None
    front = Gateway(
        gateway, settings, identity_secret=identity_secret,
        events=EventStream(client, heartbeat=0.5) if client else None,
    )
    server = TestServer(front.application(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield front, Api(session, str(server.make_url("")).rstrip("/"), token())
    finally:
        await server.close()
        await front.close()
        if client is not None:
            await client.close()


@asynccontextmanager
async def running_system(settings: Settings, names: Iterable[str] = SERVICES) -> AsyncIterator[None]:
    """Run the named services in this event loop until the block ends."""
    async with AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(running_service(SERVICES[name], settings))
        yield
