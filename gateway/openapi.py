"""The OpenAPI 3.1 document of the HTTP API, built from the google.api.http rules.

Every RPC with a rule becomes one operation: path variables become path
parameters, the rule's ``body`` becomes the request body, and the request
fields left over become query parameters. Schemas follow the proto3 JSON
mapping (gateway/schemas.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.rpc import status_pb2

from gateway.routes import EVENTS_PATH, EVENTS_SCOPE, required_scope
from gateway.schemas import SCHEMA_REF_PREFIX, JSONObject, SchemaBuilder, is_scalar_well_known
from tidings.inventory.v1 import inventory_service_pb2
from tidings.notifications.v1 import notification_service_pb2
from tidings.orders.v1 import order_service_pb2
from tidings.payments.v1 import payment_service_pb2
from tidings.users.v1 import user_service_pb2

OPENAPI_VERSION = "3.1.0"

# The generated modules whose services the document describes.
SERVICE_MODULES: tuple[ModuleType, ...] = (
    user_service_pb2,
    order_service_pb2,
    inventory_service_pb2,
    payment_service_pb2,
    notification_service_pb2,
)

BEARER_SCHEME = "bearerAuth"
JSON_CONTENT_TYPE = "application/json"

_HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_VARIABLE = re.compile(r"^\{(?P<field>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:=\*)?\}$")

_DESCRIPTION = """\
The HTTP/JSON API of Tidings. Each operation calls one gRPC method through \
the gateway, and its operation id is `<Service>_<Method>`.

Bodies and responses use the proto3 JSON mapping: lowerCamelCase field names, \
64-bit integers as strings, enums as value names, timestamps in RFC 3339. \
Request bodies also accept the original proto field names (`display_name`), \
as that mapping requires, but the schemas list only the lowerCamelCase ones. \
Unknown fields are rejected with 400.

With authentication on, the gateway's default, every operation needs a bearer \
JWT whose scopes include the one its security requirement lists: \
`<context>:read` for methods without side effects and `<context>:write` for \
the rest. Errors are `google.rpc.Status` objects."""

_BEARER_DESCRIPTION = (
    "A JWT sent as `Authorization: Bearer <token>`. Its scopes come from the `scope` claim "
    "(space-separated) and the `scp` claim; an invalid token gets 401, a missing scope 403."
)

_STATUS_DESCRIPTION = (
    "Error body of every failed call: a google.rpc.Code number, a developer-facing message, and "
    "details such as google.rpc.ErrorInfo (with a `reason`) and google.rpc.BadRequest field violations."
)

# NOTE: the /v1/events description below restates the behaviour of
# gateway/events.py by hand, so a change there must be copied here.
_EVENTS_DESCRIPTION = (
    "Streams domain events as server-sent events until the client or the gateway ends the stream. Each "
    "event has "
    "`id:` set to its JetStream stream sequence and `data:` set to the event in the CloudEvents JSON "
    "format, whose `data` member is the protobuf message in proto3 JSON. An event the gateway cannot "
    "decode carries `data_base64` and datacontenttype `application/protobuf` instead. Lines that start "
    "with `:` are SSE comments. The AsyncAPI document describes each event type.\n\n"
    "To resume, send the id of the last event received in the `Last-Event-ID` header (browsers do this "
    "when they reconnect) or the `last_event_id` parameter. The header wins."
)
_SEQUENCE_SCHEMA: JSONObject = {"type": "string", "pattern": "^[0-9]{1,20}$"}


def http_rules(method: MethodDescriptor) -> list[http_pb2.HttpRule]:
    """Return the google.api.http rule of method followed by its additional bindings; empty without one."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule = options.Extensions[annotations_pb2.http]
    return [rule, *rule.additional_bindings]


def openapi_path(template: str) -> tuple[str, list[str]]:
    """Convert a google.api.http path template to an OpenAPI path and its variables' field paths.

    ``/v1/users/{user.id}`` becomes ``/v1/users/{user.id}`` with
    ``["user.id"]``; a custom verb such as ``:cancel`` stays literal text.
    A variable may be ``{field}`` or ``{field=*}``.

    Raises:
        ValueError: The template does not start with ``/``, has a wildcard
            outside a variable, or a variable matches more than one segment
            (``{name=shelves/*}``), which an OpenAPI path parameter cannot.
    """
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with /")

    # The custom verb is a ':' after the last '/' outside braces.
    verb = ""
    last_slash = template.rfind("/")
    colon = template.find(":", last_slash)
    if colon != -1 and "}" not in template[colon:]:
        template, verb = template[:colon], template[colon:]

    segments: list[str] = []
    fields: list[str] = []
    for segment in template[1:].split("/"):
        match = _VARIABLE.match(segment)
        if match is not None:
            fields.append(match.group("field"))
            segments.append("{" + match.group("field") + "}")
        elif any(character in segment for character in "{}*=") or not segment:
            raise ValueError(
                f"path segment {segment!r} of {template + verb!r} is not supported; "
                "use literal text, {field} or {field=*}"
            )
        else:
            segments.append(segment)
    return "/" + "/".join(segments) + verb, fields


def build_openapi(comments: Mapping[str, str] | None = None) -> JSONObject:
    """Build the OpenAPI 3.1 document of every RPC in SERVICE_MODULES that has a google.api.http rule.

    Args:
        comments: Proto source comments by full name, from
            ``gateway.schemas.load_proto_comments``; without them the
            document has no descriptions or summaries.

    Raises:
        ValueError: A rule cannot be described: an unknown field, an
            unsupported path template or method, a field type that no
            query parameter can carry, or two rules with the same method
            and path.
    """
    builder = SchemaBuilder(comments)
    tags: list[JSONObject] = []
    bindings: list[_Binding] = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            tags.append(_tag(service.name, builder.comment(service.full_name)))
            for method in service.methods:
                for index, rule in enumerate(http_rules(method)):
                    http_method, template = _method_and_template(rule, method)
                    path, fields = openapi_path(template)
                    operation_id = f"{service.name}_{method.name}" + (f"_{index}" if index else "")
                    bindings.append(_Binding(method, rule, operation_id, http_method, path, fields))

    canonical_paths = _canonical_paths([binding.path for binding in bindings])
    paths: dict[str, dict[str, JSONObject]] = {}
    for binding in bindings:
        path = canonical_paths[binding.path]
        if binding.http_method in paths.get(path, {}):
            raise ValueError(
                f"{binding.method.full_name}: another rule already has {binding.http_method} {path}"
            )
        paths.setdefault(path, {})[binding.http_method] = _operation(builder, binding, _variables(path))

    if EVENTS_PATH in paths:
        raise ValueError(f"an RPC rule claims {EVENTS_PATH}, which the gateway serves itself")
    paths[EVENTS_PATH] = {"get": _events_operation()}
    tags.append(_tag("Events", "Live domain events over server-sent events."))

    builder.message_schema(status_pb2.Status.DESCRIPTOR)
    builder.schemas[status_pb2.Status.DESCRIPTOR.full_name]["description"] = _STATUS_DESCRIPTION
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Tidings HTTP API", "version": "v1", "description": _DESCRIPTION},
        "servers": [{"url": "http://localhost:8080", "description": "A local gateway on its default port."}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": builder.schemas,
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": _BEARER_DESCRIPTION,
                }
            },
        },
    }


def _tag(name: str, description: str | None) -> JSONObject:
    tag: JSONObject = {"name": name}
    if description:
        tag["description"] = description
    return tag


@dataclass(frozen=True)
class _Binding:
    """One google.api.http rule (the main one or an additional binding) of a method."""

    method: MethodDescriptor
    rule: http_pb2.HttpRule
    operation_id: str
    http_method: str
    path: str
    fields: list[str]


def _variables(path: str) -> list[str]:
    return re.findall(r"\{([^}]+)\}", path)


def _canonical_paths(paths: list[str]) -> dict[str, str]:
    """Map each path to the one OpenAPI path that stands for every path of the same shape.

    OpenAPI treats templated paths that differ only in variable names as the
    same path and forbids listing both, so ``/v1/users/{id}`` and
    ``/v1/users/{user.id}`` must share one spelling. The spelling with the
    fewest dotted names wins, then the alphabetically first, so the choice
    does not depend on the order of the methods.
    """
    by_shape: dict[str, list[str]] = {}
    for path in paths:
        by_shape.setdefault(re.sub(r"\{[^}]+\}", "{}", path), []).append(path)
    canonical: dict[str, str] = {}
    for spellings in by_shape.values():
        chosen = min(spellings, key=lambda spelling: (spelling.count("."), spelling))
        canonical.update(dict.fromkeys(spellings, chosen))
    return canonical


def _method_and_template(rule: http_pb2.HttpRule, method: MethodDescriptor) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern not in _HTTP_METHODS:
        raise ValueError(
            f"{method.full_name}: http rule pattern {pattern!r} is not supported; "
            f"use one of {', '.join(_HTTP_METHODS)}"
        )
    return pattern, getattr(rule, pattern)


def _resolve_field(message: Descriptor, field_path: str, method: MethodDescriptor) -> FieldDescriptor:
    """Return the field that a dotted field path such as ``user.id`` names in message."""
    descriptor: Descriptor | None = message
    field: FieldDescriptor | None = None
    for name in field_path.split("."):
        field = descriptor.fields_by_name.get(name) if descriptor is not None else None
        if field is None or field.is_repeated:
            raise ValueError(
                f"{method.full_name}: {field_path!r} names no singular field of {message.full_name}"
            )
        descriptor = field.message_type
    assert field is not None  # field_path.split always yields at least one name
    return field


def _summary(comment: str) -> str:
    """Return the first sentence of a comment, without its full stop."""
    first = comment.split("\n\n", 1)[0].split(". ", 1)[0]
    return first.removesuffix(".")


def _operation(builder: SchemaBuilder, binding: _Binding, parameter_names: list[str]) -> JSONObject:
    """Return the operation object of one rule; parameter_names name its path variables in order."""
    method, rule, path_fields = binding.method, binding.rule, binding.fields
    if method.client_streaming or method.server_streaming:
        raise ValueError(f"{method.full_name}: streaming methods have no HTTP/JSON mapping here")
    request = method.input_type
    scope = required_scope(method)

    parameters: list[JSONObject] = []
    for name, field_path in zip(parameter_names, path_fields, strict=True):
        field = _resolve_field(request, field_path, method)
        if field.message_type is not None:
            raise ValueError(f"{method.full_name}: path variable {field_path!r} must not name a message")
        schema = builder.field_schema(field, request=True)
        if name != field_path or "." in field_path:
            # The comment of a nested field describes it inside its message,
            # where it may even be output only, so it would mislead here.
            schema.pop("description", None)
            schema["description"] = f"Sets `{field_path}` of the request."
        parameters.append(_parameter(name, "path", schema, required=True))

    operation: JSONObject = {
        "operationId": binding.operation_id,
        "tags": [method.containing_service.name],
        "security": [{BEARER_SCHEME: [scope]}],
    }
    comment = builder.comment(method.full_name)
    scope_note = f"Requires the scope `{scope}`."
    if comment:
        operation["summary"] = _summary(comment)
    operation["description"] = f"{comment}\n\n{scope_note}" if comment else scope_note

    body = rule.body
    if body == "*":
        # Fields bound by the path are left out of the body; a nested path
        # field (user.id) stays in its message's schema, which other
        # operations share.
        top_level_path_fields = {field_path for field_path in path_fields if "." not in field_path}
        body_schema = builder.object_schema(request, request=True, exclude=top_level_path_fields)
        operation["requestBody"] = _json_body(body_schema, builder.comment(request.full_name))
    elif body:
        body_field = _resolve_field(request, body, method)
        # The field's comment travels in its schema's description.
        operation["requestBody"] = _json_body(builder.field_schema(body_field, request=True), None)
        parameters.extend(_query_parameters(builder, request, set(path_fields) | {body}, method))
    else:
        parameters.extend(_query_parameters(builder, request, set(path_fields), method))

    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {
        "200": _success_response(builder, method, rule),
        "default": _error_response(),
    }
    return operation


def _parameter(name: str, location: str, schema: JSONObject, *, required: bool) -> JSONObject:
    """Return a parameter object, with the schema's description moved up to the parameter."""
    schema = dict(schema)
    parameter: JSONObject = {"name": name, "in": location, "required": required}
    description = schema.pop("description", None)
    if description:
        parameter["description"] = description
    parameter["schema"] = schema
    return parameter


def _error_response() -> JSONObject:
    status_ref = SCHEMA_REF_PREFIX + status_pb2.Status.DESCRIPTOR.full_name
    return {
        "description": "An error, as a google.rpc.Status.",
        "content": {JSON_CONTENT_TYPE: {"schema": {"$ref": status_ref}}},
    }


def _json_body(schema: JSONObject, description: str | None) -> JSONObject:
    # The gateway reads an empty body as {}, so the body is optional.
    request_body: JSONObject = {"required": False, "content": {JSON_CONTENT_TYPE: {"schema": schema}}}
    if description:
        request_body["description"] = description
    return request_body


def _success_response(
    builder: SchemaBuilder, method: MethodDescriptor, rule: http_pb2.HttpRule
) -> JSONObject:
    response = method.output_type
    if rule.response_body:
        schema = builder.field_schema(_resolve_field(response, rule.response_body, method))
    else:
        schema = builder.message_schema(response)
    return {
        "description": builder.comment(response.full_name) or f"The {response.name}.",
        "content": {JSON_CONTENT_TYPE: {"schema": schema}},
    }


def _query_parameters(
    builder: SchemaBuilder,
    message: Descriptor,
    bound: set[str],
    method: MethodDescriptor,
    proto_prefix: str = "",
    json_prefix: str = "",
    visiting: frozenset[str] = frozenset(),
) -> list[JSONObject]:
    """Return a query parameter for each field of message that the path and body do not bind.

    A field of a message type becomes one parameter per subfield, named by
    its dotted path (``filter.minTotal``), as google.api.http specifies.
    """
    parameters: list[JSONObject] = []
    for field in message.fields:
        proto_path = proto_prefix + field.name
        json_path = json_prefix + field.json_name
        if proto_path in bound:
            continue
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            raise ValueError(f"{method.full_name}: map field {proto_path!r} cannot be a query parameter")
        if nested is not None and not is_scalar_well_known(nested):
            if field.is_repeated:
                raise ValueError(
                    f"{method.full_name}: repeated message field {proto_path!r} cannot be a query parameter; "
                    "send it in the body"
                )
            if nested.full_name in visiting:
                raise ValueError(
                    f"{method.full_name}: {proto_path!r} contains its own type, {nested.full_name}, "
                    "so it cannot be spelled out as query parameters"
                )
            parameters.extend(
                _query_parameters(
                    builder,
                    nested,
                    bound,
                    method,
                    f"{proto_path}.",
                    f"{json_path}.",
                    visiting | {message.full_name, nested.full_name},
                )
            )
            continue

        schema = builder.field_schema(field, request=True)
        parameters.append(_parameter(json_path, "query", schema, required=False))
    return parameters


def _events_operation() -> JSONObject:
    return {
        "operationId": "Events_StreamEvents",
        "tags": ["Events"],
        "summary": "Stream events as server-sent events",
        "description": f"{_EVENTS_DESCRIPTION}\n\nRequires the scope `{EVENTS_SCOPE}`.",
        "security": [{BEARER_SCHEME: [EVENTS_SCOPE]}],
        "parameters": [
            {
                "name": "subject",
                "in": "query",
                "required": True,
                "description": (
                    "NATS subject filter inside one context, such as `tidings.orders.>` or "
                    "`tidings.users.user.created`. The wildcards `*` and `>` must be whole tokens, `>` "
                    "only the last one, and the context token cannot be a wildcard."
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": 512},
            },
            {
                "name": "start",
                "in": "query",
                "required": False,
                "description": (
                    "`new` streams only events published after the request and `all` replays the "
                    "stream from its first event. A resume point overrides it."
                ),
                "schema": {"type": "string", "enum": ["new", "all"], "default": "new"},
            },
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Stream sequence of the last event received: the stream resumes after it.",
                "schema": _SEQUENCE_SCHEMA,
            },
            {
                "name": "last_event_id",
                "in": "query",
                "required": False,
                "description": "The same as the Last-Event-ID header, for clients that cannot set it.",
                "schema": _SEQUENCE_SCHEMA,
            },
        ],
        "responses": {
            "200": {
                "description": "A stream of server-sent events.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            "default": _error_response(),
        },
    }
