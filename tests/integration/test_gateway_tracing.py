"""The trace of a gateway request starts at the HTTP server span and reaches the services."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.runtime.config import Settings
from tests.helpers import wait_for
from tests.integration.gateway_fixtures import Api, gateway_settings, running_gateway, running_system

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running_system(settings, ["users"]), running_gateway(settings, gateway_settings()) as front:
        yield front[1]


async def server_span_of(spans: InMemorySpanExporter, name: str):  # type: ignore[no-untyped-def]
    async def found():  # type: ignore[no-untyped-def]
        return next((s for s in spans.get_finished_spans() if s.name == name), None)

    return await wait_for(found)


async def test_gateway_span_continues_a_valid_client_traceparent(
    api: Api, spans: InMemorySpanExporter
) -> None:
    await api.call("GET", "/v1/users", headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"})

    span = await server_span_of(spans, "GET /v1/users")

    assert format(span.context.trace_id, "032x") == CLIENT_TRACE_ID


async def test_gateway_span_is_client_span_child(api: Api, spans: InMemorySpanExporter) -> None:
    await api.call("GET", "/v1/users", headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"})

    span = await server_span_of(spans, "GET /v1/users")

    assert format(span.parent.span_id, "016x") == CLIENT_SPAN_ID


async def test_gateway_invalid_traceparent_starts_a_new_trace(api: Api, spans: InMemorySpanExporter) -> None:
    await api.call("GET", "/v1/users", headers={"traceparent": "00-not-a-trace-01"})

    span = await server_span_of(spans, "GET /v1/users")

    assert span.parent is None


async def test_gateway_span_names_the_route_template(api: Api, spans: InMemorySpanExporter) -> None:
    await api.call("GET", "/v1/users/0b7c3e2a-0000-4000-8000-000000000000")

    span = await server_span_of(spans, "GET /v1/users/{id}")

    assert span.attributes["http.route"] == "/v1/users/{id}"


async def test_gateway_service_span_joins_the_http_trace(api: Api, spans: InMemorySpanExporter) -> None:
    await api.call("GET", "/v1/users", headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"})

    async def service_span():  # type: ignore[no-untyped-def]
        return next(
            (s for s in spans.get_finished_spans()
             if s.kind == SpanKind.SERVER and (s.attributes or {}).get("rpc.method") == "ListUsers"),
            None,
        )

    span = await wait_for(service_span)
    assert format(span.context.trace_id, "032x") == CLIENT_TRACE_ID


async def test_gateway_returns_the_traceparent_of_its_span(api: Api, spans: InMemorySpanExporter) -> None:
    _, _, headers = await api.call("GET", "/v1/users")

    span = await server_span_of(spans, "GET /v1/users")

    assert headers["traceparent"].split("-")[1] == format(span.context.trace_id, "032x")
