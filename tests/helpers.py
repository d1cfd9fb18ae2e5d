"""Helpers for tests: run services in-process, wait for conditions with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

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


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Return the BadRequest field violations of a failed call, field path to description."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return {v.field: v.description for v in bad_request.field_violations}
    return {}


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """Return the ErrorInfo reason of a failed call, or an empty string."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@asynccontextmanager
async def probe_channel(
    interceptor: grpc.aio.ServerInterceptor, service: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> AsyncIterator[grpc.aio.Channel]:
    """Serve handlers as service behind interceptor on 127.0.0.1 and yield a channel to them."""
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
