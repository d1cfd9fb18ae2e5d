"""Caller identity that the gateway forwards to the services, signed so that only the gateway can make one.

The gateway adds four metadata entries to each backend call:

- ``x-tidings-subject``: the caller's subject, percent-encoded;
- ``x-tidings-scopes``: the caller's scopes, each percent-encoded, sorted and space-separated;
- ``x-tidings-identity-expires``: the expiry as integer unix seconds;
- ``x-tidings-identity-signature``: the unpadded base64url HMAC-SHA256, keyed with the
  identity secret, of the three values above.

Percent-encoding keeps the values ASCII, as gRPC requires of metadata, for
subjects and scopes with any Unicode characters. A service trusts the identity
only when the signature matches its copy of the secret and the expiry has not
passed, so its clock must not run ahead of the gateway's by more than the
lifetime. IdentityInterceptor makes that check on every call and exposes the
caller through current_caller().

The signature does not bind the identity to one call, so anyone who can read
the metadata in transit can replay it to any service until it expires. The
links between the gateway and the services therefore need TLS outside a
trusted network.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote

import grpc

from gateway.caller import MIN_HMAC_SECRET_BYTES, Caller

logger = logging.getLogger(__name__)

SUBJECT_KEY = "x-tidings-subject"
SCOPES_KEY = "x-tidings-scopes"
EXPIRES_KEY = "x-tidings-identity-expires"
SIGNATURE_KEY = "x-tidings-identity-signature"
IDENTITY_KEYS = (SUBJECT_KEY, SCOPES_KEY, EXPIRES_KEY, SIGNATURE_KEY)

# Prefixed to the signed values so that a MAC made with the same secret for
# another purpose can never pass as an identity signature.
_SIGNATURE_CONTEXT = b"tidings-identity-v1"

_current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "tidings_current_caller", default=None
)


class IdentityError(Exception):
    """Identity metadata that is incomplete, forged, tampered with or expired."""


def _secret_bytes(secret: str | bytes) -> bytes:
    secret_bytes = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(secret_bytes) < MIN_HMAC_SECRET_BYTES:
        raise ValueError(
            f"the identity secret is {len(secret_bytes)} bytes long; use at least {MIN_HMAC_SECRET_BYTES}"
        )
    return secret_bytes


def _signature(secret: bytes, subject: str, scopes: str, expires: str) -> str:
    """Return the unpadded base64url HMAC-SHA256 of the encoded metadata values."""
    # Encoded values contain no newline, so joining them with one is unambiguous.
    message = b"\n".join(
        [_SIGNATURE_CONTEXT, subject.encode("ascii"), scopes.encode("ascii"), expires.encode("ascii")]
    )
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _encode(value: str) -> str:
    # Only unreserved characters (RFC 3986 section 2.3) stay as they are.
    return quote(value, safe="")


def identity_metadata(
    caller: Caller, secret: str | bytes, *, now: float | None = None, lifetime: float = 60.0
) -> list[tuple[str, str]]:
    """Return the signed metadata entries that forward caller to a service for lifetime seconds."""
    if lifetime <= 0:
        raise ValueError(f"lifetime must be positive, got {lifetime}")
    issued = time.time() if now is None else now
    subject = _encode(caller.subject)
    scopes = " ".join(sorted(_encode(scope) for scope in caller.scopes))
    expires = str(int(issued + lifetime))
    signature = _signature(_secret_bytes(secret), subject, scopes, expires)
    return [
        (SUBJECT_KEY, subject),
        (SCOPES_KEY, scopes),
        (EXPIRES_KEY, expires),
        (SIGNATURE_KEY, signature),
    ]


def _identity_entries(metadata: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    """Return the identity entries of metadata by key; raise IdentityError on a repeated key."""
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    entries: dict[str, str] = {}
    for raw_key, value in pairs:
        key = raw_key.lower()
        if key not in IDENTITY_KEYS:
            continue
        if key in entries:
            raise IdentityError(f"identity metadata {key} was sent more than once")
        if not isinstance(value, str):
            raise IdentityError(f"identity metadata {key} must be text, not {type(value).__name__}")
        entries[key] = value
    return entries


def _decode(value: str, key: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise IdentityError(f"identity metadata {key} is not percent-encoded UTF-8") from None


def verify_identity(
    metadata: Mapping[str, str] | Sequence[tuple[str, str]], secret: str | bytes, *, now: float | None = None
) -> Caller | None:
    """Return the caller that signed identity metadata forwards, or None when it contains none.

    Raise IdentityError when an identity entry is missing or repeated, the
    signature does not match secret, or the identity has expired.
    """
    entries = _identity_entries(metadata)
    if not entries:
        return None
    missing = [key for key in IDENTITY_KEYS if key not in entries]
    if missing:
        raise IdentityError(f"incomplete identity metadata: missing {', '.join(missing)}")

    subject, scopes, expires = entries[SUBJECT_KEY], entries[SCOPES_KEY], entries[EXPIRES_KEY]
    if not all(value.isascii() for value in (subject, scopes, expires)):
        raise IdentityError("identity metadata values must be ASCII")
    expected = _signature(_secret_bytes(secret), subject, scopes, expires)
    if not hmac.compare_digest(expected.encode("ascii"), entries[SIGNATURE_KEY].encode("utf-8")):
        raise IdentityError(
            "invalid identity signature; the gateway and this service must share the same identity secret"
        )

    # The signature covers expires, so this runs only on values the gateway made.
    if not expires.isdecimal():
        raise IdentityError(f"identity metadata {EXPIRES_KEY} must be integer unix seconds")
    checked_at = time.time() if now is None else now
    if checked_at > int(expires):
        raise IdentityError(
            f"the forwarded identity expired {checked_at - int(expires):.0f} s ago; "
            "check that the clocks of the gateway and this service agree"
        )

    return Caller(
        subject=_decode(subject, SUBJECT_KEY),
        scopes=frozenset(_decode(scope, SCOPES_KEY) for scope in scopes.split(" ") if scope),
    )


def current_caller() -> Caller | None:
    """Return the verified caller of the gRPC call being handled, or None.

    It is None when the call carried no identity metadata, and on every call
    of a server whose IdentityInterceptor has no secret.
    """
    return _current_caller.get()


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Verify the forwarded identity of each call and expose it through current_caller().

    A call with forged, tampered, expired or incomplete identity metadata ends
    with UNAUTHENTICATED before the servicer runs. Without a secret, identity
    metadata is ignored and current_caller() is None on every call.
    """

    def __init__(self, secret: str | bytes | None) -> None:
        self._secret = None if secret is None else _secret_bytes(secret)
        if self._secret is None:
            logger.warning(
                "identity metadata is not trusted because no identity secret is set; "
                "current_caller() returns None on every call"
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        caller: Caller | None = None
        rejection: str | None = None
        if self._secret is not None:
            try:
                caller = verify_identity(handler_call_details.invocation_metadata or (), self._secret)
            except IdentityError as exc:
                rejection = str(exc)
                logger.info(
                    "call rejected: invalid identity metadata",
                    extra={"rpc_method": handler_call_details.method, "error": rejection},
                )
        if caller is None and rejection is None:
            # Nothing to expose: keep the hot path free of a wrapper per call.
            return handler
        return _with_caller(handler, caller, rejection)


def _with_caller(
    handler: grpc.RpcMethodHandler, caller: Caller | None, rejection: str | None
) -> grpc.RpcMethodHandler:
    """Return handler with its behavior run with current_caller() set, or aborted on rejection.

    Behaviors must be coroutine or async generator functions, as grpc.aio
    servicers are; a plain function is awaited and fails.
    """
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _single_response(handler.unary_unary, caller, rejection),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _single_response(handler.stream_unary, caller, rejection),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _response_stream(handler.unary_stream, caller, rejection),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        _response_stream(handler.stream_stream, caller, rejection),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _single_response(
    behavior: Callable[..., Any], caller: Caller | None, rejection: str | None
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if rejection is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, rejection)
        token = _current_caller.set(caller)
        try:
            return await behavior(request, context)
        finally:
            _current_caller.reset(token)

    return run


def _response_stream(
    behavior: Callable[..., Any], caller: Caller | None, rejection: str | None
) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
    """Wrap a streaming behavior, keeping its form: an async generator or a coroutine that writes."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if rejection is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, rejection)
            # Each step of the generator runs in the context of the task that
            # consumes it. An abandoned generator may be closed from another
            # task, where ContextVar.reset would raise, so the previous value
            # is restored with set instead.
            previous = _current_caller.get()
            _current_caller.set(caller)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                _current_caller.set(previous)

        return stream

    return _single_response(behavior, caller, rejection)
