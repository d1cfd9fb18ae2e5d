"""Gateway toward its backends: balancing, replicas stopping, retries, breaker, deadlines, identity.

The backends are small UserService servers of the test's own, so that it
can stop a replica, see which replica served a call and read the metadata a
call arrived with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import grpc
import pytest

from gateway.identity import IdentityInterceptor, current_caller
from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from tests.helpers import wait_for
from tests.integration.gateway_fixtures import Api, gateway_settings, running_gateway, token
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

IDENTITY_SECRET = "identity-secret-shared-by-gateway-and-services"


@dataclass
class Replica(user_service_pb2_grpc.UserServiceServicer):
    """A UserService replica that returns its name and records what it received."""

    name: str
    port: int
    server: grpc.aio.Server | None = None
    callers: list[Any] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    create_calls: int = 0

    async def GetUser(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller = current_caller()
        self.callers.append(caller.subject if caller else None)
        self.request_ids.append(dict(context.invocation_metadata() or ()).get("x-request-id", ""))
        if request.id == "slow":
            await asyncio.sleep(5)
        return user_service_pb2.GetUserResponse(user=user_pb2.User(id=request.id, display_name=self.name))

    async def CreateUser(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.create_calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "store is down")

    async def start(self) -> None:
        self.server = grpc.aio.server(interceptors=[IdentityInterceptor(IDENTITY_SECRET)])
        user_service_pb2_grpc.add_UserServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    started = [Replica("a", free_port()), Replica("b", free_port())]
    for replica in started:
        await replica.start()
    yield started
    for replica in started:
        await replica.stop()


@pytest.fixture
async def api(settings: Settings, replicas: list[Replica]) -> AsyncIterator[Api]:
    addresses = ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)
    gateway = gateway_settings(backends={"users": addresses}, breaker_failures=3, breaker_reset=0.5)
    async with running_gateway(settings, gateway, identity_secret=IDENTITY_SECRET) as (_, client):
        yield client


async def names_answering(api: Api, calls: int) -> list[str]:
    names = []
    for index in range(calls):
        status, body, _ = await api.call("GET", f"/v1/users/u{index}")
        names.append(body["user"]["displayName"] if status == 200 else f"status {status}")
    return names


async def test_gateway_balances_over_every_replica(api: Api) -> None:
    names = await names_answering(api, 20)

    assert set(names) == {"a", "b"}


async def test_gateway_keeps_answering_when_a_replica_stops(api: Api, replicas: list[Replica]) -> None:
    await names_answering(api, 4)
    await replicas[1].stop()

    names = await names_answering(api, 20)

    assert set(names) == {"a"}


async def test_gateway_does_not_retry_writes(api: Api, replicas: list[Replica]) -> None:
    status, body, _ = await api.call("POST", "/v1/users", json={"email": "ada@example.com"})

    assert status == 503, body
    assert sum(replica.create_calls for replica in replicas) == 1


async def test_gateway_breaker_opens_when_every_replica_is_down(api: Api, replicas: list[Replica]) -> None:
    for replica in replicas:
        await replica.stop()

    statuses = [await api.call("GET", "/v1/users/u1") for _ in range(4)]

    reasons = [
        next((d["reason"] for d in body.get("details", []) if "ErrorInfo" in d["@type"]), "")
        for _, body, _ in statuses
    ]
    assert reasons[-1] == "BACKEND_CIRCUIT_OPEN"


async def test_gateway_breaker_closes_when_a_replica_returns(api: Api, replicas: list[Replica]) -> None:
    for replica in replicas:
        await replica.stop()
    for _ in range(4):
        await api.call("GET", "/v1/users/u1")
    await replicas[0].start()

    async def answered() -> bool:
        status, _, _ = await api.call("GET", "/v1/users/u1")
        return status == 200

    assert await wait_for(answered, timeout=15, interval=0.1)


async def test_gateway_request_timeout_becomes_the_grpc_deadline(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v1/users/slow", headers={"Request-Timeout": "0.2"})

    assert status == 504, body
    assert body["code"] == 4, body
    assert [d.get("reason") for d in body["details"]] == ["BACKEND_TIMEOUT"], body


async def test_gateway_forwards_the_signed_caller_identity(api: Api, replicas: list[Replica]) -> None:
    await api.call("GET", "/v1/users/u1", bearer=token(subject="zoë"))

    assert [s for replica in replicas for s in replica.callers] == ["zoë"]


async def test_gateway_forwards_a_non_ascii_request_id(api: Api, replicas: list[Replica]) -> None:
    await api.call("GET", "/v1/users/u1", headers={"X-Request-Id": "zoë-42"})

    assert [unquote(r) for replica in replicas for r in replica.request_ids] == ["zoë-42"]


async def test_service_rejects_a_forged_identity(replicas: list[Replica]) -> None:
    forged = [("x-tidings-subject", "admin"), ("x-tidings-scopes", "users:write"),
              ("x-tidings-identity-expires", "9999999999"), ("x-tidings-identity-signature", "forged")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replicas[0].port}") as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetUser(user_service_pb2.GetUserRequest(id="u1"), metadata=forged)

    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
