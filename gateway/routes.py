"""The route table: one HTTP route per RPC, read from its google.api.http rule.

Routes come from the descriptors of the generated modules, so a method
gains its REST route by its proto annotation alone. Nothing here lists
methods by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from tidings.inventory.v1 import inventory_service_pb2
from tidings.notifications.v1 import notification_service_pb2
from tidings.orders.v1 import order_service_pb2
from tidings.payments.v1 import payment_service_pb2
from tidings.users.v1 import user_service_pb2

# The scope the live event stream (GET /v1/events) requires.
EVENTS_SCOPE = "events:read"
EVENTS_PATH = "/v1/events"

# The service modules the gateway serves, keyed by the backend (process) name.
SERVICE_MODULES: dict[str, ModuleType] = {
    "users": user_service_pb2,
    "orders": order_service_pb2,
    "inventory": inventory_service_pb2,
    "payments": payment_service_pb2,
    "notifications": notification_service_pb2,
}

_VARIABLE = re.compile(r"^\{(?P<field>[a-z_][a-z0-9_.]*)(?:=(?P<pattern>[^}]*))?\}$")


class RouteError(ValueError):
    """A google.api.http rule the gateway cannot serve; raised at start."""


@dataclass(frozen=True)
class Route:
    """One RPC as an HTTP route.

    Attributes:
        http_method: GET, POST, PATCH, PUT or DELETE.
        template: The path template of the rule, such as ``/v1/users/{user.id}``.
        aiohttp_path: The same path for aiohttp's router, variables renamed
            ``p0``, ``p1``... because aiohttp names cannot contain dots.
        path_fields: Request field paths bound by ``p0``, ``p1``... in order.
        body: ``""`` (no body), ``"*"`` (the whole request) or a field name.
        backend: The service process that serves the method, such as ``users``.
        grpc_method: ``/package.Service/Method``, as gRPC names it on the wire.
        request_class, response_class: The generated message classes.
        no_side_effects: The method is declared ``NO_SIDE_EFFECTS`` and safe to retry.
        scope: The scope a caller's token must hold (see required_scope).
    """

    http_method: str
    template: str
    aiohttp_path: str
    path_fields: tuple[str, ...]
    body: str
    backend: str
    grpc_method: str
    request_class: type[Message]
    response_class: type[Message]
    no_side_effects: bool
    scope: str

    @property
    def operation(self) -> str:
        """``Service.Method``, short enough for logs and span attributes."""
        service, method = self.grpc_method.lstrip("/").rsplit("/", 1)
        return f"{service.rsplit('.', 1)[-1]}.{method}"


def required_scope(method: MethodDescriptor) -> str:
    """Return the token scope that calling method requires.

    Methods declared ``idempotency_level = NO_SIDE_EFFECTS`` need
    ``<context>:read``, all others ``<context>:write``. The context is the
    second segment of the proto package: ``users`` for tidings.users.v1.

    Raises:
        RouteError: The package is not of the form tidings.<context>.<version>.
    """
    package = method.containing_service.file.package
    segments = package.split(".")
    if len(segments) != 3 or segments[0] != "tidings":
        raise RouteError(
            f"{method.full_name}: package {package!r} is not tidings.<context>.<version>, "
            "so it has no scope context"
        )
    return f"{segments[1]}:{'read' if _has_no_side_effects(method) else 'write'}"


def _has_no_side_effects(method: MethodDescriptor) -> bool:
    return method.GetOptions().idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS


def _http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return None
    return options.Extensions[annotations_pb2.http]


def _verb_and_path(rule: http_pb2.HttpRule, method: MethodDescriptor) -> tuple[str, str]:
    pattern = rule.WhichOneof("pattern")
    if pattern in (None, "custom"):
        raise RouteError(f"{method.full_name}: only get, post, put, patch and delete rules are served")
    return pattern.upper(), getattr(rule, pattern)


def _compile_template(template: str, method: MethodDescriptor) -> tuple[str, tuple[str, ...]]:
    """Turn ``/v1/orders/{id}:cancel`` into ``/v1/orders/{p0:[^/:]+}:cancel`` and its fields."""
    if not template.startswith("/"):
        raise RouteError(f"{method.full_name}: path {template!r} must start with /")
    # A custom verb (``:cancel``) follows the last segment; it is literal text.
    suffix = ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and not last.endswith("}"):
        template, verb = template.rsplit(":", 1)
        suffix = ":" + verb

    segments: list[str] = []
    fields: list[str] = []
    for segment in template.split("/")[1:]:
        match = _VARIABLE.match(segment)
        if match is None:
            if "{" in segment or "*" in segment:
                raise RouteError(f"{method.full_name}: unsupported path segment {segment!r}")
            segments.append(segment)
            continue
        if match.group("pattern") not in (None, "*"):
            raise RouteError(
                f"{method.full_name}: variable pattern {match.group('pattern')!r} is not supported; "
                "use {field} or {field=*}"
            )
        segments.append(f"{{p{len(fields)}:[^/:]+}}")
        fields.append(match.group("field"))
    return "/" + "/".join(segments) + suffix, tuple(fields)


def _check_field_path(message_class: type[Message], path: str, method: MethodDescriptor) -> None:
    descriptor = message_class.DESCRIPTOR
    parts = path.split(".")
    for index, name in enumerate(parts):
        field = descriptor.fields_by_name.get(name)
        if field is None:
            raise RouteError(f"{method.full_name}: {path!r} names no field of {descriptor.full_name}")
        if index < len(parts) - 1:
            if field.message_type is None:
                raise RouteError(f"{method.full_name}: {path!r} goes through a non-message field")
            descriptor = field.message_type
        elif field.type != descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            raise RouteError(f"{method.full_name}: path variable {path!r} must be a string field")


def route_of(backend: str, method: MethodDescriptor) -> Route | None:
    """Return the route of method, or None when it has no google.api.http rule."""
    rule = _http_rule(method)
    if rule is None:
        return None
    if rule.additional_bindings:
        raise RouteError(f"{method.full_name}: additional_bindings are not supported")
    verb, template = _verb_and_path(rule, method)
    aiohttp_path, path_fields = _compile_template(template, method)

    request_class = GetMessageClass(method.input_type)
    for field in path_fields:
        _check_field_path(request_class, field, method)
    if rule.body not in ("", "*"):
        _check_field_path_message(request_class, rule.body, method)

    return Route(
        http_method=verb,
        template=template,
        aiohttp_path=aiohttp_path,
        path_fields=path_fields,
        body=rule.body,
        backend=backend,
        grpc_method=f"/{method.containing_service.full_name}/{method.name}",
        request_class=request_class,
        response_class=GetMessageClass(method.output_type),
        no_side_effects=_has_no_side_effects(method),
        scope=required_scope(method),
    )


def _check_field_path_message(message_class: type[Message], name: str, method: MethodDescriptor) -> None:
    field = message_class.DESCRIPTOR.fields_by_name.get(name)
    if field is None or field.message_type is None or field.is_repeated:
        raise RouteError(f"{method.full_name}: body {name!r} must name a singular message field")


def load_routes(modules: dict[str, ModuleType] | None = None) -> list[Route]:
    """Return the routes of every annotated method of the given service modules.

    Raises:
        RouteError: A rule uses a feature the gateway does not serve, names a
            missing field, or two methods claim the same method and path.
    """
    routes: list[Route] = []
    seen: dict[tuple[str, str], str] = {}
    for backend, module in (modules or SERVICE_MODULES).items():
        for method in _methods(module):
            route = route_of(backend, method)
            if route is None:
                continue
            key = (route.http_method, route.aiohttp_path)
            if key in seen:
                raise RouteError(
                    f"{method.full_name} and {seen[key]} both claim {route.http_method} {route.template}"
                )
            seen[key] = method.full_name
            routes.append(route)
    return routes


def _methods(module: ModuleType) -> Iterator[MethodDescriptor]:
    for service in module.DESCRIPTOR.services_by_name.values():
        yield from service.methods
