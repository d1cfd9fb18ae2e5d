"""Bad requests at the gateway: each gets a clear status and error body, and writes nothing."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.runtime.config import Settings
from tests.integration.gateway_fixtures import (
    JWT_SECRET,
    Api,
    gateway_settings,
    running_gateway,
    running_system,
)

ISSUER = "https://issuer.test"
AUDIENCE = "tidings-gateway"


def reason(body: Any) -> str:
    """The ErrorInfo reason of a google.rpc.Status JSON body."""
    for detail in body.get("details", []):
        if detail["@type"].endswith("google.rpc.ErrorInfo"):
            return str(detail["reason"])
    return ""


def violated_fields(body: Any) -> list[str]:
    """The fields named by the BadRequest detail of a google.rpc.Status JSON body."""
    return [
        violation["field"]
        for detail in body.get("details", [])
        if detail["@type"].endswith("google.rpc.BadRequest")
        for violation in detail["fieldViolations"]
    ]


def hs256(claims: dict[str, Any], secret: str = JWT_SECRET, **headers: Any) -> str:
    now = int(time.time())
    full = {"sub": "ada", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
            "scope": "users:read users:write orders:write", **claims}
    return jwt.encode(full, secret, algorithm="HS256", headers=headers or None)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return path


@pytest.fixture
async def api(settings: Settings, public_key_file: Path) -> AsyncIterator[Api]:
    gateway = gateway_settings(
        jwt_public_key_file=public_key_file,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_leeway=30.0,
        max_body_bytes=4096,
        max_header_bytes=4096,
        cors_origins=("https://app.example",),
        cors_allow_credentials=True,
    )
    async with running_system(settings, ["users"]), running_gateway(settings, gateway) as (_, client):
        client.bearer = hs256({})
        yield client


async def users_written(api: Api) -> int:
    _, body, _ = await api.call("GET", "/v1/users")
    return len(body["users"])


# Malformed and mistyped bodies.

@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"email": "ada@example.com", ', "body"),
        ('{"email": 5, "displayName": "Ada"}', "user.email"),
        ('{"emial": "ada@example.com", "displayName": "Ada"}', "user.emial"),
        ('{"email": "ada@example.com", "displayName": "Ada", "isAdmin": true}', "user.isAdmin"),
        ('{"email": "ada@example.com", "display_name": "A", "displayName": "B"}', "user.displayName"),
        ('{"email": "ada@example.com", "revision": "twelve"}', "user.revision"),
        ('{"email": "ada@example.com", "createTime": "yesterday"}', "user.createTime"),
        ('["ada@example.com"]', "user"),
        ('{"email": "ada@example.com", "createTime": {"seconds": 1}}', "user.createTime"),
        ('[' * 1500 + ']' * 1500, "body"),
    ],
    ids=["malformed", "wrong-type", "misspelled", "stray", "twice", "bad-int64", "bad-timestamp", "array",
         "timestamp-object", "nested-too-deep"],
)
async def test_create_user_bad_body_names_field(api: Api, body: str, field: str) -> None:
    status, reply, _ = await api.call(
        "POST", "/v1/users", data=body, headers={"Content-Type": "application/json"}
    )
    written = await users_written(api)

    assert status == 400, reply
    assert violated_fields(reply) == [field], reply
    assert written == 0, "the rejected request created a user"


async def test_place_order_stray_field_is_400(api: Api) -> None:
    status, reply, _ = await api.call(
        "POST", "/v1/orders", json={"userId": "u", "lineItems": [], "priority": "high"}
    )

    assert status == 400, reply
    assert violated_fields(reply) == ["priority"], reply


async def test_gateway_unknown_query_parameter_is_400(api: Api) -> None:
    status, reply, _ = await api.call("GET", "/v1/users?pageSise=2")

    assert status == 400, reply
    assert violated_fields(reply) == ["pageSise"], reply


async def test_gateway_non_json_content_type_is_415(api: Api) -> None:
    status, reply, _ = await api.call(
        "POST", "/v1/users", data="email=ada@example.com", headers={"Content-Type": "text/plain"}
    )
    written = await users_written(api)

    assert status == 415, reply
    assert reason(reply) == "UNSUPPORTED_MEDIA_TYPE", reply
    assert written == 0, "the rejected request created a user"


async def test_gateway_oversized_body_is_413(api: Api) -> None:
    big = {"email": "ada@example.com", "displayName": "A" * 8000}

    status, reply, _ = await api.call("POST", "/v1/users", json=big)
    written = await users_written(api)

    assert status == 413, reply
    assert reason(reply) == "BODY_TOO_LARGE", reply
    assert written == 0, "the rejected request created a user"


async def test_gateway_oversized_headers_are_431(api: Api) -> None:
    status, reply, _ = await api.call("GET", "/v1/users", headers={"X-Padding": "p" * 5000})

    assert status == 431, reply
    assert reason(reply) == "HEADERS_TOO_LARGE", reply


async def test_gateway_bad_request_timeout_header_is_400(api: Api) -> None:
    status, reply, _ = await api.call("GET", "/v1/users", headers={"Request-Timeout": "soon"})

    assert status == 400, reply
    assert violated_fields(reply) == ["Request-Timeout"], reply


async def test_gateway_unknown_route_is_404_with_status_body(api: Api) -> None:
    status, reply, _ = await api.call("GET", "/v1/usres")

    assert status == 404, reply
    assert reason(reply) == "NO_ROUTE", reply


async def test_gateway_wrong_method_is_405_with_allow(api: Api) -> None:
    status, reply, headers = await api.call("PUT", "/v1/users")

    assert status == 405, reply
    assert headers.get("Allow") == "GET, POST"


async def test_non_ascii_request_id_is_echoed(api: Api) -> None:
    status, reply, headers = await api.call("GET", "/v1/users", headers={"X-Request-Id": "zoë-42"})

    assert status == 200, reply
    assert headers.get("X-Request-Id") == "zoë-42"


# Tokens.

def _rs256(rsa_key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    full = {"sub": "ada", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600,
            "scope": "users:read users:write", **claims}
    return jwt.encode(full, rsa_key, algorithm="RS256")


def _alg_none() -> str:
    now = int(time.time())
    claims = {
        "sub": "ada", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, "scope": "users:write",
    }
    header = json.dumps({"alg": "none", "typ": "JWT"}).encode()
    body = json.dumps(claims).encode()
    return f"{jwt.utils.base64url_encode(header).decode()}.{jwt.utils.base64url_encode(body).decode()}."


async def test_gateway_rs256_token_is_accepted(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    status, _, _ = await api.call("GET", "/v1/users", bearer=_rs256(rsa_key))

    assert status == 200


async def test_gateway_missing_token_is_401(api: Api) -> None:
    status, reply, headers = await api.call("POST", "/v1/users", json={"email": "a@b.co"}, bearer=None)
    written = await users_written(api)

    assert status == 401, reply
    assert reason(reply) == "MISSING_TOKEN", reply
    assert headers.get("WWW-Authenticate") == "Bearer"
    assert written == 0, "the rejected request created a user"


async def test_gateway_alg_none_is_401(api: Api) -> None:
    status, reply, _ = await api.call("POST", "/v1/users", json={"email": "a@b.co"}, bearer=_alg_none())
    written = await users_written(api)

    assert status == 401, reply
    assert reason(reply) == "ALG_NOT_ALLOWED", reply
    assert written == 0, "the rejected request created a user"


def _hs256_signed_with_public_key(public_pem: bytes) -> str:
    """An HS256 token whose HMAC key is the server's RSA public key (PyJWT refuses to make one)."""
    now = int(time.time())
    claims = {
        "sub": "ada", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600, "scope": "users:write",
    }
    encode = jwt.utils.base64url_encode
    signing_input = encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + encode(
        json.dumps(claims).encode()
    )
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + encode(signature)).decode()


async def test_gateway_hs_rs_key_confusion_is_401(api: Api, public_key_file: Path) -> None:
    forged = _hs256_signed_with_public_key(public_key_file.read_bytes())

    status, reply, _ = await api.call("POST", "/v1/users", json={"email": "a@b.co"}, bearer=forged)
    written = await users_written(api)

    assert status == 401, reply
    assert reason(reply) == "BAD_SIGNATURE", reply
    assert written == 0, "the rejected request created a user"


async def test_gateway_bad_signature_is_401(api: Api) -> None:
    forged = hs256({}, secret="another-secret-that-is-long-enough-0123")

    status, reply, _ = await api.call("GET", "/v1/users", bearer=forged)

    assert status == 401, reply
    assert reason(reply) == "BAD_SIGNATURE", reply


async def test_gateway_expired_token_is_401(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    expired = _rs256(rsa_key, exp=int(time.time()) - 120)

    status, reply, _ = await api.call("GET", "/v1/users", bearer=expired)

    assert status == 401, reply
    assert reason(reply) == "TOKEN_EXPIRED", reply


async def test_gateway_wrong_issuer_is_401(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    status, reply, _ = await api.call("GET", "/v1/users", bearer=_rs256(rsa_key, iss="https://evil.test"))

    assert status == 401, reply
    assert reason(reply) == "WRONG_ISSUER", reply


async def test_gateway_wrong_audience_is_401(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    status, reply, _ = await api.call("GET", "/v1/users", bearer=_rs256(rsa_key, aud="billing"))

    assert status == 401, reply
    assert reason(reply) == "WRONG_AUDIENCE", reply


async def test_gateway_iat_seconds_ahead_within_leeway_is_accepted(
    api: Api, rsa_key: rsa.RSAPrivateKey
) -> None:
    status, _, _ = await api.call("GET", "/v1/users", bearer=_rs256(rsa_key, iat=int(time.time()) + 5))

    assert status == 200


async def test_gateway_iat_far_ahead_is_401(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    status, reply, _ = await api.call("GET", "/v1/users", bearer=_rs256(rsa_key, iat=int(time.time()) + 3600))

    assert status == 401, reply
    assert reason(reply) == "TOKEN_NOT_YET_VALID", reply


async def test_gateway_missing_scope_is_403(api: Api, rsa_key: rsa.RSAPrivateKey) -> None:
    reader = _rs256(rsa_key, scope="users:read")

    status, reply, _ = await api.call("POST", "/v1/users", json={"email": "a@b.co"}, bearer=reader)
    written = await users_written(api)

    assert status == 403, reply
    assert reason(reply) == "MISSING_SCOPE", reply
    assert written == 0, "the rejected request created a user"


# CORS.

async def test_gateway_preflight_from_allowed_origin_echoes_it(api: Api) -> None:
    status, reply, headers = await api.call(
        "OPTIONS", "/v1/users", bearer=None,
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )

    assert status == 204, reply
    assert headers.get("Access-Control-Allow-Origin") == "https://app.example"
    assert headers.get("Access-Control-Allow-Credentials") == "true"


async def test_preflight_disallowed_origin_is_403(api: Api) -> None:
    status, reply, headers = await api.call(
        "OPTIONS", "/v1/users", bearer=None,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )

    assert status == 403, reply
    assert headers.get("Access-Control-Allow-Origin") is None


async def test_disallowed_origin_gets_no_allow_origin(api: Api) -> None:
    _, _, headers = await api.call("GET", "/v1/users", headers={"Origin": "https://evil.example"})

    assert headers.get("Access-Control-Allow-Origin") is None


async def test_gateway_credentialed_response_never_uses_a_wildcard(api: Api) -> None:
    _, _, headers = await api.call("GET", "/v1/users", headers={"Origin": "https://app.example"})

    assert headers.get("Access-Control-Allow-Origin") == "https://app.example"


# Rate limits.

async def test_rate_limit_exhausted_is_429(settings: Settings) -> None:
    limited = gateway_settings(rate_limit_per_second=0.01, rate_limit_burst=2)
    async with running_system(settings, ["users"]), running_gateway(settings, limited) as (_, api):
        for _ in range(2):
            await api.call("GET", "/v1/users")
        status, reply, headers = await api.call("GET", "/v1/users")

    assert status == 429, reply
    assert reason(reply) == "RATE_LIMITED", reply
    assert int(headers["Retry-After"]) >= 1


async def test_gateway_rate_limit_is_per_caller(settings: Settings) -> None:
    limited = gateway_settings(rate_limit_per_second=0.01, rate_limit_burst=1)
    async with running_system(settings, ["users"]), running_gateway(settings, limited) as (_, api):
        await api.call("GET", "/v1/users")
        status, _, _ = await api.call("GET", "/v1/users", bearer=hs256({"sub": "grace"}))

    assert status == 200


async def test_gateway_error_echoes_request_id(api: Api) -> None:
    status, _, headers = await api.call("GET", "/v1/users", bearer=None, headers={"X-Request-Id": "req-401"})

    assert status == 401
    assert headers.get("X-Request-Id") == "req-401"


async def test_gateway_error_of_its_own_carries_a_traceparent(api: Api) -> None:
    _, _, headers = await api.call("GET", "/v1/usres")

    assert headers.get("traceparent", "").startswith("00-")


async def test_gateway_preflight_rejection_names_the_header(api: Api) -> None:
    status, reply, _ = await api.call(
        "OPTIONS", "/v1/users", bearer=None,
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-custom-debug"},
    )

    assert status == 403
    assert "x-custom-debug" in reply["message"], reply


async def test_request_log_names_401_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.http"):
        await api.call("GET", "/v1/users", bearer=None)

    [entry] = [record for record in caplog.records if record.getMessage() == "request"]
    assert entry.status == 401  # type: ignore[attr-defined]
    assert entry.reason == "MISSING_TOKEN"  # type: ignore[attr-defined]


async def test_request_log_has_request_id(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.http"):
        await api.call("GET", "/v1/users", headers={"X-Request-Id": "req-42"})

    [entry] = [record for record in caplog.records if record.getMessage() == "request"]
    assert entry.request_id == "req-42"  # type: ignore[attr-defined]
