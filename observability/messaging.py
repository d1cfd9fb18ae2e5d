"""Spans for NATS messaging, named and attributed per the OpenTelemetry messaging conventions.

Span names are ``<operation> <destination>``: ``publish tidings.users.user.created``
for the PRODUCER span of the relay and ``process tidings.users.user.created``
for the CONSUMER span of a handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from observability.propagation import extract_context

tracer = trace.get_tracer(__name__)


def start_producer_span(
    *, subject: str, event_id: str, event_type: str, aggregate_id: str, parent_headers: Mapping[str, str]
) -> Span:
    """Start the PRODUCER span of one publish, as a child of the context in parent_headers."""
    return tracer.start_span(
        f"publish {subject}",
        context=extract_context(parent_headers),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": subject,
            "messaging.message.id": event_id,
            "cloudevents.event_id": event_id,
            "cloudevents.event_type": event_type,
            "cloudevents.event_subject": aggregate_id,
        },
    )


def consumer_span(
    *,
    subject: str,
    headers: Mapping[str, str] | None,
    consumer: str,
    event_id: str,
    event_type: str,
    aggregate_id: str,
    delivery_count: int,
) -> Any:
    """Return a context manager for the CONSUMER span of one handled message.

    The span continues the producer's trace (its parent is the PRODUCER span
    named in the message's ``traceparent``) and also links to it.
    """
    parent = extract_context(headers)
    producer = trace.get_current_span(parent).get_span_context()
    return tracer.start_as_current_span(
        f"process {subject}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=[Link(producer)] if producer.is_valid else None,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": event_id,
            "messaging.message.delivery_count": delivery_count,
            "cloudevents.event_id": event_id,
            "cloudevents.event_type": event_type,
            "cloudevents.event_subject": aggregate_id,
        },
        record_exception=False,
        set_status_on_exception=False,
    )


def mark_failed(span: Span, error: BaseException) -> None:
    """Record error on span and set its status to ERROR."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
