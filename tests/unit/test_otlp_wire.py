"""The wire encoder of OTLP export requests against the OpenTelemetry SDK's own encoder.

Each test makes real SDK spans, encodes them both ways and compares the
decoded messages, so any difference in a field shows up as a failed assert.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from observability.otlp_wire import encode_export_request


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "wire-test", "replica": 2}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _decoded(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encode_export_request(spans))


def _remote_parent(trace_state: TraceState | None = None) -> SpanContext:
    return SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace_state,
    )


def test_wire_encoder_server_span_matches_sdk(recorded: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("tidings.test", "1.2.3")
    with tracer.start_as_current_span("/tidings.users.v1.UserService/CreateUser", kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 0}):
        pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_remote_parent_and_trace_state(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    trace_state = TraceState([("vendor", "abc"), ("b", "1")])
    parent = set_span_in_context(NonRecordingSpan(_remote_parent(trace_state)))
    tracer = provider.get_tracer("tidings.test")
    with tracer.start_as_current_span("process tidings.users.user.created", context=parent,
                                      kind=SpanKind.CONSUMER):
        pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_links_events_status(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("tidings.test")
    link = Link(_remote_parent(), attributes={"link.reason": "producer"})
    with tracer.start_as_current_span("handle", kind=SpanKind.PRODUCER, links=[link],
                                      record_exception=False, set_status_on_exception=False) as span:
        span.add_event("retry", {"attempt": 2})
        span.record_exception(ValueError("stock is negative"))
        span.set_status(Status(StatusCode.ERROR, "ValueError"))

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


@pytest.mark.parametrize(
    "value",
    [
        "text",
        "",
        "żółć",
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        1.5,
        float("-inf"),
        b"\x00\xff",
        ("a", "b"),
        [1, 2, 3],
        [True, False],
        [0.5, -2.0],
        [],
    ],
    ids=repr,
)
def test_wire_encoder_attribute_value_types(
    recorded: tuple[TracerProvider, InMemorySpanExporter], value: object
) -> None:
    provider, exporter = recorded
    with provider.get_tracer("tidings.test").start_as_current_span("typed", attributes={"value": value}):
        pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_repeated_attributes_hit_cache(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("tidings.test")
    for index in range(3):
        with tracer.start_as_current_span("same", attributes={"messaging.system": "nats", "index": index}):
            pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_groups_resources_and_scopes(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    other_resource = Resource.create(
        {"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.26.0"
    )
    other = TracerProvider(resource=other_resource)
    other.add_span_processor(SimpleSpanProcessor(exporter))
    first = provider.get_tracer("tidings.first", schema_url="https://opentelemetry.io/schemas/1.21.0")
    second = provider.get_tracer("tidings.second", "0.1", attributes={"scope.kind": "test"})
    for tracer in (first, second, other.get_tracer("tidings.other"), first):
        with tracer.start_as_current_span("grouped"):
            pass
    other.shutdown()

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_empty_batch_is_empty_request() -> None:
    assert encode_export_request([]) == b""


def test_wire_encoder_negative_zero_after_zero(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("tidings.test")
    for value in (0.0, -0.0):
        with tracer.start_as_current_span("signed", attributes={"x": value}):
            pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_long_string_repeated(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("tidings.test")
    for _ in range(2):
        with tracer.start_as_current_span("long", attributes={"exception.stacktrace": "frame\n" * 200}):
            pass

    spans = exporter.get_finished_spans()
    assert _decoded(spans) == encode_spans(spans)


def test_wire_encoder_resource_attribute_order(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    _, exporter = recorded
    providers = [
        TracerProvider(resource=Resource({"a": "1", "b": "2"})),
        TracerProvider(resource=Resource({"b": "2", "a": "1"})),
    ]
    for provider in providers:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("tidings.test").start_as_current_span("ordered"):
            pass
    spans = exporter.get_finished_spans()
    for provider in providers:
        provider.shutdown()

    assert len(spans) == 2
    for span in spans:
        assert _decoded([span]) == encode_spans([span])


def test_wire_encoder_scope_attribute_types(
    recorded: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    # Scopes with {"a": 1} and {"a": True} are equal and hash alike in the SDK.
    provider, exporter = recorded
    for value in (1, True):
        with provider.get_tracer("tidings.typed", "1", attributes={"a": value}).start_as_current_span("s"):
            pass

    for span in exporter.get_finished_spans():
        assert _decoded([span]) == encode_spans([span])
