"""Tracing set-up: OTEL_SDK_DISABLED as the OpenTelemetry SDK reads it, and the bounded exit."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from observability.tracing import _OutageReportingExporter, tracing_disabled


@pytest.mark.parametrize("value", ["true", "TRUE", " true "])
def test_tracing_disabled_true_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)

    assert tracing_disabled() is True


@pytest.mark.parametrize("value", ["false", "", "1", "yes"])
def test_tracing_disabled_other_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)

    assert tracing_disabled() is False


def test_tracing_disabled_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)

    assert tracing_disabled() is False


class _RetryingExporter(SpanExporter):
    """Exporter that records whether stop_retrying() was called."""

    def __init__(self) -> None:
        self.stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def stop_retrying(self) -> None:
        self.stopped = True


def test_begin_shutdown_stops_retries() -> None:
    inner = _RetryingExporter()
    exporter = _OutageReportingExporter(inner, "http://127.0.0.1:4317")

    exporter.begin_shutdown()

    assert inner.stopped is True


def test_begin_shutdown_without_stop_retrying() -> None:
    exporter = _OutageReportingExporter(InMemorySpanExporter(), "http://127.0.0.1:4317")

    exporter.begin_shutdown()

    assert exporter.export([]) is SpanExportResult.SUCCESS
