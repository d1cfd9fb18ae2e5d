"""Unit tests of observability/propagation.py against the W3C Trace Context rules.

The table follows https://www.w3.org/TR/trace-context/: ids are lower-case
hex, version ff and all-zero trace or span ids are invalid, version 00 has
exactly four fields, and a parser reads the first four fields of a higher
version and ignores the rest. An invalid header starts a new trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from observability.propagation import extract_context, inject_context

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"


@dataclass(frozen=True)
class Case:
    """One set of headers and the span context a consumer should continue, if any."""

    headers: dict[str, str] | None
    trace_id: str | None = None
    span_id: str | None = None

    @property
    def continues_trace(self) -> bool:
        return self.trace_id is not None


CASES = [
    pytest.param(Case({"traceparent": TRACEPARENT}, TRACE_ID, SPAN_ID), id="valid-lower-case"),
    pytest.param(
        Case(
            {"traceparent": "00-12345678901234567890123456789012-1234567890123456-01"},
            "12345678901234567890123456789012",
            "1234567890123456",
        ),
        id="valid-all-digit-ids",
    ),
    pytest.param(
        Case({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"}, TRACE_ID, SPAN_ID), id="valid-not-sampled"
    ),
    pytest.param(Case({"traceparent": f"00-{TRACE_ID.upper()}-{SPAN_ID.upper()}-01"}), id="upper-case-hex"),
    pytest.param(Case({"traceparent": f"ff-{TRACE_ID}-{SPAN_ID}-01"}), id="version-ff"),
    pytest.param(Case({"traceparent": f"00-{'0' * 32}-{SPAN_ID}-01"}), id="all-zero-trace-id"),
    pytest.param(Case({"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"}), id="all-zero-span-id"),
    pytest.param(Case({"traceparent": f"{TRACEPARENT}-extra"}), id="version-00-extra-field"),
    pytest.param(
        Case({"traceparent": f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-will-be-like"}, TRACE_ID, SPAN_ID),
        id="future-version-extra-fields",
    ),
    pytest.param(Case({}), id="missing-header"),
    pytest.param(Case(None), id="no-headers"),
    pytest.param(Case({"traceparent": ""}), id="empty"),
    pytest.param(Case({"traceparent": "garbage"}), id="garbage"),
    pytest.param(Case({"traceparent": "00-4bf92f35-00f067aa-01"}), id="too-short"),
    pytest.param(Case({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}"}), id="missing-flags"),
    pytest.param(Case({"traceparent": f"00-{TRACE_ID}0-{SPAN_ID}-01"}), id="trace-id-too-long"),
    pytest.param(Case({"traceparent": f"00-{TRACE_ID[:-1]}g-{SPAN_ID}-01"}), id="non-hex-trace-id"),
    pytest.param(Case({"Traceparent": TRACEPARENT}, TRACE_ID, SPAN_ID), id="capitalised-header-name"),
    pytest.param(Case({"TRACEPARENT": TRACEPARENT}, TRACE_ID, SPAN_ID), id="upper-case-header-name"),
]


def _span_context(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


@pytest.mark.parametrize("case", CASES)
def test_extract_traceparent_table(case: Case) -> None:
    context = extract_context(case.headers)

    span_context = _span_context(context)
    assert span_context.is_valid is case.continues_trace
    if case.continues_trace:
        assert format(span_context.trace_id, "032x") == case.trace_id
        assert format(span_context.span_id, "016x") == case.span_id
        assert span_context.is_remote


def test_extract_sampled_flag_kept() -> None:
    context = extract_context({"traceparent": TRACEPARENT})

    assert _span_context(context).trace_flags.sampled


def test_extract_unsampled_flag_kept() -> None:
    context = extract_context({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"})

    assert not _span_context(context).trace_flags.sampled


def test_extract_tracestate_order_kept() -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "a=1,b=2"}

    context = extract_context(headers)

    assert list(_span_context(context).trace_state.items()) == [("a", "1"), ("b", "2")]


def test_extract_tracestate_capitalised_name() -> None:
    headers = {"traceparent": TRACEPARENT, "Tracestate": "vendor=abc"}

    context = extract_context(headers)

    assert _span_context(context).trace_state.get("vendor") == "abc"


def test_extract_tracestate_without_traceparent_ignored() -> None:
    context = extract_context({"tracestate": "a=1"})

    assert not _span_context(context).is_valid


def test_extract_baggage_read() -> None:
    headers = {"traceparent": TRACEPARENT, "baggage": "tenant=acme,user_id=42"}

    context = extract_context(headers)

    assert baggage.get_all(context) == {"tenant": "acme", "user_id": "42"}


def _remote_context(trace_state: TraceState | None = None) -> Context:
    span_context = SpanContext(
        trace_id=int(TRACE_ID, 16),
        span_id=int(SPAN_ID, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=trace_state,
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def test_inject_writes_traceparent() -> None:
    headers: dict[str, str] = {}

    inject_context(headers, _remote_context())

    assert headers == {"traceparent": TRACEPARENT}


def test_inject_writes_tracestate_when_set() -> None:
    headers: dict[str, str] = {}

    inject_context(headers, _remote_context(TraceState([("a", "1"), ("b", "2")])))

    assert headers["tracestate"] == "a=1,b=2"


def test_inject_writes_baggage_when_set() -> None:
    context = baggage.set_baggage("tenant", "acme", context=_remote_context())
    headers: dict[str, str] = {}

    inject_context(headers, context)

    assert headers["baggage"] == "tenant=acme"


def test_inject_without_span_writes_nothing() -> None:
    headers: dict[str, str] = {}

    inject_context(headers, Context())

    assert headers == {}


def test_inject_defaults_to_current_span() -> None:
    tracer = trace.get_tracer("tests.unit.propagation")
    headers: dict[str, str] = {}

    with tracer.start_as_current_span("publish") as span:
        inject_context(headers)

    expected_trace_id = format(span.get_span_context().trace_id, "032x")
    assert headers["traceparent"].split("-")[1] == expected_trace_id


def test_inject_then_extract_round_trip() -> None:
    source = _remote_context(TraceState([("vendor", "abc")]))
    headers: dict[str, str] = {}
    inject_context(headers, source)

    extracted = extract_context(headers)

    assert _span_context(extracted) == _span_context(source)
