"""Tracer provider setup: OTLP export configured by the standard OTEL_* variables.

With no collector listening, spans are dropped and one warning is logged per
outage. Calls and events are not slowed, because export runs in the batch
processor's background thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)

# Seconds the last export at process exit may take.
CLOSING_EXPORT_TIMEOUT = 2.0

_exporters: list[_OutageReportingExporter] = []


class _OutageReportingExporter(SpanExporter):
    """Wrap an exporter so that a failing collector is logged once, not per batch."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._failing = False
        self._closing = False
        self._lock = threading.Lock()

    def begin_shutdown(self) -> None:
        """Bound the final export: skip it during an outage, else give it CLOSING_EXPORT_TIMEOUT.

        An export that is waiting to retry an unreachable collector stops
        waiting, so that it does not hold up the exit for its whole backoff.
        """
        self._closing = True
        stop_retrying = getattr(self._inner, "stop_retrying", None)
        if stop_retrying is not None:
            stop_retrying()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closing:
            return self._export_before_exit(spans)
        result = self._inner.export(spans)
        with self._lock:
            if result is SpanExportResult.FAILURE and not self._failing:
                self._failing = True
                logger.warning(
                    "trace export failed; spans are dropped until the collector is reachable",
                    extra={"otlp_endpoint": self._endpoint},
                )
            elif result is SpanExportResult.SUCCESS and self._failing:
                self._failing = False
                logger.info("trace export recovered", extra={"otlp_endpoint": self._endpoint})
        return result

    def _export_before_exit(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # The OTLP exporter retries an unreachable collector for up to its
        # timeout (10 s by default), which would hold up every process exit.
        if self._failing:
            return SpanExportResult.FAILURE
        results: list[SpanExportResult] = []
        worker = threading.Thread(target=lambda: results.append(self._inner.export(spans)), daemon=True)
        worker.start()
        worker.join(CLOSING_EXPORT_TIMEOUT)
        if not results:
            logger.warning(
                "final trace export timed out; its spans are dropped",
                extra={"otlp_endpoint": self._endpoint, "spans": len(spans)},
            )
            return SpanExportResult.FAILURE
        return results[0]

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def tracing_disabled() -> bool:
    """Return whether ``OTEL_SDK_DISABLED`` turns the OpenTelemetry SDK off for this process."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def configure_tracing(service: str) -> TracerProvider | None:
    """Install the global tracer provider for this process.

    Honors ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER`` (``otlp`` or
    ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES`` and the ``OTEL_BSP_*`` batch settings.

    Args:
        service: Default ``service.name`` when ``OTEL_SERVICE_NAME`` is unset.

    Returns:
        The installed provider, or None when the SDK is disabled.
    """
    if tracing_disabled():
        return None

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)

    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name == "otlp":
        # Imported here so that processes with export off skip loading gRPC stubs.
        from observability.otlp_exporter import WireOTLPSpanExporter

        endpoint = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317"),
        )
        exporter = _OutageReportingExporter(WireOTLPSpanExporter(), endpoint)
        _exporters.append(exporter)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif exporter_name != "none":
        raise ValueError(
            f"invalid OTEL_TRACES_EXPORTER={exporter_name!r}: Tidings supports 'otlp' or 'none'"
        )

    trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Flush and stop span export; call once at process exit."""
    for exporter in _exporters:
        exporter.begin_shutdown()
    if provider is not None:
        provider.shutdown()
