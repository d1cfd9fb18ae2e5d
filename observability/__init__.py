"""Tracing, trace-context propagation and log setup shared by every Tidings process."""

from observability.logging import configure_logging, redact_url
from observability.propagation import extract_context, inject_context
from observability.tracing import configure_tracing, shutdown_tracing

__all__ = [
    "configure_logging",
    "configure_tracing",
    "extract_context",
    "inject_context",
    "redact_url",
    "shutdown_tracing",
]
