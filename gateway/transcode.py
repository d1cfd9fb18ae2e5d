"""HTTP request to protobuf request and back, by the proto3 JSON mapping.

json_format does the conversion. Before it runs, ``check_json`` walks the
JSON against the message descriptor, because json_format's errors name
fields inconsistently and quote Python internals. A client should read
"user.emial: unknown field", not "invalid literal for int()".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from multidict import MultiMapping

from gateway.routes import Route

# Well-known types whose JSON form is not an object of their fields;
# json_format validates them itself.
_WELL_KNOWN_JSON = frozenset({
    "google.protobuf.Any",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.ListValue",
    "google.protobuf.Struct",
    "google.protobuf.Timestamp",
    "google.protobuf.Value",
    "google.protobuf.BoolValue",
    "google.protobuf.BytesValue",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int32Value",
    "google.protobuf.Int64Value",
    "google.protobuf.StringValue",
    "google.protobuf.UInt32Value",
    "google.protobuf.UInt64Value",
})

_INTEGER_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
})
_FLOAT_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
_INTEGER_TEXT = re.compile(r"^-?[0-9]+$")
_PARSE_CHAIN = re.compile(r"Failed to parse (\w+) field")
_AT_LOCATION = re.compile(r"\.? at [\w.]+\.?$")


@dataclass(frozen=True)
class RequestError(Exception):
    """The HTTP request does not map to a valid protobuf request.

    Attributes:
        field: The offending field as the client named it (``user.email``),
            or ``body`` / a header name when the problem is not one field.
        description: What is wrong and what is expected.
    """

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"

    def violation(self) -> error_details_pb2.BadRequest:
        """Return the google.rpc.BadRequest detail that names the field."""
        return error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)
            ]
        )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field_by_json_key(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(key)
    if field is not None:
        return field
    for candidate in descriptor.fields:
        if candidate.json_name == key:
            return candidate
    return None


def check_json(value: Any, descriptor: Descriptor, path: str = "") -> None:
    """Check that value is a JSON object fit for a message of descriptor.

    Raises:
        RequestError: The first unknown field, duplicated field or value of
            the wrong JSON type, named by its path.
    """
    if not isinstance(value, dict):
        raise RequestError(path or "body", f"expected a JSON object for {descriptor.name}")
    seen: dict[str, str] = {}
    for key, item in value.items():
        field = _field_by_json_key(descriptor, key)
        if field is None:
            raise RequestError(_join(path, key), f"unknown field of {descriptor.name}; check its spelling")
        if field.name in seen:
            raise RequestError(
                _join(path, key), f"set twice, as {seen[field.name]!r} and {key!r}; send one of them"
            )
        seen[field.name] = key
        if item is not None:
            _check_field(item, field, _join(path, key))


def _check_field(value: Any, field: FieldDescriptor, path: str) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise RequestError(path, "expected a JSON object (a map)")
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            _check_single(item, value_field, f"{path}.{key}")
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise RequestError(path, "expected a JSON array")
        for index, item in enumerate(value):
            _check_single(item, field, f"{path}[{index}]")
        return
    _check_single(value, field, path)


# The JSON form of well-known types that are strings, and what to send instead.
_STRING_FORMS = {
    "google.protobuf.Timestamp": "an RFC 3339 timestamp string such as 2026-01-02T03:04:05Z",
    "google.protobuf.Duration": "a duration string such as 1.5s",
    "google.protobuf.FieldMask": "a string of comma-separated field paths such as displayName,email",
}


def _check_single(value: Any, field: FieldDescriptor, path: str) -> None:
    if field.message_type is not None:
        name = field.message_type.full_name
        if name in _STRING_FORMS and not isinstance(value, str):
            raise RequestError(path, f"expected {_STRING_FORMS[name]}")
        if name not in _WELL_KNOWN_JSON:
            check_json(value, field.message_type, path)
        return
    kind = field.type
    if kind in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        if not isinstance(value, str):
            raise RequestError(path, "expected a JSON string")
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise RequestError(path, "expected true or false")
    elif kind in _INTEGER_TYPES:
        is_integer = isinstance(value, int) and not isinstance(value, bool)
        is_integer = is_integer or (isinstance(value, float) and value.is_integer())
        if not is_integer and not (isinstance(value, str) and _INTEGER_TEXT.match(value)):
            raise RequestError(path, "expected an integer (64-bit integers may be quoted strings)")
    elif kind in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise RequestError(path, "expected a number")
    elif kind == FieldDescriptor.TYPE_ENUM:
        names = [v.name for v in field.enum_type.values]
        if isinstance(value, str) and value not in names:
            raise RequestError(path, f"unknown value {value!r}; expected one of {', '.join(names)}")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise RequestError(path, f"expected one of {', '.join(names)}")


def _parse_into(data: Any, message: Message, path: str) -> None:
    check_json(data, message.DESCRIPTOR, path)
    try:
        json_format.ParseDict(data, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        # Left for json_format: well-known types (timestamps, masks) and
        # ranges. Its message nests "Failed to parse <field> field" per level.
        names = _PARSE_CHAIN.findall(str(exc))
        field = ".".join([*([path] if path else []), *names]) or path or "body"
        detail = _AT_LOCATION.sub("", str(exc).rsplit(": ", 1)[-1]).rstrip(". ")
        raise RequestError(field, f"invalid value: {detail}") from None


def parse_body(raw: bytes, content_type: str) -> Any:
    """Decode a JSON request body.

    Raises:
        RequestError: The body is not JSON or not sent as application/json.
    """
    if content_type not in ("application/json", ""):
        raise RequestError(
            "Content-Type", f"{content_type!r} is not accepted; send the body as application/json"
        )
    try:
        return json.loads(raw or b"{}")
    except RecursionError:
        raise RequestError("body", "JSON nested too deeply; send a flatter JSON object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        position = ""
        if isinstance(exc, json.JSONDecodeError):
            position = f" at line {exc.lineno} column {exc.colno}"
        raise RequestError("body", f"malformed JSON{position}; send a JSON object") from None


def _set_path_field(message: Message, field_path: str, value: str, bound: set[str]) -> None:
    *parents, name = field_path.split(".")
    target = message
    for parent in parents:
        target = getattr(target, parent)
    existing = getattr(target, name)
    if existing and existing != value:
        raise RequestError(
            field_path, f"the body says {existing!r} but the path says {value!r}; leave it out of the body"
        )
    setattr(target, name, value)
    bound.add(field_path)


def _camel_case_paths(mask: str) -> str:
    """Accept proto field names in a field mask too: ``display_name`` becomes ``displayName``.

    The proto3 JSON form of a FieldMask is lowerCamelCase, but error messages
    of the services name fields as the protos do, so clients send both.
    """
    def camel(name: str) -> str:
        first, *rest = name.split("_")
        return first + "".join(part[:1].upper() + part[1:] for part in rest)

    return ",".join(".".join(camel(part) for part in path.strip().split(".")) for path in mask.split(","))


def _query_value(field: FieldDescriptor, text: str, name: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text not in ("true", "false"):
            raise RequestError(name, f"expected true or false, got {text!r}")
        return text == "true"
    if field.type in _INTEGER_TYPES and not _INTEGER_TEXT.match(text):
        raise RequestError(name, f"expected an integer, got {text!r}")
    return text


def _query_to_json(
    query: MultiMapping[str], descriptor: Descriptor, bound: set[str], body_field: str
) -> dict[str, Any]:
    """Build the JSON object a query string describes (``a.b=1`` nests, repeats make lists)."""
    data: dict[str, Any] = {}
    for name in dict.fromkeys(query.keys()):
        *parents, leaf = name.split(".")
        top = _field_by_json_key(descriptor, parents[0] if parents else leaf)
        if top is not None and top.name == body_field:
            raise RequestError(name, f"belongs in the body ({body_field}), not the query")
        node, current = data, descriptor
        proto_path = []
        for parent in parents:
            field = _field_by_json_key(current, parent)
            if (field is None or field.message_type is None or field.is_repeated
                    or field.message_type.full_name in _WELL_KNOWN_JSON):
                raise RequestError(name, f"unknown query parameter of {descriptor.name}; see /openapi.json")
            proto_path.append(field.name)
            node = node.setdefault(field.json_name, {})
            current = field.message_type
        field = _field_by_json_key(current, leaf)
        if field is None or (field.message_type is not None and field.message_type.full_name
                             not in _WELL_KNOWN_JSON):
            raise RequestError(name, f"unknown query parameter of {descriptor.name}; see /openapi.json")
        if ".".join([*proto_path, field.name]) in bound:
            raise RequestError(name, "already given in the path; leave it out of the query")
        values = [_query_value(field, text, name) for text in query.getall(name)]
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.FieldMask":
            values = [_camel_case_paths(text) for text in values]
        if not field.is_repeated and len(values) > 1:
            raise RequestError(name, "given more than once; it takes one value")
        node[field.json_name] = values if field.is_repeated else values[0]
    return data


def build_request(
    route: Route, path_values: Mapping[str, str], query: MultiMapping[str], body: Any
) -> Message:
    """Build the protobuf request of route from the path, query string and decoded body.

    The body maps onto the rule's body field, or the whole request for
    ``*``. Path variables are set on top of it, and the remaining fields come
    from the query string. A field given in two places is an error, not a guess.

    Raises:
        RequestError: Naming the first field that is wrong.
    """
    request = route.request_class()
    if route.body == "*":
        _parse_into(body, request, "")
    elif route.body:
        _parse_into(body, getattr(request, route.body), route.body)

    bound: set[str] = set()
    for index, field_path in enumerate(route.path_fields):
        _set_path_field(request, field_path, path_values[f"p{index}"], bound)

    if query:
        if route.body == "*":
            first = next(iter(query.keys()))
            raise RequestError(first, "this route takes its fields in the body, not the query")
        from_query = _query_to_json(query, request.DESCRIPTOR, bound, route.body)
        query_message = route.request_class()
        _parse_into(from_query, query_message, "")
        request.MergeFrom(query_message)
    return request


def response_json(message: Message) -> str:
    """Encode a response by the proto3 JSON mapping, listing fields left at their defaults.

    Printing unset fields gives clients a stable shape: ``"totalCents": "0"``
    instead of a missing key.
    """
    return json_format.MessageToJson(
        message, always_print_fields_with_no_presence=True, indent=None, ensure_ascii=False
    )


# One segment of a field path: a field name with an optional index or map key, such as ``lines[0]``.
_PATH_SEGMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<suffix>(\[[^\]]*\])*)$")


def json_field_path(descriptor: Descriptor, path: str) -> str:
    """Return a proto field path, such as ``user.display_name``, with each field's JSON name.

    The services name fields as in the .proto file, while HTTP clients send
    and read the JSON names (``user.displayName``). A segment that names no
    field of the message is kept as it is, and so is the rest of the path.
    """
    segments = path.split(".")
    current: Descriptor | None = descriptor
    for index, segment in enumerate(segments):
        match = _PATH_SEGMENT.match(segment)
        field = current.fields_by_name.get(match["name"]) if current and match else None
        if field is None or match is None:
            break
        segments[index] = field.json_name + match["suffix"]
        current = field.message_type
    return ".".join(segments)


def with_json_field_names(status: status_pb2.Status, descriptor: Descriptor) -> None:
    """Rewrite the field paths of the BadRequest details of a google.rpc.Status to JSON names.

    Where the status message or a violation's description names a rewritten
    path, it is rewritten there too, so that a client reads one name per field.
    """
    for detail in status.details:
        if not detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            continue
        bad_request = error_details_pb2.BadRequest()
        detail.Unpack(bad_request)
        renamed: dict[str, str] = {}
        for violation in bad_request.field_violations:
            json_path = json_field_path(descriptor, violation.field)
            if json_path != violation.field:
                renamed[violation.field] = json_path
            violation.field = json_path
        for violation in bad_request.field_violations:
            violation.description = _renamed_in_text(violation.description, renamed)
        status.message = _renamed_in_text(status.message, renamed)
        detail.Pack(bad_request)


def _renamed_in_text(text: str, renamed: dict[str, str]) -> str:
    """Replace each whole occurrence of a renamed field path in text."""
    for proto_path, json_path in renamed.items():
        text = re.sub(rf"(?<![\w.]){re.escape(proto_path)}(?![\w])", json_path, text)
    return text
