"""The gateway application: routes from the protos, each calling its gRPC backend."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
from aiohttp import web
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from gateway import middleware
from gateway.auth import Authenticator
from gateway.backends import open_channel
from gateway.breaker import CircuitBreaker, counts_as_failure
from gateway.cors import CorsPolicy
from gateway.errors import ERROR_DOMAIN, HTTP_STATUS_OF_CODE, error_response, status_response
from gateway.identity import identity_metadata
from gateway.ratelimit import TokenBuckets, retry_after_header
from gateway.routes import EVENTS_PATH, EVENTS_SCOPE, Route, load_routes
from gateway.settings import GatewaySettings
from gateway.transcode import (
    RequestError,
    build_request,
    parse_body,
    response_json,
    with_json_field_names,
)
from services.runtime.config import Settings

logger = logging.getLogger("gateway.app")

# Headers passed on to the services as gRPC metadata of the same name.
FORWARDED_HEADERS = ("x-request-id", "accept-language")
REQUEST_TIMEOUT_HEADER = "Request-Timeout"

# The checked-in contract documents (scripts/generate_api_docs.py), served as they are.
API_DIRECTORY = Path(__file__).parent / "api"
API_DOCUMENTS = ("openapi.json", "asyncapi.json")

Call = Callable[..., Awaitable[Message]]


def _metadata_value(value: str) -> str:
    """Make a header value safe for gRPC metadata, which must be printable ASCII.

    Non-ASCII text is percent-encoded as UTF-8 (bytes that were not UTF-8
    keep their original value), so the service gets it back with unquote().
    """
    if value.isascii() and value.isprintable():
        return value
    return quote(value.encode("utf-8", "surrogateescape"), safe=" !\"#$&'()*+,/:;<=>?@[\\]^`{|}~")


def _grpc_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status(code=error.code().value[0], message=error.details() or "")


class Gateway:
    """Owns the channels, breakers and limits; builds the aiohttp application."""

    def __init__(
        self,
        settings: GatewaySettings,
        runtime_settings: Settings,
        *,
        events: Any | None = None,
        identity_secret: str | None = None,
    ) -> None:
        self.settings = settings
        self.routes = load_routes()
        self.events = events
        self._identity_secret = identity_secret
        self._documents: dict[str, str] = {}
        self._open_streams: Counter[str] = Counter()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[Route, Call] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._authenticator = Authenticator.from_settings(settings) if settings.auth_enabled else None

        by_backend: dict[str, list[Route]] = defaultdict(list)
        for route in self.routes:
            by_backend[route.backend].append(route)
        for backend, routes in by_backend.items():
            addresses = settings.backends.get(backend) or runtime_settings.address_of(backend)
            channel = open_channel(backend, addresses, routes, settings)
            self._channels[backend] = channel
            self.breakers[backend] = CircuitBreaker(
                settings.breaker_failures, settings.breaker_reset, name=backend
            )
            for route in routes:
                self._calls[route] = channel.unary_unary(
                    route.grpc_method,
                    request_serializer=route.request_class.SerializeToString,
                    response_deserializer=route.response_class.FromString,
                )

    def application(self) -> web.Application:
        """Build the aiohttp application with every route and middleware."""
        app = web.Application(
            client_max_size=self.settings.max_body_bytes,
            middlewares=[
                middleware.tracing,
                middleware.errors,
                middleware.header_limit(self.settings.max_header_bytes),
                middleware.cors(CorsPolicy.from_settings(self.settings)),
                middleware.guard(self._authenticator, TokenBuckets.from_settings(self.settings)),
            ],
        )
        protected: dict[tuple[str, str], middleware.Protected] = {}
        resources: dict[str, web.Resource] = {}
        for route in self.routes:
            resource = resources.get(route.aiohttp_path)
            if resource is None:
                resource = resources[route.aiohttp_path] = app.router.add_resource(route.aiohttp_path)
            resource.add_route(route.http_method, self._handler(route))
            protected[(route.http_method, resource.canonical)] = middleware.Protected(
                route.template, route.scope
            )

        if self.events is not None:
            app.router.add_get(EVENTS_PATH, self._stream_events)
            protected[("GET", EVENTS_PATH)] = middleware.Protected(EVENTS_PATH, EVENTS_SCOPE)
        app.router.add_get("/healthz", self._healthz)
        for name in API_DOCUMENTS:
            app.router.add_get(f"/{name}", self._document)
        app[middleware.PROTECTED] = protected
        app[middleware.MAX_BODY_BYTES] = self.settings.max_body_bytes
        app.on_shutdown.append(self._on_shutdown)
        app.on_response_prepare.append(middleware.add_response_headers)
        return app

    def _handler(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._call(route, request)

        return handle

    async def _call(self, route: Route, request: web.Request) -> web.StreamResponse:
        try:
            body = None
            if route.body:
                content_type = request.content_type if "Content-Type" in request.headers else ""
                body = parse_body(await request.read(), content_type)
            message = build_request(route, request.match_info, request.query, body)
            timeout = self._timeout(request)
        except RequestError as exc:
            if exc.field == "Content-Type":
                return error_response(415, f"invalid request: {exc}", reason="UNSUPPORTED_MEDIA_TYPE")
            return error_response(
                400, f"invalid request: {exc}", reason="INVALID_ARGUMENT", details=[exc.violation()]
            )

        breaker = self.breakers[route.backend]
        if not breaker.allow():
            wait = breaker.retry_after()
            return error_response(
                503,
                f"the {route.backend} service is failing; the gateway stopped calling it for "
                f"{math.ceil(wait)} s",
                reason="BACKEND_CIRCUIT_OPEN",
                headers={"Retry-After": retry_after_header(wait)},
            )

        request_id = request[middleware.REQUEST_ID]
        try:
            reply = await self._calls[route](
                message, timeout=timeout, metadata=self._metadata(request, request_id)
            )
        except grpc.aio.AioRpcError as exc:
            self._record(breaker, exc.code())
            return self._error_of(route, exc, request_id)
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        return web.Response(text=response_json(reply), content_type="application/json")

    @staticmethod
    def _record(breaker: CircuitBreaker, code: grpc.StatusCode) -> None:
        if counts_as_failure(code):
            breaker.record_failure()
        else:
            breaker.record_success()

    def _error_of(self, route: Route, error: grpc.aio.AioRpcError, request_id: str) -> web.Response:
        status = _grpc_status(error)
        with_json_field_names(status, route.request_class.DESCRIPTOR)
        headers = {}
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            logger.warning(
                "backend call failed",
                extra={"backend": route.backend, "method": route.operation, "code": error.code().name,
                       "request_id": request_id},
            )
            if not status.details:
                # gRPC's own text names addresses and resolver internals.
                timed_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                status.message = (
                    f"the {route.backend} service did not answer in time; retry later, or allow more "
                    f"time with the {REQUEST_TIMEOUT_HEADER} header"
                    if timed_out
                    else f"the {route.backend} service is unavailable; retry later"
                )
                info = error_details_pb2.ErrorInfo(
                    reason="BACKEND_TIMEOUT" if timed_out else "BACKEND_UNAVAILABLE",
                    domain=ERROR_DOMAIN, metadata={"backend": route.backend},
                )
                status.details.add().Pack(info)
            headers["Retry-After"] = "1"
        return status_response(status, http_status=HTTP_STATUS_OF_CODE.get(status.code, 500), headers=headers)

    def _timeout(self, request: web.Request) -> float:
        limit = self.settings.backend_timeout
        text = request.headers.get(REQUEST_TIMEOUT_HEADER)
        if text is None:
            return limit
        try:
            requested = float(text)
        except ValueError:
            requested = math.nan
        if not math.isfinite(requested) or requested <= 0:
            raise RequestError(REQUEST_TIMEOUT_HEADER, f"expected seconds greater than 0, got {text!r}")
        return min(requested, limit)

    def _metadata(self, request: web.Request, request_id: str) -> list[tuple[str, str]]:
        metadata = [("x-request-id", _metadata_value(request_id))]
        metadata.extend(
            (name, _metadata_value(request.headers[name]))
            for name in FORWARDED_HEADERS[1:]
            if name in request.headers
        )
        caller = request.get(middleware.CALLER)
        if caller is not None and self._identity_secret:
            metadata.extend(identity_metadata(caller, self._identity_secret))
        return metadata

    async def _stream_events(self, request: web.Request) -> web.StreamResponse:
        """Serve the event stream, at most max_streams_per_caller at once for each caller."""
        assert self.events is not None
        caller = request.get(middleware.CALLER)
        key = caller.subject if caller is not None else f"address:{request.remote}"
        limit = self.settings.max_streams_per_caller
        if self._open_streams[key] >= limit:
            return error_response(
                429,
                f"{limit} event streams are open for this caller already; close one, or combine "
                "subjects with a wildcard such as tidings.orders.>",
                reason="TOO_MANY_STREAMS",
                headers={"Retry-After": "5"},
            )
        self._open_streams[key] += 1
        try:
            return await self.events.handle(request)
        finally:
            self._open_streams[key] -= 1
            if not self._open_streams[key]:
                del self._open_streams[key]

    async def _document(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        text = self._documents.get(name)
        if text is None:
            text = self._documents[name] = (API_DIRECTORY / name).read_text()
        return web.Response(text=text, content_type="application/json")

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def _on_shutdown(self, app: web.Application) -> None:
        if self.events is not None:
            await self.events.close()

    async def close(self) -> None:
        """Close every backend channel."""
        for channel in self._channels.values():
            await channel.close()

    def channels(self) -> Mapping[str, grpc.aio.Channel]:
        """Return the backend channels by backend name, for readiness checks."""
        return self._channels
