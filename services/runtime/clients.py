"""gRPC client channels with tracing: every call gets a CLIENT span and a traceparent."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors


def traced_channel(address: str) -> grpc.aio.Channel:
    """Open an insecure grpc.aio channel to address whose calls carry the current trace."""
    return grpc.aio.insecure_channel(address, interceptors=aio_client_interceptors())


def outgoing_timeout(context: grpc.aio.ServicerContext, default: float) -> float:
    """Return the timeout for a call made while serving context.

    It is the caller's remaining deadline when that is shorter than default,
    so a downstream call never outlives the request that caused it.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, min(default, remaining))
