"""JSON Schemas of protobuf messages by the proto3 JSON mapping, for the API documents.

The OpenAPI document (gateway/openapi.py) and the AsyncAPI document
(gateway/asyncapi.py) share one builder, so a message has the same schema
in HTTP responses and in event payloads. Descriptions come from the proto
source comments, which the generated modules do not keep; see
``load_proto_comments``.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import google.api
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

JSONObject = dict[str, Any]

SCHEMA_REF_PREFIX = "#/components/schemas/"

# Suffix of the component that describes a message as a request body may
# contain it. A dash cannot occur in a proto name, so the name is free.
INPUT_SUFFIX = "-Input"

_SIGNED_64 = frozenset(
    {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
)
_UNSIGNED_64 = frozenset({FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64})
_SIGNED_32 = frozenset(
    {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
)
_UNSIGNED_32 = frozenset({FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32})


def _float_schema(number_format: str) -> JSONObject:
    # proto3 JSON writes the non-finite values as these strings.
    return {
        "anyOf": [
            {"type": "number", "format": number_format},
            {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
        ]
    }


# Well-known types whose JSON form is a string, number or boolean rather than
# an object of their fields. These are the only message types that a query
# parameter can carry.
_SCALAR_WELL_KNOWN: dict[str, JSONObject] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with up to 9 fractional digits and an `s` suffix, such as `1.5s`.",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in lowerCamelCase, such as `email,displayName`.",
    },
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BytesValue": {"type": "string", "contentEncoding": "base64"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.UInt32Value": {"type": "integer", "minimum": 0, "maximum": 4294967295},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64"},
    "google.protobuf.DoubleValue": _float_schema("double"),
    "google.protobuf.FloatValue": _float_schema("float"),
}

# Well-known types whose JSON form is an arbitrary object, array or value.
_DYNAMIC_WELL_KNOWN: dict[str, JSONObject] = {
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "Type URL of the packed message."}},
        "required": ["@type"],
        "description": "A packed message: its proto3 JSON fields next to `@type`.",
    },
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array"},
}


def is_scalar_well_known(descriptor: Descriptor) -> bool:
    """Return whether the message type's JSON form is a single string, number or boolean."""
    return descriptor.full_name in _SCALAR_WELL_KNOWN


def scalar_schema(field_type: int) -> JSONObject:
    """Return the schema of a non-message, non-enum field type in proto3 JSON."""
    if field_type in _SIGNED_64:
        # 64-bit integers are JSON strings, so that JavaScript keeps every digit.
        return {"type": "string", "format": "int64"}
    if field_type in _UNSIGNED_64:
        return {"type": "string", "format": "uint64"}
    if field_type in _SIGNED_32:
        return {"type": "integer", "format": "int32"}
    if field_type in _UNSIGNED_32:
        return {"type": "integer", "minimum": 0, "maximum": 4294967295}
    if field_type == FieldDescriptor.TYPE_DOUBLE:
        return _float_schema("double")
    if field_type == FieldDescriptor.TYPE_FLOAT:
        return _float_schema("float")
    if field_type == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if field_type == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if field_type == FieldDescriptor.TYPE_BYTES:
        # Output is standard base64 with padding. Parsers also accept the URL-safe alphabet.
        return {"type": "string", "contentEncoding": "base64"}
    raise ValueError(f"field type {field_type} has no scalar JSON schema; groups are not supported")


def _with_description(schema: JSONObject, description: str | None) -> JSONObject:
    """Return schema with description placed before any description it already has."""
    if not description:
        return schema
    existing = schema.get("description")
    return {**schema, "description": f"{description}\n\n{existing}" if existing else description}


class SchemaBuilder:
    """Collects the component schemas that the message and enum references point to.

    A message gets up to two components. ``<full name>`` describes the JSON
    that responses and events carry. ``<full name>-Input`` describes the JSON
    a request body may contain, with ``additionalProperties: false`` because
    the gateway rejects unknown fields with 400. Enums get one component each.
    Well-known types are inlined as their special JSON forms.
    """

    def __init__(self, comments: Mapping[str, str] | None = None) -> None:
        self.schemas: dict[str, JSONObject] = {}
        self._comments = dict(comments or {})

    def comment(self, full_name: str) -> str | None:
        """Return the source comment of a proto element, keyed by its full name."""
        return self._comments.get(full_name)

    def message_schema(self, descriptor: Descriptor, *, request: bool = False) -> JSONObject:
        """Return the schema of a message: a well-known type's JSON form or a $ref to its component."""
        full_name = descriptor.full_name
        well_known = _SCALAR_WELL_KNOWN.get(full_name) or _DYNAMIC_WELL_KNOWN.get(full_name)
        if well_known is not None:
            return copy.deepcopy(well_known)
        if descriptor.full_name == "google.protobuf.NullValue":
            return {"type": "null"}

        name = descriptor.full_name + (INPUT_SUFFIX if request else "")
        if name not in self.schemas:
            # The placeholder ends the recursion of a message that contains itself.
            self.schemas[name] = {}
            self.schemas[name] = _with_description(
                self.object_schema(descriptor, request=request), self.comment(descriptor.full_name)
            )
        return {"$ref": SCHEMA_REF_PREFIX + name}

    def object_schema(
        self, descriptor: Descriptor, *, request: bool = False, exclude: Collection[str] = ()
    ) -> JSONObject:
        """Return the inline object schema of a message's fields, without the fields named in exclude."""
        properties = {
            field.json_name: self.field_schema(field, request=request)
            for field in descriptor.fields
            if field.name not in exclude
        }
        schema: JSONObject = {"type": "object", "properties": properties}
        if request:
            schema["additionalProperties"] = False
        return schema

    def field_schema(self, field: FieldDescriptor, *, request: bool = False) -> JSONObject:
        """Return the schema of a field's JSON value, with the field's comment as description."""
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            # Map keys are always JSON strings, whatever their proto type.
            value = self._single_schema(message.fields_by_name["value"], request=request)
            schema: JSONObject = {"type": "object", "additionalProperties": value}
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single_schema(field, request=request)}
        else:
            schema = self._single_schema(field, request=request)

        description = self.comment(field.full_name)
        oneof = field.containing_oneof
        if oneof is not None and not _is_proto3_optional(field):
            members = ", ".join(f"`{member.json_name}`" for member in oneof.fields)
            note = f"Part of oneof `{oneof.name}`: set at most one of {members}."
            description = f"{description}\n\n{note}" if description else note
        return _with_description(schema, description)

    def enum_schema(self, descriptor: EnumDescriptor) -> JSONObject:
        """Return a $ref to the enum's component: its value names as strings."""
        if descriptor.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        name = descriptor.full_name
        if name not in self.schemas:
            lines = []
            for value in descriptor.values:
                value_comment = self.comment(f"{name}.{value.name}")
                lines.append(f"- `{value.name}`: {value_comment}" if value_comment else f"- `{value.name}`")
            intro = self.comment(name)
            self.schemas[name] = {
                "type": "string",
                "enum": [value.name for value in descriptor.values],
                "description": "\n".join([f"{intro}\n" if intro else "", *lines]).strip(),
            }
        return {"$ref": SCHEMA_REF_PREFIX + name}

    def _single_schema(self, field: FieldDescriptor, *, request: bool) -> JSONObject:
        if field.message_type is not None:
            return self.message_schema(field.message_type, request=request)
        if field.enum_type is not None:
            return self.enum_schema(field.enum_type)
        return scalar_schema(field.type)


def _is_proto3_optional(field: FieldDescriptor) -> bool:
    """Return whether field is a proto3 ``optional`` field, whose oneof exists only to track presence."""
    message = descriptor_pb2.DescriptorProto()
    field.containing_type.CopyToProto(message)
    return message.field[field.index].proto3_optional


def _clean_comment(text: str) -> str:
    """Join the lines of a proto comment into paragraphs separated by blank lines."""
    paragraphs: list[list[str]] = [[]]
    for line in text.strip("\n").split("\n"):
        stripped = line.strip()
        if stripped:
            paragraphs[-1].append(stripped)
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n\n".join(" ".join(lines) for lines in paragraphs if lines)


def _element_names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Map the source-info path of every named element of a file to its full name.

    A source-info path is the chain of (field number, index) pairs that leads
    from FileDescriptorProto to the element, such as (4, 0, 2, 1) for the
    second field of the first message.
    """
    names: dict[tuple[int, ...], str] = {}
    file_fields = descriptor_pb2.FileDescriptorProto
    message_fields = descriptor_pb2.DescriptorProto

    def add_enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full_name = f"{scope}.{enum.name}"
        names[path] = full_name
        for index, value in enumerate(enum.value):
            # Protobuf scopes enum values beside their enum; keying them under
            # the enum keeps values of different enums apart.
            names[(*path, descriptor_pb2.EnumDescriptorProto.VALUE_FIELD_NUMBER, index)] = (
                f"{full_name}.{value.name}"
            )

    def add_message(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        full_name = f"{scope}.{message.name}"
        names[path] = full_name
        for index, field in enumerate(message.field):
            names[(*path, message_fields.FIELD_FIELD_NUMBER, index)] = f"{full_name}.{field.name}"
        for index, nested in enumerate(message.nested_type):
            add_message(nested, (*path, message_fields.NESTED_TYPE_FIELD_NUMBER, index), full_name)
        for index, enum in enumerate(message.enum_type):
            add_enum(enum, (*path, message_fields.ENUM_TYPE_FIELD_NUMBER, index), full_name)

    for index, message in enumerate(file.message_type):
        add_message(message, (file_fields.MESSAGE_TYPE_FIELD_NUMBER, index), file.package)
    for index, enum in enumerate(file.enum_type):
        add_enum(enum, (file_fields.ENUM_TYPE_FIELD_NUMBER, index), file.package)
    for index, service in enumerate(file.service):
        service_path = (file_fields.SERVICE_FIELD_NUMBER, index)
        service_name = f"{file.package}.{service.name}"
        names[service_path] = service_name
        for method_index, method in enumerate(service.method):
            method_number = descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER
            names[(*service_path, method_number, method_index)] = f"{service_name}.{method.name}"
    for index, extension in enumerate(file.extension):
        names[(file_fields.EXTENSION_FIELD_NUMBER, index)] = f"{file.package}.{extension.name}"
    return names


def load_proto_comments(proto_root: Path) -> dict[str, str]:
    """Read the leading comments of the proto files under proto_root, keyed by element full name.

    Services, methods, messages, fields, enums and extensions are keyed by
    their full names; enum values by ``<enum full name>.<VALUE>``. Runs
    protoc from grpc-tools, which only the ``dev`` extra installs.

    Raises:
        RuntimeError: protoc failed; its own output names the file and line.
    """
    # grpc-tools is a dev dependency, needed only to write the documents.
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(next(iter(google.api.__path__))).parent.parent
    sources = sorted(str(path.relative_to(proto_root)) for path in proto_root.rglob("*.proto"))

    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "descriptors.binpb"
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--proto_path={googleapis}",
            "--include_source_info",
            f"--descriptor_set_out={output}",
            *sources,
        ]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"protoc failed on the proto files under {proto_root}; see its output above")
        file_set = descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes())

    comments: dict[str, str] = {}
    for file in file_set.file:
        names = _element_names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name is not None and location.leading_comments.strip():
                comments[name] = _clean_comment(location.leading_comments)
    return comments
