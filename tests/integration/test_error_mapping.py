"""ErrorMappingInterceptor on a real grpc.aio server: no Python detail reaches the client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from services.runtime.errors import NotFound
from services.runtime.interceptors import ErrorMappingInterceptor
from tidings.users.v1 import user_service_pb2, user_service_pb2_grpc


class _FailingServicer(user_service_pb2_grpc.UserServiceServicer):
    async def GetUser(self, request, context):  # type: ignore[no-untyped-def]
        if request.id == "missing":
            raise NotFound("user missing not found", reason="USER_NOT_FOUND")
        raise RuntimeError("connection string postgresql://app:hunter2@db failed")


@pytest.fixture
async def stub() -> AsyncIterator[user_service_pb2_grpc.UserServiceStub]:
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    user_service_pb2_grpc.add_UserServiceServicer_to_server(_FailingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)
    await server.stop(None)


async def test_unexpected_error_becomes_internal(stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="services.runtime.interceptors")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetUser(user_service_pb2.GetUserRequest(id="x"))

    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in raised.value.details()
    assert "Traceback" not in raised.value.details()
    assert caplog.records[0].exc_info is not None


async def test_service_error_keeps_its_code(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetUser(user_service_pb2.GetUserRequest(id="missing"))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "user missing not found"
