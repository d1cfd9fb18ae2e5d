"""The HTTP path of `tidings demo`: every call goes through the gateway as proto3 JSON.

HttpDemoClient turns each protobuf request into the HTTP request that the
method's google.api.http rule describes. The path variables come from the
request fields they name, the rule's body field (or the whole request for
``*``) becomes the JSON body, and the remaining fields go into the query
string. The gateway's transcoder (gateway/transcode.py) does the reverse.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from gateway.auth import mint_hs256_token
from gateway.routes import Route, load_routes
from services.runtime.cli.supervisor import gateway_url_file
from services.runtime.config import Settings
from tidings.inventory.v1 import inventory_service_pb2
from tidings.notifications.v1 import notification_service_pb2
from tidings.orders.v1 import order_service_pb2
from tidings.payments.v1 import payment_service_pb2
from tidings.users.v1 import user_service_pb2

ResponseT = TypeVar("ResponseT", bound=Message)

# The gRPC methods the demo calls. The gateway serves each at the route of its google.api.http rule.
CREATE_USER = "/tidings.users.v1.UserService/CreateUser"
UPDATE_USER = "/tidings.users.v1.UserService/UpdateUser"
LIST_NOTIFICATIONS = "/tidings.notifications.v1.NotificationService/ListNotifications"
CREATE_PRODUCT = "/tidings.inventory.v1.InventoryService/CreateProduct"
TOP_UP = "/tidings.payments.v1.PaymentService/TopUp"
PLACE_ORDER = "/tidings.orders.v1.OrderService/PlaceOrder"
GET_ORDER = "/tidings.orders.v1.OrderService/GetOrder"
DEMO_METHODS = (
    CREATE_USER, UPDATE_USER, LIST_NOTIFICATIONS, CREATE_PRODUCT, TOP_UP, PLACE_ORDER, GET_ORDER
)

# The sub claim of the demo's token, which the gateway logs as the caller.
TOKEN_SUBJECT = "tidings-demo"

# Seconds the HTTP client waits beyond the Request-Timeout it sends, so that the
# gateway's own DEADLINE_EXCEEDED response arrives before the client gives up.
RESPONSE_MARGIN = 1.0

# Attempts per call while the gateway responds 429 (rate limited), and the longest
# Retry-After wait the client accepts between them.
RATE_LIMITED_ATTEMPTS = 5
MAX_RETRY_AFTER = 10.0

_PATH_VARIABLE = re.compile(r"\{[^}]*\}")
_tracer = trace.get_tracer("tidings.demo")
_traceparent = TraceContextTextMapPropagator()


class GatewayCallError(Exception):
    """Error of a call through the gateway: no connection, no response in time, or an error status.

    Attributes:
        http_status: The HTTP status of the error response, or None when no response arrived.
    """

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class GatewayUnreachableError(GatewayCallError):
    """Error raised when no connection to the gateway opens (refused, no route to host, unknown host)."""


@dataclass(frozen=True)
class HttpRequest:
    """The HTTP form of one protobuf request: path with variables filled in, query items and JSON body."""

    method: str
    path: str
    query: list[tuple[str, str]]
    body: dict[str, Any] | None


def default_gateway_url(settings: Settings) -> str:
    """Return the URL a running `tidings up` recorded, else http://TIDINGS_HOST:TIDINGS_GATEWAY_PORT."""
    recorded = gateway_url_file(settings)
    if recorded.exists():
        return recorded.read_text().strip()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.gateway_port}"


def check_gateway_url(url: str) -> str | None:
    """Return why url cannot be the gateway's base URL, or None when it can."""
    try:
        parsed = URL(url)
    except ValueError as exc:
        return f"invalid URL: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "expected http://HOST:PORT or https://HOST:PORT"
    if parsed.query_string or parsed.fragment:
        return "a query string or fragment is not allowed in the base URL"
    return None


def demo_routes() -> dict[str, Route]:
    """Return the gateway route of each method in DEMO_METHODS, keyed by the gRPC method name."""
    routes = {route.grpc_method: route for route in load_routes()}
    missing = [method for method in DEMO_METHODS if method not in routes]
    if missing:
        raise LookupError(
            f"{missing[0]} has no google.api.http rule, so the gateway does not serve it; "
            "add one to its proto"
        )
    return {method: routes[method] for method in DEMO_METHODS}


def mint_demo_token(secret: str, lifetime: float) -> str:
    """Sign an HS256 token with the scopes of the demo's routes, valid for lifetime seconds.

    The iss and aud claims are set from TIDINGS_GATEWAY_JWT_ISSUER and
    TIDINGS_GATEWAY_JWT_AUDIENCE when those are set, because a gateway started
    with them rejects tokens that lack the claims.

    Raises:
        ValueError: The secret is too short or unfit for HS256 (gateway.auth.AuthConfigError).
    """
    scopes = sorted({route.scope for route in demo_routes().values()})
    return mint_hs256_token(
        secret,
        TOKEN_SUBJECT,
        scopes,
        issuer=os.environ.get("TIDINGS_GATEWAY_JWT_ISSUER") or None,
        audience=os.environ.get("TIDINGS_GATEWAY_JWT_AUDIENCE") or None,
        lifetime=lifetime,
    )


def http_request_of(route: Route, request: Message) -> HttpRequest:
    """Map a protobuf request onto route by the proto3 JSON mapping, as the gateway expects it.

    Raises:
        ValueError: A path variable's field is empty, or a field that must go
            into the query string is a message the gateway cannot read there.
    """
    data = json_format.MessageToDict(request)
    values = []
    for field_path in route.path_fields:
        value = _field_value(request, field_path)
        if not value:
            raise ValueError(
                f"{route.grpc_method}: {field_path} is empty but the path {route.template} needs it"
            )
        values.append(quote(value, safe=""))
        _remove_field(data, request, field_path)
    filled = iter(values)
    path = _PATH_VARIABLE.sub(lambda _: next(filled), route.template)

    if route.body == "*":
        return HttpRequest(route.http_method, path, [], data)
    body = None
    if route.body:
        body = data.pop(request.DESCRIPTOR.fields_by_name[route.body].json_name, {})
    return HttpRequest(route.http_method, path, _query_items(data), body)


def _field_value(message: Message, field_path: str) -> str:
    target: Any = message
    for name in field_path.split("."):
        target = getattr(target, name)
    return str(target)


def _remove_field(data: dict[str, Any], message: Message, field_path: str) -> None:
    """Remove field_path (proto names) from data (proto3 JSON names), because the path carries it."""
    descriptor = message.DESCRIPTOR
    node: Any = data
    *parents, leaf = field_path.split(".")
    for name in parents:
        field = descriptor.fields_by_name[name]
        node = node.get(field.json_name)
        if not isinstance(node, dict):
            return
        descriptor = field.message_type
    node.pop(descriptor.fields_by_name[leaf].json_name, None)


def _query_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten proto3 JSON into query items: nested fields as a.b, repeated fields as repeated items."""
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        name = prefix + key
        if isinstance(value, dict):
            items.extend(_query_items(value, name + "."))
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                raise ValueError(f"{name}: a repeated message field cannot be sent in the query string")
            # json.dumps writes booleans as true and false, the form the gateway expects.
            text = json.dumps(item) if isinstance(item, bool) else str(item)
            items.append((name, text))
    return items


class HttpDemoClient:
    """DemoClient that sends every call through the gateway as HTTP/JSON with a bearer token.

    Each call gets a CLIENT span and sends its traceparent, so the gateway's
    SERVER span joins the trace of the demo step that made the call.
    """

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, token: str, call_timeout: float
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._call_timeout = call_timeout
        self._routes = demo_routes()
        self._last_trace_id = format(0, "032x")

    @property
    def path(self) -> str:
        return f"HTTP/JSON through the gateway at {self._base_url}"

    def trace_id(self) -> str:
        """Return the trace id that the traceparent response header named for the last call.

        Without a valid header it is the trace of the call's CLIENT span.
        """
        return self._last_trace_id

    async def create_user(
        self, request: user_service_pb2.CreateUserRequest
    ) -> user_service_pb2.CreateUserResponse:
        return await self._call(CREATE_USER, request, user_service_pb2.CreateUserResponse)

    async def update_user(
        self, request: user_service_pb2.UpdateUserRequest
    ) -> user_service_pb2.UpdateUserResponse:
        return await self._call(UPDATE_USER, request, user_service_pb2.UpdateUserResponse)

    async def list_notifications(
        self, request: notification_service_pb2.ListNotificationsRequest
    ) -> notification_service_pb2.ListNotificationsResponse:
        return await self._call(
            LIST_NOTIFICATIONS, request, notification_service_pb2.ListNotificationsResponse
        )

    async def create_product(
        self, request: inventory_service_pb2.CreateProductRequest
    ) -> inventory_service_pb2.CreateProductResponse:
        return await self._call(CREATE_PRODUCT, request, inventory_service_pb2.CreateProductResponse)

    async def top_up(
        self, request: payment_service_pb2.TopUpRequest
    ) -> payment_service_pb2.TopUpResponse:
        return await self._call(TOP_UP, request, payment_service_pb2.TopUpResponse)

    async def place_order(
        self, request: order_service_pb2.PlaceOrderRequest
    ) -> order_service_pb2.PlaceOrderResponse:
        return await self._call(PLACE_ORDER, request, order_service_pb2.PlaceOrderResponse)

    async def get_order(
        self, request: order_service_pb2.GetOrderRequest
    ) -> order_service_pb2.GetOrderResponse:
        return await self._call(GET_ORDER, request, order_service_pb2.GetOrderResponse)

    async def _call(self, grpc_method: str, request: Message, response_type: type[ResponseT]) -> ResponseT:
        route = self._routes[grpc_method]
        http_request = http_request_of(route, request)
        url = URL(self._base_url + http_request.path).with_query(http_request.query)
        name = f"{route.http_method} {http_request.path}"

        for attempt in range(1, RATE_LIMITED_ATTEMPTS + 1):
            # The span records an exception raised in this block and gets the ERROR status.
            with _tracer.start_as_current_span(
                f"{route.http_method} {route.template}",
                kind=SpanKind.CLIENT,
                attributes={
                    "http.request.method": route.http_method,
                    "url.full": str(url),
                    "url.template": route.template,
                    "server.address": url.host or "",
                    "server.port": url.port or 0,
                },
            ) as span:
                status, headers, text = await self._send(route.http_method, url, http_request.body, name)
                span.set_attribute("http.response.status_code", status)
                self._last_trace_id = _trace_id_of(headers.get("traceparent")) or _current_trace_id()
                if status < 400:
                    break
                span.set_attribute("error.type", str(status))
                if status != 429 or attempt == RATE_LIMITED_ATTEMPTS:
                    raise GatewayCallError(f"{name}: {_status_text(status, text)}", status)
            # The gateway rejects a rate-limited request before it calls a service, so a retry is safe.
            await asyncio.sleep(_retry_after_seconds(headers.get("Retry-After")))

        try:
            return json_format.Parse(text, response_type(), ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise GatewayCallError(
                f"{name}: the response is not a valid {response_type.__name__}: {exc}"
            ) from exc

    async def _send(
        self, method: str, url: URL, body: dict[str, Any] | None, name: str
    ) -> tuple[int, Mapping[str, str], str]:
        """Send one request with the token and the current trace context.

        Returns the HTTP status, the response headers and the body text.
        Errors are GatewayCallError messages that start with name.
        """
        headers = {
            "Authorization": f"Bearer {self._token}",
            # The gateway gives its backend call at most this many seconds.
            "Request-Timeout": str(self._call_timeout),
        }
        propagate.inject(headers)
        total = self._call_timeout + RESPONSE_MARGIN
        try:
            async with self._session.request(
                method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=total)
            ) as response:
                return response.status, response.headers, await response.text()
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc)
            raise GatewayUnreachableError(
                f"{name}: cannot connect to the gateway at {self._base_url}: {reason}"
            ) from exc
        except TimeoutError as exc:
            # Before ClientError, because aiohttp's timeout errors derive from both.
            raise GatewayCallError(
                f"{name}: the gateway at {self._base_url} sent no response within {total} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise GatewayCallError(f"{name}: the HTTP request failed: {type(exc).__name__}: {exc}") from exc


@asynccontextmanager
async def open_http_client(base_url: str, token: str, call_timeout: float) -> AsyncIterator[HttpDemoClient]:
    """Open an HttpDemoClient with its own aiohttp session, closed when the block exits."""
    async with aiohttp.ClientSession() as session:
        yield HttpDemoClient(session, base_url, token, call_timeout)


def _trace_id_of(traceparent: str | None) -> str | None:
    """Return the trace id of a W3C traceparent header value, or None when it is missing or invalid."""
    if not traceparent:
        return None
    context = trace.get_current_span(_traceparent.extract({"traceparent": traceparent})).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _retry_after_seconds(value: str | None) -> float:
    """Return the seconds to wait that a Retry-After header value gives, at most MAX_RETRY_AFTER.

    An HTTP date or a missing or invalid value counts as 1 second. The gateway sends whole seconds.
    """
    try:
        seconds = float(value or "1")
    except ValueError:
        seconds = 1.0
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 1.0
    return min(seconds, MAX_RETRY_AFTER)


def _current_trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


def _status_text(http_status: int, body: str) -> str:
    """Describe an error response by its google.rpc.Status code and message, else by its body's start."""
    try:
        status = json.loads(body)
    except json.JSONDecodeError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("code"), int):
        return f"HTTP {http_status}: {body[:200]!r}"
    code = status["code"]
    code_name = code_pb2.Code.Name(code) if code in code_pb2.Code.values() else str(code)
    return f"HTTP {http_status} {code_name}: {status.get('message', '')}"
