"""gRPC client channels with tracing: every call gets a CLIENT span and a traceparent."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors


def traced_channel(address: str) -> grpc.aio.Channel:
    """Open an insecure grpc.aio channel to address whose calls carry the current trace."""
    return grpc.aio.insecure_channel(address, interceptors=aio_client_interceptors())
