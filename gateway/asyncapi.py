"""The AsyncAPI 3.0 document of the domain events, one channel per event message.

A message is an event when its proto declares ``option
(tidings.events.v1.subject)``; the option's value is the channel address.
Payload schemas come from the same builder as the OpenAPI document
(gateway/schemas.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from google.protobuf.descriptor import Descriptor

from gateway.schemas import JSONObject, SchemaBuilder
from services.runtime.events import CONTENT_TYPE, MSG_ID_HEADER, SCHEMA_PREFIX, SPEC_VERSION
from services.runtime.streams import ALL_STREAMS
from tidings.events.v1 import options_pb2
from tidings.inventory.v1 import inventory_events_pb2
from tidings.orders.v1 import order_events_pb2
from tidings.payments.v1 import payment_events_pb2
from tidings.users.v1 import user_events_pb2

ASYNCAPI_VERSION = "3.0.0"

# The generated modules whose messages are all events.
EVENT_MODULES: tuple[ModuleType, ...] = (
    user_events_pb2,
    order_events_pb2,
    inventory_events_pb2,
    payment_events_pb2,
)

SERVER_NAME = "nats"

# CloudEvents headers that services.runtime.events.cloudevent_headers sets on
# every event; the trace headers depend on the tracer and may be absent.
_REQUIRED_HEADERS = (
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-specversion",
    "ce-time",
    "ce-subject",
    "ce-dataschema",
    "content-type",
    MSG_ID_HEADER,
)


def event_subject(message: Descriptor) -> str:
    """Return the NATS subject of an event message, from its ``(tidings.events.v1.subject)`` option.

    Raises:
        ValueError: The message does not declare the option.
    """
    options = message.GetOptions()
    if not options.HasExtension(options_pb2.subject):
        raise ValueError(
            f"event message {message.full_name} has no subject; add "
            'option (tidings.events.v1.subject) = "tidings.<context>.<entity>.<verb>"; to it'
        )
    subject: str = options.Extensions[options_pb2.subject]
    return subject


def event_messages() -> list[Descriptor]:
    """Return the descriptor of every top-level message in EVENT_MODULES, in file order."""
    return [
        message
        for module in EVENT_MODULES
        for message in module.DESCRIPTOR.message_types_by_name.values()
    ]


def _description(stream_names: str) -> str:
    return (
        "Domain events of Tidings on NATS JetStream, in CloudEvents 1.0 binary content mode: the "
        "CloudEvents attributes travel as `ce-*` headers and the body is the event.\n\n"
        "Payloads are protobuf on the wire (`content-type: application/protobuf`); `ce-type` and "
        "`ce-dataschema` name the message. Each payload schema here describes the proto3 JSON form "
        "of that message, not its wire encoding. The gateway's `GET /v1/events` stream delivers events "
        "in that JSON form, as the `data` of CloudEvents JSON.\n\n"
        f"JetStream streams: {stream_names}."
    )


def build_asyncapi(comments: Mapping[str, str] | None = None) -> JSONObject:
    """Build the AsyncAPI 3.0 document of every event message in EVENT_MODULES.

    Args:
        comments: Proto source comments by full name, from
            ``gateway.schemas.load_proto_comments``; without them the
            document has no descriptions.

    Raises:
        ValueError: An event message has no subject, or two share one.
    """
    builder = SchemaBuilder(comments)
    channels: dict[str, JSONObject] = {}
    operations: dict[str, JSONObject] = {}
    messages: dict[str, JSONObject] = {}

    for descriptor in event_messages():
        subject = event_subject(descriptor)
        if subject in channels:
            raise ValueError(f"{descriptor.full_name} and another event both use the subject {subject!r}")
        full_name = descriptor.full_name
        comment = builder.comment(full_name)

        messages[full_name] = _message(builder, descriptor, comment)
        channel: JSONObject = {
            "address": subject,
            "messages": {descriptor.name: {"$ref": f"#/components/messages/{full_name}"}},
            "servers": [{"$ref": f"#/servers/{SERVER_NAME}"}],
        }
        if comment:
            channel["description"] = comment
        channels[subject] = channel

        operation_id = f"receive{descriptor.name}"
        if operation_id in operations:
            raise ValueError(f"two event messages are named {descriptor.name}; operation ids would clash")
        operations[operation_id] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{subject}"},
            "messages": [{"$ref": f"#/channels/{subject}/messages/{descriptor.name}"}],
            "summary": f"Receive {descriptor.name} events.",
        }

    stream_names = ", ".join(f"{stream.name} over {', '.join(stream.subjects)}" for stream in ALL_STREAMS)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": "Tidings events", "version": "v1", "description": _description(stream_names)},
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            SERVER_NAME: {
                "host": "localhost:4222",
                "protocol": "nats",
                "description": "Placeholder: the NATS server or cluster the services use (NATS_URL).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": builder.schemas},
    }


def _message(builder: SchemaBuilder, descriptor: Descriptor, comment: str | None) -> JSONObject:
    message: JSONObject = {
        "name": descriptor.name,
        "title": descriptor.full_name,
        "contentType": CONTENT_TYPE,
        "headers": _headers_schema(descriptor.full_name),
        "payload": builder.message_schema(descriptor),
    }
    if comment:
        message["description"] = comment
    return message


def _headers_schema(full_name: str) -> JSONObject:
    """Return the schema of the NATS headers of an event whose message has full_name."""
    properties: dict[str, JSONObject] = {
        "ce-id": {"type": "string", "description": "Event id, a UUID; the same for every redelivery."},
        "ce-source": {
            "type": "string",
            "description": "Publishing service as `/tidings/<service>`, such as `/tidings/users`.",
        },
        "ce-type": {"type": "string", "const": full_name, "description": "Full name of the proto message."},
        "ce-specversion": {"type": "string", "const": SPEC_VERSION},
        "ce-time": {"type": "string", "format": "date-time", "description": "When the change happened, UTC."},
        "ce-subject": {
            "type": "string",
            "description": "Id of the entity the event is about, such as a user or order id.",
        },
        "ce-dataschema": {"type": "string", "const": SCHEMA_PREFIX + full_name},
        "content-type": {"type": "string", "const": CONTENT_TYPE},
        MSG_ID_HEADER: {
            "type": "string",
            "description": "Equal to ce-id, so that JetStream drops a repeated publish of the same event.",
        },
        "traceparent": {"type": "string", "description": "W3C Trace Context of the publishing span."},
        "tracestate": {"type": "string", "description": "W3C Trace Context vendor state."},
        "baggage": {"type": "string", "description": "W3C Baggage, when the publishing context has any."},
    }
    return {"type": "object", "properties": properties, "required": list(_REQUIRED_HEADERS)}
