"""SIGTERM with calls in flight: they finish, their cleanup runs, no outbox row is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import nats
import pytest

from services.runtime.cli.supervisor import wait_until_serving
from services.runtime.config import Settings
from tests.helpers import wait_for
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


async def _exists(path: Path) -> bool:
    return path.exists()


@pytest.fixture
def slow_users(settings: Settings, tmp_path: Path):
    markers = tmp_path / "markers"
    markers.mkdir()
    environment = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "TIDINGS_DATA_DIR": str(settings.data_dir),
        "TIDINGS_USERS_PORT": str(settings.users_port),
        "TIDINGS_SHUTDOWN_GRACE": "10",
        "OTEL_TRACES_EXPORTER": "none",
        "TEST_MARKER_DIR": str(markers),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.slow_users"], cwd=REPO, env=environment,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield process, markers
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_sigterm_drains_in_flight_calls(settings: Settings, slow_users) -> None:
    process, markers = slow_users
    address = settings.address_of("users")
    await wait_until_serving(address, timeout=20)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        create = asyncio.ensure_future(stub.CreateUser(
            user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email="ada@example.com", display_name="Ada")
            ),
            timeout=30,
        ))
        aborting = asyncio.ensure_future(stub.GetUser(
            user_service_pb2.GetUserRequest(id="00000000-0000-4000-8000-000000000000"), timeout=30
        ))
        await wait_for(lambda: _exists(markers / "create-started"))
        await wait_for(lambda: _exists(markers / "get-started"))

        process.send_signal(signal.SIGTERM)
        await wait_for(lambda: _health_not_serving(address))
        (markers / "release").touch()
        created = await create
        aborted = await asyncio.gather(aborting, return_exceptions=True)

    exit_code = await asyncio.to_thread(process.wait, 30)
    assert exit_code == 0
    assert created.user.email == "ada@example.com"
    assert isinstance(aborted[0], grpc.aio.AioRpcError)
    assert aborted[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (markers / "create-cleanup").exists()
    assert (markers / "get-cleanup").exists()
    assert _outbox_rows(settings.data_dir / "users.sqlite3") == [(created.user.id, True)]
    assert await _stream_messages(settings.nats_url) == 1


async def _health_not_serving(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return True
    return response.status != health_pb2.HealthCheckResponse.SERVING


def _outbox_rows(database: Path) -> list[tuple[str, bool]]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT aggregate_id, sent_at IS NOT NULL FROM outbox").fetchall()
    return [(aggregate, bool(sent)) for aggregate, sent in rows]


async def _stream_messages(url: str) -> int:
    client = await nats.connect(url)
    try:
        return (await client.jetstream().stream_info("USERS")).state.messages
    finally:
        await client.close()
