"""SIGTERM to the gateway process: requests in flight finish, then it exits cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.cli.supervisor import wait_until_http_ok
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

SLOW_CALL_SECONDS = 1.5


class SlowUsers(user_service_pb2_grpc.UserServiceServicer):
    """A users backend whose GetUser takes SLOW_CALL_SECONDS, so a call is in flight at SIGTERM."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def GetUser(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.started.set()
        await asyncio.sleep(SLOW_CALL_SECONDS)
        return user_service_pb2.GetUserResponse(user=user_pb2.User(id=request.id, display_name="slow"))


@pytest.fixture
async def backend() -> AsyncIterator[tuple[SlowUsers, int]]:
    servicer = SlowUsers()
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


@pytest.fixture
async def gateway_process(
    backend: tuple[SlowUsers, int], nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TIDINGS_", "OTEL_"))},
        "NATS_URL": nats_server.url,
        "TIDINGS_GATEWAY_PORT": str(port),
        "TIDINGS_GATEWAY_AUTH_ENABLED": "false",
        "TIDINGS_GATEWAY_BACKENDS": json.dumps({"users": f"127.0.0.1:{backend[1]}"}),
        "TIDINGS_SHUTDOWN_GRACE": "10",
        "OTEL_SDK_DISABLED": "true",
    }
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.main", env=environment, stdout=log, stderr=log,
        stdin=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_http_ok(f"{url}/healthz", timeout=20)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), timeout=10)
        log.close()


async def test_gateway_sigterm_lets_the_request_in_flight_finish(
    backend: tuple[SlowUsers, int], gateway_process: tuple[asyncio.subprocess.Process, str]
) -> None:
    servicer, _ = backend
    process, url = gateway_process

    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(f"{url}/v1/users/u1"))
        await asyncio.wait_for(servicer.started.wait(), timeout=10)
        process.send_signal(signal.SIGTERM)
        reply = await request
        status = reply.status
        reply.release()

    assert status == 200


async def test_gateway_sigterm_exits_with_code_zero(
    backend: tuple[SlowUsers, int], gateway_process: tuple[asyncio.subprocess.Process, str]
) -> None:
    servicer, _ = backend
    process, url = gateway_process

    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.get(f"{url}/v1/users/u1"))
        await asyncio.wait_for(servicer.started.wait(), timeout=10)
        process.send_signal(signal.SIGTERM)
        (await request).release()

    code = await asyncio.wait_for(process.wait(), timeout=20)
    assert code == 0
