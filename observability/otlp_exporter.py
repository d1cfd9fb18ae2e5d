"""The OTLP/gRPC span exporter with the request written by observability.otlp_wire.

Everything except the encoding is opentelemetry-exporter-otlp-proto-grpc's
OTLPSpanExporter: the OTEL_EXPORTER_OTLP_* settings, TLS, headers,
compression, retries with backoff and reconnection. The subclass swaps the
message encoder for the wire encoder and the generated stub for one that
sends those bytes unchanged.

It relies on two internals of that exporter (``_translate_data`` and the
``_stub`` that the exporter calls again when it reconnects), so
``tests/integration/test_otlp_export.py`` exports through it to a real
OTLP receiver.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan

from observability.otlp_wire import encode_export_request

_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _unchanged(request: bytes) -> bytes:
    return request


class _EncodedTraceServiceStub:
    """TraceService client whose Export takes the request as serialized bytes."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=_unchanged,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class WireOTLPSpanExporter(OTLPSpanExporter):
    """OTLPSpanExporter that writes each request's protobuf bytes directly."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stub = _EncodedTraceServiceStub
        self._client = self._stub(self._channel)

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        return encode_export_request(data)

    def stop_retrying(self) -> None:
        """End the backoff of an export that is retrying now, and make later failed exports give up at once.

        The exporter's own shutdown() does the same but also refuses every
        later export, so the process could no longer send its last spans.
        """
        self._shutdown_in_progress.set()
