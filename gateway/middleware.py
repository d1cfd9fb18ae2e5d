"""aiohttp middlewares of the gateway, outermost first.

    tracing         SERVER span from the client's traceparent, access log
    errors          any exception becomes a google.rpc.Status JSON body
    header_limit    431 for oversized headers
    cors            replies to preflights; adds allow-origin to responses
    guard           bearer token, scopes, rate limit for routes that need them

opentelemetry-instrumentation-aiohttp-server is not used: it is not
published for the instrumentation release this project pins, and the span
here is a dozen lines that also name the route template and the caller.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.auth import Authenticator, AuthError, require_scopes
from gateway.caller import Caller
from gateway.cors import CorsPolicy
from gateway.errors import ERROR_MESSAGE, ERROR_REASON, error_response
from gateway.ratelimit import TokenBuckets, retry_after_header
from gateway.routes import EVENTS_PATH
from observability.propagation import extract_context

logger = logging.getLogger("gateway.http")
_tracer = trace.get_tracer("tidings.gateway")
_traceparent = TraceContextTextMapPropagator()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Keys the middlewares leave on the request for the handlers after them.
CALLER = web.RequestKey("caller", Caller)
REQUEST_ID = web.RequestKey("request_id", str)
# Headers every response gets when it is prepared, streamed ones included.
RESPONSE_HEADERS = web.RequestKey("response_headers", dict[str, str])


@dataclass(frozen=True)
class Protected:
    """Requirements of a route toward its caller: its template (for names) and its scope."""

    template: str
    scope: str


MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)

# Routes not listed here (health, API documents) are open to anyone.
PROTECTED = web.AppKey("protected", dict[tuple[str, str], Protected])


def _route_template(request: web.Request) -> str | None:
    protected = request.app[PROTECTED].get(_route_key(request))
    if protected is not None:
        return protected.template
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def _route_key(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    return request.method, resource.canonical if resource is not None else ""


@web.middleware
async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Start the SERVER span of the request, continuing a valid client traceparent."""
    template = _route_template(request)
    name = f"{request.method} {template}" if template else request.method
    started = time.perf_counter()
    with _tracer.start_as_current_span(
        name,
        context=extract_context(request.headers),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            **({"http.route": template} if template else {}),
        },
    ) as span:
        # Lets a client (and `tidings demo`) name the trace it started.
        carrier: dict[str, str] = {}
        _traceparent.inject(carrier)
        request_id = _request_id(request)
        request[REQUEST_ID] = request_id
        request[RESPONSE_HEADERS] = {**carrier, "X-Request-Id": request_id}

        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        caller = request.get(CALLER)
        entry = {
            "method": request.method,
            "route": template,
            "status": response.status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "subject": caller.subject if caller else None,
            "request_id": request_id,
        }
        if response.status >= 400:
            # The reason and message are the ones the client got, so the log reveals nothing new.
            entry["reason"] = response.get(ERROR_REASON) or None
            entry["error"] = response.get(ERROR_MESSAGE)
        logger.info("request", extra=entry)
        return response


def _request_id(request: web.Request) -> str:
    """Return the client's X-Request-Id when it is 1 to 128 characters, else a new UUID."""
    client_id = request.headers.get("X-Request-Id", "")
    return client_id if 0 < len(client_id) <= 128 else str(uuid.uuid4())


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers collected on the request, on aiohttp's on_response_prepare signal.

    The signal also fires for streamed responses (server-sent events) that a
    handler prepares itself, where headers set after the handler are too late.
    """
    response.headers.update(request.get(RESPONSE_HEADERS, {}))
    # aiohttp would announce its own and Python's version to every client.
    response.headers["Server"] = "tidings-gateway"


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors and unexpected exceptions into google.rpc.Status bodies."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            413,
            f"request body is larger than {request.app[MAX_BODY_BYTES]} bytes; send a smaller body",
            reason="BODY_TOO_LARGE",
        )
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
            reason="METHOD_NOT_ALLOWED",
            headers={"Allow": allowed},
        )
    except web.HTTPNotFound:
        return error_response(
            404, f"no route for {request.method} {request.path}; see /openapi.json", reason="NO_ROUTE"
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, reason="HTTP_ERROR")
    except Exception:
        logger.exception("request failed", extra={"method": request.method, "path": request.path})
        return error_response(500, "the gateway failed to handle the request", reason="INTERNAL")


def header_limit(max_bytes: int) -> Middleware:
    """Return a middleware that rejects requests with 431 when their headers exceed max_bytes in total."""

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > max_bytes:
            return error_response(
                431,
                f"request headers total {size} bytes, more than the {max_bytes} allowed; send fewer or "
                "shorter headers",
                reason="HEADERS_TOO_LARGE",
            )
        return await handler(request)

    return limit


def cors(policy: CorsPolicy) -> Middleware:
    """Return a middleware that replies to preflights and adds CORS headers to responses."""

    @web.middleware
    async def apply(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if policy.is_preflight(request.method, request.headers):
            status, headers = policy.preflight(
                origin,
                request.headers.get("Access-Control-Request-Method"),
                request.headers.get("Access-Control-Request-Headers"),
            )
            if status >= 400:
                cause = policy.rejection(
                    origin,
                    request.headers.get("Access-Control-Request-Method"),
                    request.headers.get("Access-Control-Request-Headers"),
                )
                return error_response(
                    status, f"cross-origin request rejected: {cause}", reason="CORS_REJECTED", headers=headers
                )
            return web.Response(status=status, headers=headers)

        if RESPONSE_HEADERS in request:
            request[RESPONSE_HEADERS].update(policy.response_headers(origin))
        return await handler(request)

    return apply


def _authorization(request: web.Request, protected: Protected) -> str | None:
    """Return the Authorization header, or for the event stream an ``access_token`` query parameter.

    A browser's EventSource cannot send headers, so the event stream also
    takes the token as RFC 6750 section 2.3 allows. Only there: a token in a
    URL can end up in proxy and browser history.
    """
    header = request.headers.get("Authorization")
    if header is None and protected.template == EVENTS_PATH and "access_token" in request.query:
        return f"Bearer {request.query['access_token']}"
    return header


def guard(
    authenticator: Authenticator | None, buckets: TokenBuckets
) -> Middleware:
    """Return a middleware that authenticates, checks scopes and rate-limits protected routes.

    With authenticator None (auth turned off for local tests) every caller is
    anonymous with every scope, and the limit applies per client address.
    """

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        protected = request.app[PROTECTED].get(_route_key(request))
        if protected is None:
            return await handler(request)

        if authenticator is not None:
            try:
                caller = authenticator.authenticate(_authorization(request, protected))
                require_scopes(caller, [protected.scope])
            except AuthError as exc:
                return error_response(
                    exc.http_status, exc.message, reason=exc.reason,
                    headers={"WWW-Authenticate": exc.www_authenticate},
                )
            request[CALLER] = caller
            key = (caller.subject, request.method, protected.template)
        else:
            key = (f"address:{request.remote}", request.method, protected.template)

        wait = buckets.take(key)
        if wait > 0:
            return error_response(
                429,
                f"rate limit of {request.method} {protected.template} reached; retry after "
                f"{math.ceil(wait)} s",
                reason="RATE_LIMITED",
                headers={"Retry-After": retry_after_header(wait)},
            )
        return await handler(request)

    return check
