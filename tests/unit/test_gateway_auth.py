"""Unit tests of gateway/auth.py: bearer JWT verification, scopes and key loading.

RSA and EC keys are generated here and written to tmp_path as PEM and JWKS
files, the way an operator configures the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from gateway.auth import (
    AuthConfigError,
    Authenticator,
    AuthError,
    hs256_key,
    mint_hs256_token,
    public_key_from_pem,
    public_keys_from_jwks,
    require_scopes,
)
from gateway.caller import Caller
from gateway.settings import GatewaySettings

SECRET = "test-hs256-secret-that-is-long-enough-0123456789"
OTHER_SECRET = "another-hs256-secret-that-is-long-enough-98765"


@pytest.fixture(scope="module")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    """Return valid claims for subject ada, with each override set or, when None, removed."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "ada", "scope": "orders:read", "iat": now, "exp": now + 300}
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwks_document(*jwks: dict[str, Any]) -> str:
    return json.dumps({"keys": list(jwks)})


@pytest.fixture
def hs_authenticator() -> Authenticator:
    return Authenticator([hs256_key(SECRET)])


@pytest.fixture
def jwks_file(
    tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey, ec_private_key: ec.EllipticCurvePrivateKey
) -> Path:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private_key.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_private_key.public_key(), as_dict=True)
    path = tmp_path / "jwks.json"
    document = {
        "keys": [
            {**rsa_jwk, "kid": "rsa-1", "alg": "RS256", "use": "sig"},
            {**ec_jwk, "kid": "ec-1", "alg": "ES256", "use": "sig"},
        ]
    }
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def jwks_authenticator(jwks_file: Path) -> Authenticator:
    return Authenticator.from_settings(GatewaySettings(jwt_jwks_file=jwks_file))


def _reject(authenticator: Authenticator, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        authenticator.authenticate(header)
    return caught.value


# Valid tokens.


def test_authenticate_hs256_subject(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(_hs256(_claims())))

    assert caller.subject == "ada"


def test_authenticate_hs256_scopes(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(_hs256(_claims(scope="orders:read orders:write"))))

    assert caller.scopes == frozenset({"orders:read", "orders:write"})


def test_authenticate_token_id_from_jti(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(_hs256(_claims(jti="token-7"))))

    assert caller.token_id == "token-7"


def test_authenticate_scheme_case_insensitive(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(f"bearer {_hs256(_claims())}")

    assert caller.subject == "ada"


def test_authenticate_rs256_pem(tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(_public_pem(rsa_private_key))
    authenticator = Authenticator.from_settings(GatewaySettings(jwt_public_key_file=key_file))
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256")

    assert authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticate_es256_pem(tmp_path: Path, ec_private_key: ec.EllipticCurvePrivateKey) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(_public_pem(ec_private_key))
    authenticator = Authenticator.from_settings(GatewaySettings(jwt_public_key_file=key_file))
    token = jwt.encode(_claims(), ec_private_key, algorithm="ES256")

    assert authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticate_rs256_jwks_kid(
    jwks_authenticator: Authenticator, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256", headers={"kid": "rsa-1"})

    assert jwks_authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticate_es256_jwks_kid(
    jwks_authenticator: Authenticator, ec_private_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_claims(), ec_private_key, algorithm="ES256", headers={"kid": "ec-1"})

    assert jwks_authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticate_jwks_token_without_kid(
    jwks_authenticator: Authenticator, ec_private_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_claims(), ec_private_key, algorithm="ES256")

    assert jwks_authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticate_all_key_sources_together(
    tmp_path: Path,
    jwks_file: Path,
    rsa_private_key: rsa.RSAPrivateKey,
    ec_private_key: ec.EllipticCurvePrivateKey,
) -> None:
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(_public_pem(other_rsa))
    settings = GatewaySettings(
        jwt_hs256_secret=SecretStr(SECRET), jwt_public_key_file=key_file, jwt_jwks_file=jwks_file
    )
    authenticator = Authenticator.from_settings(settings)
    tokens = {
        "hs256": _hs256(_claims(sub="hs")),
        "pem": jwt.encode(_claims(sub="pem"), other_rsa, algorithm="RS256"),
        "jwks-rsa": jwt.encode(_claims(sub="jwks-rsa"), rsa_private_key, algorithm="RS256"),
        "jwks-ec": jwt.encode(
            _claims(sub="jwks-ec"), ec_private_key, algorithm="ES256", headers={"kid": "ec-1"}
        ),
    }

    subjects = {name: authenticator.authenticate(_bearer(token)).subject for name, token in tokens.items()}

    assert subjects == {"hs256": "hs", "pem": "pem", "jwks-rsa": "jwks-rsa", "jwks-ec": "jwks-ec"}


def test_authenticate_pem_key_accepts_any_kid(tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey) -> None:
    authenticator = Authenticator([public_key_from_pem(_public_pem(rsa_private_key))])
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256", headers={"kid": "rotating-1"})

    assert authenticator.authenticate(_bearer(token)).subject == "ada"


def test_authenticator_reads_key_file_once(tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(_public_pem(rsa_private_key))
    authenticator = Authenticator.from_settings(GatewaySettings(jwt_public_key_file=key_file))
    key_file.unlink()
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256")

    assert authenticator.authenticate(_bearer(token)).subject == "ada"


# Algorithms and keys.


def test_authenticate_alg_none_rejected(hs_authenticator: Authenticator) -> None:
    token = jwt.encode(_claims(), "", algorithm="none")

    error = _reject(hs_authenticator, _bearer(token))

    assert error.reason == "ALG_NOT_ALLOWED"


def test_authenticate_alg_none_unsigned_message(hs_authenticator: Authenticator) -> None:
    token = jwt.encode(_claims(), "", algorithm="none")

    error = _reject(hs_authenticator, _bearer(token))

    assert "unsigned" in error.message


def test_authenticate_alg_without_key_rejected(
    hs_authenticator: Authenticator, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256")

    error = _reject(hs_authenticator, _bearer(token))

    assert error.reason == "ALG_NOT_ALLOWED"


def test_authenticate_unsupported_alg_rejected(hs_authenticator: Authenticator) -> None:
    token = jwt.encode(_claims(), SECRET + SECRET, algorithm="HS512")

    error = _reject(hs_authenticator, _bearer(token))

    assert error.reason == "ALG_NOT_ALLOWED"


def _hs256_signed_with_bytes(claims: dict[str, Any], secret: bytes) -> str:
    """Sign an HS256 token by hand, because PyJWT refuses to use a PEM key as an HMAC secret."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def test_authenticate_key_confusion_rsa_only(rsa_private_key: rsa.RSAPrivateKey) -> None:
    public_pem = _public_pem(rsa_private_key)
    authenticator = Authenticator([public_key_from_pem(public_pem)])
    token = _hs256_signed_with_bytes(_claims(), public_pem)

    error = _reject(authenticator, _bearer(token))

    assert error.reason == "ALG_NOT_ALLOWED"


def test_authenticate_key_confusion_with_hs_secret(rsa_private_key: rsa.RSAPrivateKey) -> None:
    public_pem = _public_pem(rsa_private_key)
    authenticator = Authenticator([hs256_key(SECRET), public_key_from_pem(public_pem)])
    token = _hs256_signed_with_bytes(_claims(), public_pem)

    error = _reject(authenticator, _bearer(token))

    assert error.reason == "BAD_SIGNATURE"


def test_authenticate_jwks_unknown_kid(
    jwks_authenticator: Authenticator, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    token = jwt.encode(_claims(), rsa_private_key, algorithm="RS256", headers={"kid": "retired-0"})

    error = _reject(jwks_authenticator, _bearer(token))

    assert error.reason == "UNKNOWN_KEY_ID"


def test_authenticate_jwks_kid_of_other_alg(
    jwks_authenticator: Authenticator, ec_private_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(_claims(), ec_private_key, algorithm="ES256", headers={"kid": "rsa-1"})

    error = _reject(jwks_authenticator, _bearer(token))

    assert error.reason == "ALG_NOT_ALLOWED"


def test_authenticate_jwks_kid_of_other_key(jwks_authenticator: Authenticator) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})

    error = _reject(jwks_authenticator, _bearer(token))

    assert error.reason == "BAD_SIGNATURE"


def test_authenticate_bad_signature(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(), OTHER_SECRET)))

    assert error.reason == "BAD_SIGNATURE"


def test_authenticate_tampered_payload(hs_authenticator: Authenticator) -> None:
    header, _, signature = _hs256(_claims()).split(".")
    forged_payload = _b64url(json.dumps(_claims(sub="root")).encode())

    error = _reject(hs_authenticator, _bearer(f"{header}.{forged_payload}.{signature}"))

    assert error.reason == "BAD_SIGNATURE"


def test_authenticate_bad_signature_status(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(), OTHER_SECRET)))

    assert error.http_status == 401


# Claims.


def test_authenticate_wrong_issuer() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], issuer="https://id.tidings.dev")

    error = _reject(authenticator, _bearer(_hs256(_claims(iss="https://evil.example"))))

    assert error.reason == "WRONG_ISSUER"


def test_authenticate_missing_issuer() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], issuer="https://id.tidings.dev")

    error = _reject(authenticator, _bearer(_hs256(_claims())))

    assert error.reason == "WRONG_ISSUER"


def test_authenticate_right_issuer() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], issuer="https://id.tidings.dev")

    caller = authenticator.authenticate(_bearer(_hs256(_claims(iss="https://id.tidings.dev"))))

    assert caller.subject == "ada"


def test_authenticate_wrong_audience() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], audience="tidings-gateway")

    error = _reject(authenticator, _bearer(_hs256(_claims(aud="billing"))))

    assert error.reason == "WRONG_AUDIENCE"


def test_authenticate_missing_audience() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], audience="tidings-gateway")

    error = _reject(authenticator, _bearer(_hs256(_claims())))

    assert error.reason == "WRONG_AUDIENCE"


def test_authenticate_audience_in_list() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], audience="tidings-gateway")

    caller = authenticator.authenticate(_bearer(_hs256(_claims(aud=["billing", "tidings-gateway"]))))

    assert caller.subject == "ada"


def test_authenticate_audience_unconfigured_ignores_aud(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(_hs256(_claims(aud="billing"))))

    assert caller.subject == "ada"


def test_authenticate_expired() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)
    now = int(time.time())

    error = _reject(authenticator, _bearer(_hs256(_claims(iat=now - 600, exp=now - 60))))

    assert error.reason == "TOKEN_EXPIRED"


def test_authenticate_expired_message_has_time() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)
    expired_at = int(time.time()) - 60

    error = _reject(authenticator, _bearer(_hs256(_claims(iat=expired_at - 600, exp=expired_at))))

    assert time.strftime("%Y-%m-%dT%H:%M", time.gmtime(expired_at)) in error.message


def test_authenticate_expired_within_leeway() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)
    now = int(time.time())

    caller = authenticator.authenticate(_bearer(_hs256(_claims(iat=now - 600, exp=now - 10))))

    assert caller.subject == "ada"


def test_authenticate_missing_exp(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(exp=None))))

    assert error.reason == "MISSING_CLAIM"


def test_authenticate_nbf_in_future() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)

    error = _reject(authenticator, _bearer(_hs256(_claims(nbf=int(time.time()) + 120))))

    assert error.reason == "TOKEN_NOT_YET_VALID"


def test_authenticate_nbf_within_leeway() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)

    caller = authenticator.authenticate(_bearer(_hs256(_claims(nbf=int(time.time()) + 5))))

    assert caller.subject == "ada"


def test_authenticate_iat_5s_future_accepted() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)

    caller = authenticator.authenticate(_bearer(_hs256(_claims(iat=int(time.time()) + 5))))

    assert caller.subject == "ada"


def test_authenticate_iat_hour_future_rejected() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)
    now = int(time.time())

    error = _reject(authenticator, _bearer(_hs256(_claims(iat=now + 3600, exp=now + 7200))))

    assert error.reason == "TOKEN_NOT_YET_VALID"


def test_authenticate_iat_hour_future_message() -> None:
    authenticator = Authenticator([hs256_key(SECRET)], leeway=30)
    now = int(time.time())

    error = _reject(authenticator, _bearer(_hs256(_claims(iat=now + 3600, exp=now + 7200))))

    assert "iat" in error.message


def test_authenticate_iat_not_number(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(iat="yesterday"))))

    assert error.reason == "INVALID_CLAIM"


def test_authenticate_iat_nan(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(iat=float("nan")))))

    assert error.reason == "INVALID_CLAIM"


def test_authenticate_missing_sub(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(sub=None))))

    assert error.reason == "MISSING_CLAIM"


def test_authenticate_missing_sub_message(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(sub=None))))

    assert "sub" in error.message


def test_authenticate_empty_sub(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(sub=""))))

    assert error.reason == "INVALID_CLAIM"


def test_authenticate_sub_not_string(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(sub=42))))

    assert error.reason == "INVALID_CLAIM"


# The Authorization header.


@pytest.mark.parametrize("header", [None, "", "   "])
def test_authenticate_missing_token(hs_authenticator: Authenticator, header: str | None) -> None:
    error = _reject(hs_authenticator, header)

    assert error.reason == "MISSING_TOKEN"


@pytest.mark.parametrize(
    "header", ["Basic YWRhOnNlY3JldA==", "Bearer", "Bearer ", "Token abc.def.ghi", "Bearer a.b.c extra"]
)
def test_authenticate_malformed_header(hs_authenticator: Authenticator, header: str) -> None:
    error = _reject(hs_authenticator, header)

    assert error.reason == "MALFORMED_TOKEN"


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "e30.e30", "e30.e30.e30.e30"])
def test_authenticate_malformed_token(hs_authenticator: Authenticator, token: str) -> None:
    error = _reject(hs_authenticator, _bearer(token))

    assert error.reason == "MALFORMED_TOKEN"


def test_authenticate_missing_token_www_authenticate(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, None)

    assert error.www_authenticate == "Bearer"


def test_authenticate_invalid_token_www_authenticate(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(), OTHER_SECRET)))

    assert error.www_authenticate == 'Bearer error="invalid_token"'


# Scopes.


def test_authenticate_scopes_from_scp_list(hs_authenticator: Authenticator) -> None:
    token = _hs256(_claims(scope=None, scp=["orders:read", "users:write"]))

    caller = hs_authenticator.authenticate(_bearer(token))

    assert caller.scopes == frozenset({"orders:read", "users:write"})


def test_authenticate_scopes_from_scp_string(hs_authenticator: Authenticator) -> None:
    token = _hs256(_claims(scope=None, scp="orders:read users:write"))

    caller = hs_authenticator.authenticate(_bearer(token))

    assert caller.scopes == frozenset({"orders:read", "users:write"})


def test_authenticate_scopes_from_both_claims(hs_authenticator: Authenticator) -> None:
    token = _hs256(_claims(scope="orders:read", scp=["users:write"]))

    caller = hs_authenticator.authenticate(_bearer(token))

    assert caller.scopes == frozenset({"orders:read", "users:write"})


def test_authenticate_no_scopes(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(_hs256(_claims(scope=None))))

    assert caller.scopes == frozenset()


def test_authenticate_scope_wrong_type(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, _bearer(_hs256(_claims(scope=7))))

    assert error.reason == "INVALID_CLAIM"


def test_require_scopes_present() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"orders:read", "orders:write"}))

    require_scopes(caller, ["orders:write"])


def test_require_scopes_missing_status() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"orders:read"}))

    with pytest.raises(AuthError) as caught:
        require_scopes(caller, ["orders:read", "orders:write"])

    assert caught.value.http_status == 403


def test_require_scopes_missing_reason() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"orders:read"}))

    with pytest.raises(AuthError) as caught:
        require_scopes(caller, ["orders:read", "orders:write"])

    assert caught.value.reason == "MISSING_SCOPE"


def test_require_scopes_message_names_missing() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"orders:read"}))

    with pytest.raises(AuthError) as caught:
        require_scopes(caller, ["orders:read", "orders:write", "users:admin"])

    assert "orders:write users:admin" in caught.value.message


def test_require_scopes_message_omits_present() -> None:
    caller = Caller(subject="ada", scopes=frozenset({"orders:read"}))

    with pytest.raises(AuthError) as caught:
        require_scopes(caller, ["orders:read", "orders:write"])

    assert "orders:read" not in caught.value.message


def test_require_scopes_www_authenticate() -> None:
    caller = Caller(subject="ada", scopes=frozenset())

    with pytest.raises(AuthError) as caught:
        require_scopes(caller, ["orders:write"])

    assert caught.value.www_authenticate == 'Bearer error="insufficient_scope", scope="orders:write"'


# Messages.


FAILING_CASES = (
    "bad signature",
    "expired",
    "future iat",
    "future nbf",
    "missing sub",
    "wrong issuer",
    "wrong audience",
    "alg none",
    "rs256 without key",
    "truncated",
)


def _failing_tokens(rsa_private_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Return a token for each of FAILING_CASES."""
    now = int(time.time())
    return {
        "bad signature": _hs256(_claims(), OTHER_SECRET),
        "expired": _hs256(_claims(iat=now - 600, exp=now - 120)),
        "future iat": _hs256(_claims(iat=now + 3600, exp=now + 7200)),
        "future nbf": _hs256(_claims(nbf=now + 3600)),
        "missing sub": _hs256(_claims(sub=None)),
        "wrong issuer": _hs256(_claims(iss="https://evil.example")),
        "wrong audience": _hs256(_claims(aud="billing")),
        "alg none": jwt.encode(_claims(), "", algorithm="none"),
        "rs256 without key": jwt.encode(_claims(), rsa_private_key, algorithm="RS256"),
        "truncated": _hs256(_claims())[:-10],
    }


@pytest.mark.parametrize("case", FAILING_CASES)
def test_auth_error_message_hides_token_and_secret(
    rsa_private_key: rsa.RSAPrivateKey, case: str
) -> None:
    authenticator = Authenticator(
        [hs256_key(SECRET)], issuer="https://id.tidings.dev", audience="tidings-gateway"
    )
    token = _failing_tokens(rsa_private_key)[case]

    error = _reject(authenticator, _bearer(token))

    assert token not in error.message
    for segment in filter(None, token.split(".")):
        assert segment not in error.message
    assert SECRET not in error.message


def test_auth_error_message_hides_malformed_header(hs_authenticator: Authenticator) -> None:
    error = _reject(hs_authenticator, "Basic YWRhOnNlY3JldA==")

    assert "YWRhOnNlY3JldA==" not in error.message


# Key loading.


def test_from_settings_missing_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"

    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_settings(GatewaySettings(jwt_public_key_file=missing))

    assert str(missing) in str(caught.value)


def test_from_settings_missing_key_file_names_setting(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_settings(GatewaySettings(jwt_public_key_file=tmp_path / "absent.pem"))

    assert "TIDINGS_GATEWAY_JWT_PUBLIC_KEY_FILE" in str(caught.value)


def test_from_settings_missing_jwks_file_names_setting(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_settings(GatewaySettings(jwt_jwks_file=tmp_path / "absent.json"))

    assert "TIDINGS_GATEWAY_JWT_JWKS_FILE" in str(caught.value)


def test_from_settings_short_secret() -> None:
    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_settings(GatewaySettings(jwt_hs256_secret=SecretStr("short-secret")))

    assert "TIDINGS_GATEWAY_JWT_HS256_SECRET" in str(caught.value)


def test_from_settings_short_secret_not_in_message() -> None:
    with pytest.raises(AuthConfigError) as caught:
        Authenticator.from_settings(GatewaySettings(jwt_hs256_secret=SecretStr("short-secret")))

    assert "short-secret" not in str(caught.value)


def test_from_settings_without_keys() -> None:
    with pytest.raises(AuthConfigError):
        Authenticator.from_settings(GatewaySettings(auth_enabled=False))


def test_authenticator_rejects_duplicate_kid(rsa_private_key: rsa.RSAPrivateKey) -> None:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private_key.public_key(), as_dict=True)
    first = public_keys_from_jwks(_jwks_document({**rsa_jwk, "kid": "k"}), source="first JWKS")
    second = public_keys_from_jwks(_jwks_document({**rsa_jwk, "kid": "k"}), source="second JWKS")

    with pytest.raises(AuthConfigError):
        Authenticator([*first, *second])


def test_hs256_key_rejects_pem_secret(rsa_private_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthConfigError):
        hs256_key(_public_pem(rsa_private_key))


def test_public_key_from_pem_rejects_private_key(rsa_private_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(AuthConfigError) as caught:
        public_key_from_pem(_private_pem(rsa_private_key))

    assert "private key" in str(caught.value)


def test_public_key_from_pem_rejects_garbage() -> None:
    with pytest.raises(AuthConfigError):
        public_key_from_pem(b"not a key")


def test_public_key_from_pem_rejects_p384() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())

    with pytest.raises(AuthConfigError) as caught:
        public_key_from_pem(_public_pem(p384))

    assert "P-256" in str(caught.value)


def test_public_key_from_pem_rejects_short_rsa() -> None:
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    with pytest.raises(AuthConfigError):
        public_key_from_pem(_public_pem(short))


@pytest.mark.parametrize(
    ("case", "document"),
    [
        ("not json", "{"),
        ("no keys list", '{"kid": "x"}'),
        ("empty keys", '{"keys": []}'),
        ("entry not object", '{"keys": ["x"]}'),
        ("only symmetric key", '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'),
    ],
)
def test_public_keys_from_jwks_rejects(case: str, document: str) -> None:
    with pytest.raises(AuthConfigError):
        public_keys_from_jwks(document)


def test_public_keys_from_jwks_skips_symmetric_and_enc(rsa_private_key: rsa.RSAPrivateKey) -> None:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private_key.public_key(), as_dict=True)
    document = _jwks_document(
        {"kty": "oct", "k": _b64url(SECRET.encode()), "kid": "shared"},
        {**rsa_jwk, "kid": "encryption", "use": "enc"},
        {**rsa_jwk, "kid": "signing"},
    )

    keys = public_keys_from_jwks(document)

    assert [key.kid for key in keys] == ["signing"]


def test_public_keys_from_jwks_infers_alg(
    rsa_private_key: rsa.RSAPrivateKey, ec_private_key: ec.EllipticCurvePrivateKey
) -> None:
    document = _jwks_document(
        RSAAlgorithm.to_jwk(rsa_private_key.public_key(), as_dict=True),
        ECAlgorithm.to_jwk(ec_private_key.public_key(), as_dict=True),
    )

    keys = public_keys_from_jwks(document)

    assert [key.algorithm for key in keys] == ["RS256", "ES256"]


def test_public_keys_from_jwks_duplicate_kid(rsa_private_key: rsa.RSAPrivateKey) -> None:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private_key.public_key(), as_dict=True)
    document = _jwks_document({**rsa_jwk, "kid": "k"}, {**rsa_jwk, "kid": "k"})

    with pytest.raises(AuthConfigError):
        public_keys_from_jwks(document)


def test_public_keys_from_jwks_alg_mismatch(ec_private_key: ec.EllipticCurvePrivateKey) -> None:
    ec_jwk = ECAlgorithm.to_jwk(ec_private_key.public_key(), as_dict=True)

    with pytest.raises(AuthConfigError):
        public_keys_from_jwks(_jwks_document({**ec_jwk, "alg": "RS256"}))


def test_public_keys_from_jwks_private_jwk_reduced(rsa_private_key: rsa.RSAPrivateKey) -> None:
    private_jwk = RSAAlgorithm.to_jwk(rsa_private_key, as_dict=True)

    keys = public_keys_from_jwks(_jwks_document({**private_jwk, "kid": "k"}))

    assert isinstance(keys[0].key, rsa.RSAPublicKey)


# Minting.


def test_mint_hs256_token_round_trip() -> None:
    authenticator = Authenticator(
        [hs256_key(SECRET)], issuer="https://id.tidings.dev", audience="tidings-gateway"
    )
    token = mint_hs256_token(
        SECRET,
        "ada",
        ["orders:write", "orders:read"],
        issuer="https://id.tidings.dev",
        audience="tidings-gateway",
    )

    caller = authenticator.authenticate(_bearer(token))

    assert caller == Caller("ada", frozenset({"orders:read", "orders:write"}), caller.token_id)


def test_mint_hs256_token_has_jti(hs_authenticator: Authenticator) -> None:
    caller = hs_authenticator.authenticate(_bearer(mint_hs256_token(SECRET, "ada", [])))

    assert caller.token_id


def test_mint_hs256_token_lifetime() -> None:
    before = int(time.time())
    token = mint_hs256_token(SECRET, "ada", [], lifetime=90)

    claims = jwt.decode(token, SECRET, algorithms=["HS256"])

    assert before + 90 <= claims["exp"] <= int(time.time()) + 90


@pytest.mark.parametrize(
    ("case", "mint"),
    [
        ("short secret", lambda: mint_hs256_token("short", "ada", [])),
        ("empty subject", lambda: mint_hs256_token(SECRET, "", [])),
        ("scope with space", lambda: mint_hs256_token(SECRET, "ada", ["orders read"])),
        ("zero lifetime", lambda: mint_hs256_token(SECRET, "ada", [], lifetime=0)),
    ],
)
def test_mint_hs256_token_rejects(case: str, mint: Callable[[], str]) -> None:
    with pytest.raises(ValueError):
        mint()


def test_authenticate_non_base64url_signature(hs_authenticator: Authenticator) -> None:
    header, payload, signature = _hs256(_claims()).split(".")
    changed = signature[:-1] + ("B" if signature[-1] != "B" else "C")

    error = _reject(hs_authenticator, _bearer(f"{header}.{payload}.{changed}"))

    assert error.reason == "BAD_SIGNATURE"
