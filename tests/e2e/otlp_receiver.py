"""OTLP/gRPC trace receiver for end-to-end tests: service processes export their spans to it.

The receiver runs a plain gRPC server on a free loopback port in its own
threads, so it keeps receiving while the test's event loop waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan


@dataclass(frozen=True)
class CollectedSpan:
    """One finished span, from the OTLP receiver or from this test process.

    Attributes:
        service: ``service.name`` of the span's resource, or ``test`` for spans of this process.
        linked_span_ids: Span ids of the span's links, in hex.
        start_time_ns: Start time in nanoseconds since the epoch.
    """

    service: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    attributes: dict[str, Any]
    linked_span_ids: tuple[str, ...] = ()
    start_time_ns: int = 0

    def describe(self) -> str:
        return f"{self.service} {self.kind} {self.name!r} span {self.span_id} parent {self.parent_span_id}"


class OtlpTraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC trace endpoint that keeps every span it receives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[CollectedSpan] = []
        self.port = 0

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        CollectedSpan(
                            service=service,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex() or None,
                            name=span.name,
                            kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            attributes=_attributes(span.attributes),
                            linked_span_ids=tuple(link.span_id.hex() for link in span.links),
                            start_time_ns=span.start_time_unix_nano,
                        )
                    )
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans_of_trace(self, trace_id: str) -> list[CollectedSpan]:
        with self._lock:
            return [span for span in self._spans if span.trace_id == trace_id]

    def all_spans(self) -> list[CollectedSpan]:
        with self._lock:
            return list(self._spans)


@contextmanager
def serve_otlp_receiver() -> Iterator[OtlpTraceReceiver]:
    """Serve an OtlpTraceReceiver on a free 127.0.0.1 port until the block exits."""
    receiver = OtlpTraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None)


def _attributes(key_values: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key_value in key_values:
        value: common_pb2.AnyValue = key_value.value
        kind = value.WhichOneof("value")
        result[key_value.key] = getattr(value, kind) if kind else None
    return result


def from_sdk_span(span: ReadableSpan) -> CollectedSpan:
    """Convert a span of this test process (from the in-memory exporter) to a CollectedSpan."""
    context = span.get_span_context()
    assert context is not None
    return CollectedSpan(
        service="test",
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        parent_span_id=format(span.parent.span_id, "016x") if span.parent else None,
        name=span.name,
        kind=span.kind.name,
        attributes=dict(span.attributes or {}),
        linked_span_ids=tuple(format(link.context.span_id, "016x") for link in span.links),
        start_time_ns=span.start_time or 0,
    )
