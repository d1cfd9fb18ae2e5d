"""One trace from a gRPC call through the outbox, the relay and the consumer."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.runtime.service import Service
from tests.helpers import wait_for
from tidings.notifications.v1 import notification_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

SUBJECT = "tidings.users.user.created"


async def _consumer_span(spans: InMemorySpanExporter):
    return next((s for s in spans.get_finished_spans() if s.name == f"process {SUBJECT}"), None)


async def test_call_publish_and_consume_share_one_trace(
    users: user_service_pb2_grpc.UserServiceStub,
    notifications: notification_service_pb2_grpc.NotificationServiceStub,
    notifications_service: Service,
    spans: InMemorySpanExporter,
) -> None:
    with trace.get_tracer("test").start_as_current_span("test root") as root:
        await users.CreateUser(
            user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email="ada@example.com", display_name="Ada")
            )
        )

    consumer = await wait_for(lambda: _consumer_span(spans))
    finished = spans.get_finished_spans()
    client = next(s for s in finished if s.kind == SpanKind.CLIENT)
    server = next(s for s in finished if s.kind == SpanKind.SERVER)
    producer = next(s for s in finished if s.kind == SpanKind.PRODUCER)
    trace_id = root.get_span_context().trace_id

    assert {client.context.trace_id, server.context.trace_id, producer.context.trace_id,
            consumer.context.trace_id} == {trace_id}
    assert client.parent.span_id == root.get_span_context().span_id
    assert server.parent.span_id == client.context.span_id
    assert producer.parent.span_id == server.context.span_id
    assert consumer.parent.span_id == producer.context.span_id
    assert consumer.links[0].context.span_id == producer.context.span_id


async def test_messaging_spans_follow_conventions(
    users: user_service_pb2_grpc.UserServiceStub,
    notifications_service: Service,
    spans: InMemorySpanExporter,
) -> None:
    await users.CreateUser(
        user_service_pb2.CreateUserRequest(user=user_pb2.User(email="ada@example.com", display_name="Ada"))
    )

    consumer = await wait_for(lambda: _consumer_span(spans))
    producer = next(s for s in spans.get_finished_spans() if s.name == f"publish {SUBJECT}")

    assert producer.kind == SpanKind.PRODUCER
    assert consumer.kind == SpanKind.CONSUMER
    assert producer.attributes["messaging.system"] == "nats"
    assert producer.attributes["messaging.destination.name"] == SUBJECT
    assert consumer.attributes["messaging.destination.name"] == SUBJECT
    assert consumer.attributes["messaging.consumer.group.name"] == "notifications-users"
    assert consumer.attributes["messaging.message.id"] == producer.attributes["messaging.message.id"]
