"""Unit tests of observability/server_spans.py: the SERVER span of each gRPC call.

The tests run a real grpc.aio server on 127.0.0.1 with generic method
handlers behind the interceptor, and read the spans from the in-memory
exporter of the test process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from observability.server_spans import ServerSpanInterceptor, _peer_attributes
from tests.helpers import probe_channel, wait_for

SERVICE = "tidings.test.v1.Probe"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

slow_call_started = asyncio.Event()


def _current_trace() -> bytes:
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}-{context.span_id:016x}".encode()


async def _echo_trace(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _current_trace()


async def _not_found(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such probe")
    return b""


async def _internal(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.INTERNAL, "disk on fire")
    return b""


async def _raises(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("unmapped failure")


async def _sets_code(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    return b""


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    slow_call_started.set()
    await asyncio.sleep(30)
    return b""


async def _generator(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield _current_trace()


async def _writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(_current_trace())


async def _client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return _current_trace()


def _probe_server(interceptor: ServerSpanInterceptor) -> AbstractAsyncContextManager[grpc.aio.Channel]:
    """Serve the probe methods behind interceptor on 127.0.0.1 and yield a channel to them."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo_trace),
        "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
        "Internal": grpc.unary_unary_rpc_method_handler(_internal),
        "Raises": grpc.unary_unary_rpc_method_handler(_raises),
        "SetsCode": grpc.unary_unary_rpc_method_handler(_sets_code),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Generator": grpc.unary_stream_rpc_method_handler(_generator),
        "Writer": grpc.unary_stream_rpc_method_handler(_writer),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
    }
    return probe_channel(interceptor, SERVICE, handlers)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async with _probe_server(ServerSpanInterceptor()) as probe_channel:
        yield probe_channel


async def _call(channel: grpc.aio.Channel, method: str, metadata: Any = None) -> bytes:
    return await channel.unary_unary(f"/{SERVICE}/{method}")(b"", metadata=metadata, timeout=10)


async def _call_failing(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await _call(channel, method)
    return failure.value.code()


def _only_span(spans: InMemorySpanExporter) -> ReadableSpan:
    [span] = spans.get_finished_spans()
    return span


async def test_server_span_is_named_for_the_method(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call(channel, "Echo")

    assert _only_span(spans).name == f"/{SERVICE}/Echo"


async def test_server_span_is_of_kind_server(channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
    await _call(channel, "Echo")

    assert _only_span(spans).kind == SpanKind.SERVER


async def test_server_span_has_rpc_attributes(channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
    await _call(channel, "Echo")

    attributes = dict(_only_span(spans).attributes or {})
    assert {key: attributes[key] for key in ("rpc.system", "rpc.service", "rpc.method")} == {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Echo",
    }


async def test_server_span_records_ok_status_code(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call(channel, "Echo")

    assert (_only_span(spans).attributes or {})["rpc.grpc.status_code"] == 0


async def test_server_span_records_the_peer_address(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call(channel, "Echo")

    assert (_only_span(spans).attributes or {})["network.peer.address"] == "127.0.0.1"


async def test_server_span_continues_the_callers_trace(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call(channel, "Echo", metadata=[("traceparent", TRACEPARENT)])

    span = _only_span(spans)
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT_SPAN_ID


async def test_server_span_parent_is_remote(channel: grpc.aio.Channel, spans: InMemorySpanExporter) -> None:
    await _call(channel, "Echo", metadata=[("traceparent", TRACEPARENT)])

    parent = _only_span(spans).parent
    assert parent is not None
    assert parent.is_remote


async def test_server_span_without_traceparent_starts_a_trace(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call(channel, "Echo")

    assert _only_span(spans).parent is None


async def test_server_span_is_current_in_the_handler(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    seen = await _call(channel, "Echo")

    context = _only_span(spans).context
    assert seen == f"{context.trace_id:032x}-{context.span_id:016x}".encode()


async def test_server_span_parent_per_call(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    # The wrapped handler is kept per method; nothing of one call may stay for the next.
    other_parent = "00f067aa0ba902b7"
    await _call(channel, "Echo", metadata=[("traceparent", TRACEPARENT)])
    await _call(channel, "Echo", metadata=[("traceparent", f"00-{TRACE_ID}-{other_parent}-01")])

    parents = [f"{span.parent.span_id:016x}" for span in spans.get_finished_spans() if span.parent]
    assert parents == [PARENT_SPAN_ID, other_parent]


async def test_server_span_of_client_error_has_unset_status(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "NotFound")

    assert _only_span(spans).status.status_code == StatusCode.UNSET


async def test_server_span_of_client_error_records_its_code(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "NotFound")

    assert (_only_span(spans).attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_server_span_of_server_fault_has_error_status(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "Internal")

    status = _only_span(spans).status
    assert status.status_code == StatusCode.ERROR
    assert status.description == "INTERNAL: disk on fire"


async def test_server_span_unmapped_exception_is_unknown(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    assert await _call_failing(channel, "Raises") == grpc.StatusCode.UNKNOWN

    assert (_only_span(spans).attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]


async def test_server_span_records_unmapped_exception(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "Raises")

    [event] = _only_span(spans).events
    assert (event.attributes or {})["exception.type"] == "ValueError"


async def test_server_span_of_abort_records_no_exception(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "Internal")

    assert not _only_span(spans).events


async def test_server_span_records_set_code(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    await _call_failing(channel, "SetsCode")

    code = (_only_span(spans).attributes or {})["rpc.grpc.status_code"]
    assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def test_server_span_of_cancelled_call(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    slow_call_started.clear()
    call = channel.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=10)
    await slow_call_started.wait()
    call.cancel()

    async def ended() -> ReadableSpan | None:
        return next(iter(spans.get_finished_spans()), None)

    span = await wait_for(ended)
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


async def test_server_span_covers_a_generator_stream(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Generator")(b"", timeout=10)
    responses = [response async for response in call]

    context = _only_span(spans).context
    assert responses == [f"{context.trace_id:032x}-{context.span_id:016x}".encode()] * 3


async def test_server_span_covers_a_writer_stream(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Writer")(b"", timeout=10)
    responses = [response async for response in call]

    context = _only_span(spans).context
    assert responses == [f"{context.trace_id:032x}-{context.span_id:016x}".encode()]


async def test_server_span_covers_a_client_stream(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    response = await channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"", b""]), timeout=10)

    context = _only_span(spans).context
    assert response == f"{context.trace_id:032x}-{context.span_id:016x}".encode()


async def test_server_span_without_sdk_passes_the_trace_on(spans: InMemorySpanExporter) -> None:
    # With the SDK off, the handler still gets the caller's trace id as its
    # current one, so that its outgoing calls and events continue that trace.
    async with _probe_server(ServerSpanInterceptor(trace.NoOpTracerProvider())) as channel:
        seen = await _call(channel, "Echo", metadata=[("traceparent", TRACEPARENT)])

    assert seen == f"{TRACE_ID}-{PARENT_SPAN_ID}".encode()


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:50051", {"network.peer.address": "127.0.0.1", "network.peer.port": 50051}),
        ("ipv6:[::1]:50051", {"network.peer.address": "::1", "network.peer.port": 50051}),
        ("ipv4:10.0.0.7:1234,127.0.0.1:50051",
         {"network.peer.address": "10.0.0.7", "network.peer.port": 1234}),
        ("unix:/tmp/grpc.sock", {}),
        ("ipv4:no-port", {}),
        ("", {}),
    ],
)
def test_peer_attributes(peer: str, expected: dict[str, Any]) -> None:
    assert _peer_attributes(peer) == expected
