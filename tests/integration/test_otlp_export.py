"""WireOTLPSpanExporter against a real OTLP/gRPC receiver on a loopback port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from observability.otlp_exporter import WireOTLPSpanExporter
from services.runtime.cli.embedded_nats import free_port


class RecordingReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """TraceService that keeps every request it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def running_receiver(port: int) -> Iterator[RecordingReceiver]:
    receiver = RecordingReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None).wait()


@pytest.fixture
def spans() -> tuple[ReadableSpan, ...]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "export-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tidings.test")
    server = tracer.start_as_current_span("/tidings.users.v1.UserService/GetUser", kind=SpanKind.SERVER)
    producer = tracer.start_as_current_span(
        "publish tidings.users.user.created", kind=SpanKind.PRODUCER, attributes={"messaging.system": "nats"}
    )
    with server, producer:
        pass
    provider.shutdown()
    return memory.get_finished_spans()


def _exporter(port: int) -> WireOTLPSpanExporter:
    return WireOTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=10)


def test_wire_exporter_export_succeeds(spans: tuple[ReadableSpan, ...]) -> None:
    port = free_port()
    exporter = _exporter(port)
    with running_receiver(port):
        result = exporter.export(spans)
    exporter.shutdown()

    assert result is SpanExportResult.SUCCESS


def test_wire_exporter_request_matches_sdk_encoder(spans: tuple[ReadableSpan, ...]) -> None:
    port = free_port()
    exporter = _exporter(port)
    with running_receiver(port) as receiver:
        exporter.export(spans)
    exporter.shutdown()

    assert receiver.requests == [encode_spans(spans)]


def test_wire_exporter_keeps_stub_after_new_channel(spans: tuple[ReadableSpan, ...]) -> None:
    # On UNAVAILABLE the OTLP exporter builds a new channel and a new stub from
    # self._stub. With the generated stub back in place, the bytes from
    # _translate_data would fail to serialize and the export would fail.
    port = free_port()
    exporter = _exporter(port)
    exporter._initialize_channel_and_stub()
    with running_receiver(port) as receiver:
        result = exporter.export(spans)
    exporter.shutdown()

    assert result is SpanExportResult.SUCCESS
    assert receiver.requests == [encode_spans(spans)]


def test_wire_exporter_stop_retrying_ends_export(spans: tuple[ReadableSpan, ...]) -> None:
    # Nothing listens on the port, so the export retries with a growing
    # backoff until its 30 s timeout unless stop_retrying() ends the wait.
    exporter = WireOTLPSpanExporter(endpoint=f"http://127.0.0.1:{free_port()}", insecure=True, timeout=30)
    results: list[SpanExportResult] = []
    worker = threading.Thread(target=lambda: results.append(exporter.export(spans)), daemon=True)
    worker.start()

    exporter.stop_retrying()
    worker.join(timeout=10)
    ended = not worker.is_alive()
    exporter.shutdown()
    worker.join()

    assert ended
    assert results == [SpanExportResult.FAILURE]


def test_wire_exporter_exports_after_stop_retrying(spans: tuple[ReadableSpan, ...]) -> None:
    port = free_port()
    exporter = _exporter(port)
    exporter.stop_retrying()
    with running_receiver(port) as receiver:
        result = exporter.export(spans)
    exporter.shutdown()

    assert result is SpanExportResult.SUCCESS
    assert receiver.requests == [encode_spans(spans)]
