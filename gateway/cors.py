"""CORS decisions for browser clients: preflight responses and headers of actual responses.

Pure logic with no I/O, so the HTTP layer only copies the status and headers
these methods return. The rules follow the Fetch standard's CORS protocol
(https://fetch.spec.whatwg.org/#http-cors-protocol).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gateway.settings import GatewaySettings

WILDCARD = "*"

DEFAULT_ALLOWED_METHODS: tuple[str, ...] = ("GET", "POST", "PATCH", "DELETE")

# Request headers a browser may send beyond the CORS-safelisted ones:
# credentials, JSON bodies, SSE resumption, W3C trace context and the
# client's deadline.
DEFAULT_ALLOWED_HEADERS: tuple[str, ...] = (
    "Authorization",
    "Content-Type",
    "Last-Event-ID",
    "traceparent",
    "tracestate",
    "Request-Timeout",
    "X-Request-Id",
)

# Response headers that browser scripts may read besides the safelisted ones.
DEFAULT_EXPOSED_HEADERS: tuple[str, ...] = ("Retry-After", "traceparent", "X-Request-Id")

# Every preflight response depends on these request headers, so shared caches
# must key on them.
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class CorsPolicy:
    """Allowed origins, methods and headers, and the CORS headers they produce.

    An origin matches a configured one exactly, except that the scheme and host
    of configured origins are compared in lower case as browsers send them.
    ``*`` in origins allows every origin and is only valid without credentials,
    because browsers reject a credentialed response whose allowed origin is ``*``.
    """

    def __init__(
        self,
        origins: Sequence[str],
        allow_credentials: bool = False,
        max_age: int = 600,
        allowed_headers: Sequence[str] = DEFAULT_ALLOWED_HEADERS,
        exposed_headers: Sequence[str] = DEFAULT_EXPOSED_HEADERS,
        allowed_methods: Sequence[str] = DEFAULT_ALLOWED_METHODS,
    ) -> None:
        """Build a policy; raise ValueError on a combination browsers would reject.

        Args:
            origins: Allowed origins such as ``https://app.example``, or ``*``.
            allow_credentials: Whether browsers may send cookies and
                Authorization with cross-origin requests.
            max_age: Seconds a browser may cache a preflight response.
            allowed_headers: Request header names, matched case-insensitively.
            exposed_headers: Response header names that scripts may read.
            allowed_methods: Methods, matched case-sensitively as the Fetch
                standard requires (a browser sends ``patch`` as written).
        """
        if allow_credentials and WILDCARD in origins:
            raise ValueError(
                "CORS credentials cannot be combined with the origin *. "
                "List the allowed origins explicitly or turn credentials off."
            )
        if max_age < 0:
            raise ValueError(f"CORS max_age must be 0 or more seconds, got {max_age}")

        self._allow_any_origin = WILDCARD in origins
        self._origins = frozenset(origin.lower() for origin in origins if origin != WILDCARD)
        self._allow_credentials = allow_credentials
        self._max_age = max_age
        self._methods = tuple(allowed_methods)
        self._allowed_headers = tuple(allowed_headers)
        self._allowed_header_keys = frozenset(name.lower() for name in allowed_headers)
        self._exposed_headers = tuple(exposed_headers)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> CorsPolicy:
        """Build the policy from the cors_* settings, with the default headers where none are set."""
        return cls(
            origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            max_age=settings.cors_max_age,
            allowed_headers=settings.cors_allowed_headers or DEFAULT_ALLOWED_HEADERS,
            exposed_headers=settings.cors_exposed_headers or DEFAULT_EXPOSED_HEADERS,
        )

    @staticmethod
    def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
        """Return whether a request is a CORS preflight.

        A preflight is an OPTIONS request with both Origin and
        Access-Control-Request-Method. Header names are matched
        case-insensitively, so a plain dict works as well as aiohttp's headers.
        """
        if method != "OPTIONS":
            return False
        names = {name.lower() for name in headers}
        return "origin" in names and "access-control-request-method" in names

    def is_origin_allowed(self, origin: str | None) -> bool:
        """Return whether the policy allows requests from origin."""
        if origin is None:
            return False
        return self._allow_any_origin or origin in self._origins

    def preflight(
        self, origin: str | None, request_method: str | None, request_headers: str | None
    ) -> tuple[int, dict[str, str]]:
        """Return the HTTP status and headers of the response to a preflight request.

        Args:
            origin: The Origin request header.
            request_method: The Access-Control-Request-Method request header.
            request_headers: The Access-Control-Request-Headers request header,
                a comma-separated list of names.

        Returns:
            204 with the Access-Control-Allow-* headers when origin, method and
            every requested header are allowed. Otherwise 403 with only Vary,
            which the browser treats as a failed preflight. A missing origin or
            method also gets 403.
        """
        headers = {"Vary": PREFLIGHT_VARY}
        if origin is None or not self.is_origin_allowed(origin):
            return 403, headers
        if request_method not in self._methods or not self._are_headers_allowed(request_headers):
            return 403, headers

        headers["Access-Control-Allow-Origin"] = self._allow_origin_value(origin)
        if self._allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Allow-Methods"] = ", ".join(self._methods)
        if self._allowed_headers:
            headers["Access-Control-Allow-Headers"] = ", ".join(self._allowed_headers)
        headers["Access-Control-Max-Age"] = str(self._max_age)
        return 204, headers

    def rejection(
        self, origin: str | None, request_method: str | None, request_headers: str | None
    ) -> str:
        """Return why preflight rejects a request, naming the origin, method or header."""
        if origin is None:
            return "the preflight has no Origin header"
        if not self.is_origin_allowed(origin):
            return f"origin {origin!r} is not in TIDINGS_GATEWAY_CORS_ORIGINS"
        if request_method not in self._methods:
            return f"method {request_method!r} is not allowed; allowed: {', '.join(self._methods)}"
        rejected = [
            name.strip() for name in (request_headers or "").split(",")
            if name.strip() and name.strip().lower() not in self._allowed_header_keys
        ]
        allowed = ", ".join(self._allowed_headers)
        return f"request header {', '.join(rejected)!r} is not allowed; allowed: {allowed}"

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Return the CORS headers to add to an actual, non-preflight response.

        An allowed origin gets Access-Control-Allow-Origin, the credentials flag
        when configured and Access-Control-Expose-Headers. Every response gets
        ``Vary: Origin`` because its headers depend on the Origin request header.
        """
        headers = {"Vary": "Origin"}
        if origin is None or not self.is_origin_allowed(origin):
            return headers

        headers["Access-Control-Allow-Origin"] = self._allow_origin_value(origin)
        if self._allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        if self._exposed_headers:
            headers["Access-Control-Expose-Headers"] = ", ".join(self._exposed_headers)
        return headers

    def _allow_origin_value(self, origin: str) -> str:
        # The constructor rejects * with credentials, so a credentialed policy
        # always echoes the exact origin.
        if self._allow_any_origin and not self._allow_credentials:
            return WILDCARD
        return origin

    def _are_headers_allowed(self, request_headers: str | None) -> bool:
        if request_headers is None:
            return True
        requested = (name.strip().lower() for name in request_headers.split(","))
        return all(name in self._allowed_header_keys for name in requested if name)
