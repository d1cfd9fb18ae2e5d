"""Unit tests of gateway/identity.py: signed identity metadata and the server interceptor.

The interceptor tests run a real grpc.aio server on 127.0.0.1 with generic
method handlers that report current_caller() as JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest

from gateway.caller import Caller
from gateway.identity import (
    EXPIRES_KEY,
    SCOPES_KEY,
    SIGNATURE_KEY,
    SUBJECT_KEY,
    IdentityError,
    IdentityInterceptor,
    current_caller,
    identity_metadata,
    verify_identity,
)
from tests.helpers import probe_channel

SECRET = "identity-secret-shared-by-gateway-and-services"
OTHER_SECRET = "identity-secret-of-somebody-else-entirely-000"
NOW = 1_750_000_000.0

ADA = Caller(subject="ada", scopes=frozenset({"orders:read", "orders:write"}))


def _replace(metadata: list[tuple[str, str]], key: str, value: str) -> list[tuple[str, str]]:
    return [(name, value if name == key else old) for name, old in metadata]


# Signing and verifying.


def test_verify_identity_round_trip() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    assert verify_identity(metadata, SECRET, now=NOW + 1) == ADA


def test_verify_identity_accepts_mapping() -> None:
    metadata = dict(identity_metadata(ADA, SECRET, now=NOW))

    assert verify_identity(metadata, SECRET, now=NOW + 1) == ADA


def test_verify_identity_no_scopes() -> None:
    caller = Caller(subject="ada", scopes=frozenset())
    metadata = identity_metadata(caller, SECRET, now=NOW)

    assert verify_identity(metadata, SECRET, now=NOW) == caller


def test_verify_identity_non_ascii_round_trip() -> None:
    caller = Caller(subject="Zoë Ångström 张伟", scopes=frozenset({"lesen:bücher", "orders:read"}))
    metadata = identity_metadata(caller, SECRET, now=NOW)

    assert verify_identity(metadata, SECRET, now=NOW) == caller


def test_identity_metadata_values_ascii() -> None:
    caller = Caller(subject="Zoë Ångström 张伟", scopes=frozenset({"lesen:bücher"}))

    metadata = identity_metadata(caller, SECRET, now=NOW)

    assert all(value.isascii() for _, value in metadata)


def test_verify_identity_scope_with_space_round_trip() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"read all", "write"}))
    metadata = identity_metadata(caller, SECRET, now=NOW)

    assert verify_identity(metadata, SECRET, now=NOW) == caller


def test_identity_metadata_keys() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    assert [key for key, _ in metadata] == [SUBJECT_KEY, SCOPES_KEY, EXPIRES_KEY, SIGNATURE_KEY]


def test_identity_metadata_expires_after_lifetime() -> None:
    metadata = dict(identity_metadata(ADA, SECRET, now=NOW, lifetime=60))

    assert metadata[EXPIRES_KEY] == str(int(NOW + 60))


def test_verify_identity_tampered_scopes() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)
    tampered = _replace(metadata, SCOPES_KEY, "orders:read orders:write users:admin")

    with pytest.raises(IdentityError):
        verify_identity(tampered, SECRET, now=NOW)


def test_verify_identity_tampered_subject() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    with pytest.raises(IdentityError):
        verify_identity(_replace(metadata, SUBJECT_KEY, "root"), SECRET, now=NOW)


def test_verify_identity_extended_expiry() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    with pytest.raises(IdentityError):
        verify_identity(_replace(metadata, EXPIRES_KEY, str(int(NOW) + 86_400)), SECRET, now=NOW)


def test_verify_identity_other_secret() -> None:
    metadata = identity_metadata(ADA, OTHER_SECRET, now=NOW)

    with pytest.raises(IdentityError):
        verify_identity(metadata, SECRET, now=NOW)


def test_verify_identity_non_ascii_signature() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    with pytest.raises(IdentityError):
        verify_identity(_replace(metadata, SIGNATURE_KEY, "ü" * 43), SECRET, now=NOW)


def test_verify_identity_expired() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW, lifetime=60)

    with pytest.raises(IdentityError) as caught:
        verify_identity(metadata, SECRET, now=NOW + 61)

    assert "expired" in str(caught.value)


def test_verify_identity_at_expiry() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW, lifetime=60)

    assert verify_identity(metadata, SECRET, now=NOW + 60) == ADA


def test_verify_identity_no_metadata() -> None:
    assert verify_identity([], SECRET, now=NOW) is None


def test_verify_identity_unrelated_metadata() -> None:
    metadata = [("x-request-id", "42"), ("user-agent", "grpc-python")]

    assert verify_identity(metadata, SECRET, now=NOW) is None


def test_verify_identity_incomplete() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)
    without_signature = [(key, value) for key, value in metadata if key != SIGNATURE_KEY]

    with pytest.raises(IdentityError) as caught:
        verify_identity(without_signature, SECRET, now=NOW)

    assert SIGNATURE_KEY in str(caught.value)


def test_verify_identity_repeated_key() -> None:
    metadata = identity_metadata(ADA, SECRET, now=NOW)

    with pytest.raises(IdentityError):
        verify_identity([*metadata, (SUBJECT_KEY, "root")], SECRET, now=NOW)


def test_verify_identity_error_hides_secret() -> None:
    metadata = identity_metadata(ADA, OTHER_SECRET, now=NOW)

    with pytest.raises(IdentityError) as caught:
        verify_identity(metadata, SECRET, now=NOW)

    assert SECRET not in str(caught.value)


def test_identity_metadata_short_secret() -> None:
    with pytest.raises(ValueError):
        identity_metadata(ADA, "short", now=NOW)


def test_identity_metadata_zero_lifetime() -> None:
    with pytest.raises(ValueError):
        identity_metadata(ADA, SECRET, now=NOW, lifetime=0)


# The interceptor on a real server.

SERVICE = "tidings.test.v1.IdentityProbe"


def _caller_json(caller: Caller | None) -> bytes:
    if caller is None:
        return b"null"
    return json.dumps({"subject": caller.subject, "scopes": sorted(caller.scopes)}).encode()


async def _who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _caller_json(current_caller())


async def _who_am_i_generator(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield _caller_json(current_caller())
    yield _caller_json(current_caller())


async def _who_am_i_writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(_caller_json(current_caller()))


async def _who_am_i_client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    async for _ in requests:
        pass
    return _caller_json(current_caller())


def _probe_server(interceptor: IdentityInterceptor) -> AbstractAsyncContextManager[grpc.aio.Channel]:
    """Serve the probe methods behind interceptor on 127.0.0.1 and yield a channel to them."""
    handlers = {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i),
        "WhoAmIGenerator": grpc.unary_stream_rpc_method_handler(_who_am_i_generator),
        "WhoAmIWriter": grpc.unary_stream_rpc_method_handler(_who_am_i_writer),
        "WhoAmIClientStream": grpc.stream_unary_rpc_method_handler(_who_am_i_client_stream),
    }
    return probe_channel(interceptor, SERVICE, handlers)


async def _call_who_am_i(channel: grpc.aio.Channel, metadata: list[tuple[str, str]]) -> Any:
    response = await channel.unary_unary(f"/{SERVICE}/WhoAmI")(b"", metadata=metadata, timeout=10)
    return json.loads(response)


async def _stream_who_am_i(
    channel: grpc.aio.Channel, method: str, metadata: list[tuple[str, str]]
) -> list[Any]:
    call = channel.unary_stream(f"/{SERVICE}/{method}")(b"", metadata=metadata, timeout=10)
    return [json.loads(response) async for response in call]


def _fresh_metadata(caller: Caller = ADA, secret: str = SECRET) -> list[tuple[str, str]]:
    return identity_metadata(caller, secret)


ADA_JSON = {"subject": "ada", "scopes": ["orders:read", "orders:write"]}


async def test_interceptor_valid_identity() -> None:
    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        seen = await _call_who_am_i(channel, _fresh_metadata())

    assert seen == ADA_JSON


async def test_interceptor_non_ascii_subject() -> None:
    caller = Caller(subject="Zoë 张伟", scopes=frozenset({"lesen:bücher"}))

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        seen = await _call_who_am_i(channel, _fresh_metadata(caller))

    assert seen == {"subject": "Zoë 张伟", "scopes": ["lesen:bücher"]}


async def test_interceptor_forged_signature_code() -> None:
    forged = _fresh_metadata(secret=OTHER_SECRET)

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call_who_am_i(channel, forged)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_interceptor_forged_signature_message() -> None:
    forged = _fresh_metadata(secret=OTHER_SECRET)

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call_who_am_i(channel, forged)

    assert "invalid identity signature" in (caught.value.details() or "")


async def test_interceptor_expired_identity() -> None:
    expired = identity_metadata(ADA, SECRET, now=NOW)

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call_who_am_i(channel, expired)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_interceptor_no_identity() -> None:
    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        seen = await _call_who_am_i(channel, [])

    assert seen is None


async def test_interceptor_generator_stream() -> None:
    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        seen = await _stream_who_am_i(channel, "WhoAmIGenerator", _fresh_metadata())

    assert seen == [ADA_JSON, ADA_JSON]


async def test_interceptor_writer_stream() -> None:
    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        seen = await _stream_who_am_i(channel, "WhoAmIWriter", _fresh_metadata())

    assert seen == [ADA_JSON]


async def test_interceptor_forged_generator_stream() -> None:
    forged = _fresh_metadata(secret=OTHER_SECRET)

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _stream_who_am_i(channel, "WhoAmIGenerator", forged)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_interceptor_client_stream() -> None:
    async def requests() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        method = channel.stream_unary(f"/{SERVICE}/WhoAmIClientStream")
        response = await method(requests(), metadata=_fresh_metadata(), timeout=10)

    assert json.loads(response) == ADA_JSON


async def test_interceptor_without_secret_ignores_identity() -> None:
    async with _probe_server(IdentityInterceptor(None)) as channel:
        seen = await _call_who_am_i(channel, _fresh_metadata())

    assert seen is None


async def test_interceptor_without_secret_ignores_forgery() -> None:
    forged = _fresh_metadata(secret=OTHER_SECRET)

    async with _probe_server(IdentityInterceptor(None)) as channel:
        seen = await _call_who_am_i(channel, forged)

    assert seen is None


def test_interceptor_without_secret_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identity"):
        IdentityInterceptor(None)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_interceptor_without_secret_warning_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identity"):
        IdentityInterceptor(None)

    assert "not trusted" in caplog.text


def test_interceptor_with_secret_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identity"):
        IdentityInterceptor(SECRET)

    assert caplog.records == []


def test_interceptor_short_secret() -> None:
    with pytest.raises(ValueError):
        IdentityInterceptor("short")


async def test_current_caller_outside_call() -> None:
    async with _probe_server(IdentityInterceptor(SECRET)) as channel:
        await _call_who_am_i(channel, _fresh_metadata())

    assert current_caller() is None
