"""Bearer JWT verification for the gateway, independent of the HTTP framework.

An Authenticator parses its verification keys once, at start. They can be an
HS256 shared secret, an RS256 or ES256 public key from a PEM file, and keys
from a JWKS file. A token is checked only against keys whose algorithm equals the
token's ``alg`` header, so an HS256 token can never be verified with an RSA
public key used as an HMAC secret (the HS/RS key confusion attack).

Every rejection raises AuthError with the HTTP status, a short reason code and
a message for the client. Messages never contain the token or a key.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from gateway.caller import MIN_HMAC_SECRET_BYTES, Caller

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS = ("HS256", "RS256", "ES256")

# NIST SP 800-131A disallows RSA signature keys shorter than 2048 bits.
MIN_RSA_KEY_BITS = 2048

AuthReason = Literal[
    "MISSING_TOKEN",
    "MALFORMED_TOKEN",
    "ALG_NOT_ALLOWED",
    "UNKNOWN_KEY_ID",
    "BAD_SIGNATURE",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_YET_VALID",
    "WRONG_ISSUER",
    "WRONG_AUDIENCE",
    "MISSING_CLAIM",
    "INVALID_CLAIM",
    "MISSING_SCOPE",
]


class AuthError(Exception):
    """A request rejected for its credentials: 401 for the token, 403 for missing scopes.

    reason is one of AuthReason, for clients to branch on. The message is safe
    to send to the client because it never contains the token or a key.
    """

    def __init__(
        self,
        http_status: Literal[401, 403],
        reason: AuthReason,
        message: str,
        *,
        required_scopes: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.reason = reason
        self.message = message
        self.required_scopes = tuple(required_scopes)

    @property
    def www_authenticate(self) -> str:
        """Value of the WWW-Authenticate response header, as RFC 6750 section 3 defines it."""
        if self.reason == "MISSING_TOKEN":
            # RFC 6750 section 3.1: a request without credentials gets no error code.
            return "Bearer"
        if self.reason == "MISSING_SCOPE":
            return f'Bearer error="insufficient_scope", scope="{" ".join(self.required_scopes)}"'
        return 'Bearer error="invalid_token"'


class AuthConfigError(ValueError):
    """A key or setting that the authenticator cannot use, raised when it is built."""


@dataclass(frozen=True)
class VerificationKey:
    """A parsed key and the one JWS algorithm it verifies.

    key is the secret as bytes for HS256 and a cryptography public key object
    for RS256 and ES256. kid is the JWKS key id, None for other sources.
    source names where the key came from, for logs and start-up errors.
    """

    algorithm: str
    key: Any
    source: str
    kid: str | None = None


def env_name(field: str) -> str:
    """Return the environment variable that sets the GatewaySettings field."""
    return f"TIDINGS_GATEWAY_{field.upper()}"


# Loading keys, once at start.


def hs256_key(secret: str | bytes, *, source: str = "the HS256 secret") -> VerificationKey:
    """Return the HS256 key for a shared secret; raise AuthConfigError if it is too short."""
    secret_bytes = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(secret_bytes) < MIN_HMAC_SECRET_BYTES:
        raise AuthConfigError(
            f"{source} is {len(secret_bytes)} bytes long, but HS256 needs at least "
            f"{MIN_HMAC_SECRET_BYTES}; generate one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )
    try:
        # PyJWT rejects secrets that look like PEM or SSH keys here.
        prepared = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret_bytes)
    except jwt.InvalidKeyError as exc:
        raise AuthConfigError(f"{source} cannot be used as an HS256 secret: {exc}") from None
    return VerificationKey("HS256", prepared, source)


def _algorithm_of_public_key(key: Any, source: str) -> str:
    """Return RS256 or ES256 for a public key; raise AuthConfigError for other key types."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_KEY_BITS:
            raise AuthConfigError(
                f"{source} is a {key.key_size}-bit RSA key; RS256 needs at least {MIN_RSA_KEY_BITS} bits"
            )
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise AuthConfigError(
                f"{source} is an EC key on curve {key.curve.name}; ES256 needs a P-256 (secp256r1) key"
            )
        return "ES256"
    raise AuthConfigError(
        f"{source} is a {type(key).__name__}; only RSA (RS256) and P-256 EC (ES256) keys are supported"
    )


def public_key_from_pem(data: bytes, *, source: str = "the PEM data") -> VerificationKey:
    """Parse a PEM public key and return it with its algorithm, RS256 or ES256."""
    if b"PRIVATE KEY-----" in data:
        raise AuthConfigError(
            f"{source} contains a private key; give the gateway only the public key "
            "(openssl pkey -in private.pem -pubout)"
        )
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise AuthConfigError(
            f"{source} is not a valid PEM public key ({exc}); expected a file that begins with "
            "-----BEGIN PUBLIC KEY-----"
        ) from None
    return VerificationKey(_algorithm_of_public_key(key, source), key, source)


def _jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    """Return the JWS algorithm of a JWK from its ``alg``, or from ``kty`` and ``crv`` when it has none."""
    declared = jwk.get("alg")
    if declared is not None:
        return str(declared)
    if jwk.get("kty") == "RSA":
        return "RS256"
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
        return "ES256"
    return None


def public_keys_from_jwks(
    document: str | bytes, *, source: str = "the JWKS document"
) -> list[VerificationKey]:
    """Parse a JWKS document and return its RS256 and ES256 signature keys.

    Keys for encryption (``use`` is ``enc``) and keys of other algorithms,
    including symmetric ``oct`` keys, are skipped with a log line. A private
    JWK is reduced to its public key. Raise AuthConfigError when a key that
    claims a supported algorithm is invalid, two keys share a ``kid``, or no
    usable key is left.
    """
    try:
        parsed = json.loads(document)
    except ValueError as exc:
        raise AuthConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        raise AuthConfigError(f'{source} is not a JWKS document: expected a JSON object with a "keys" list')

    keys: list[VerificationKey] = []
    seen_kids: set[str] = set()
    for index, jwk in enumerate(parsed["keys"]):
        label = f"{source} key {index}"
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kty"), str):
            raise AuthConfigError(f'{label} is not a JWK: expected a JSON object with a "kty" member')
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthConfigError(f"{label} has a kid that is not a string")
        if kid is not None:
            label = f"{source} key {kid!r}"

        algorithm = _jwk_algorithm(jwk)
        if jwk.get("use", "sig") != "sig" or algorithm not in ("RS256", "ES256"):
            logger.info(
                "skipping JWKS key that is not an RS256 or ES256 signature key",
                extra={"source": source, "kid": kid, "alg": algorithm, "use": jwk.get("use")},
            )
            continue

        try:
            key = jwt.PyJWK(jwk, algorithm).key
        except jwt.PyJWTError as exc:
            raise AuthConfigError(f"{label} is not a valid {algorithm} JWK: {exc}") from None
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            logger.warning(
                "JWKS key contains private key material; only its public key is used",
                extra={"source": source, "kid": kid},
            )
            key = key.public_key()
        if _algorithm_of_public_key(key, label) != algorithm:
            raise AuthConfigError(f"{label} declares alg {algorithm} but is a {type(key).__name__}")

        if kid is not None:
            if kid in seen_kids:
                raise AuthConfigError(f"{source} has more than one key with kid {kid!r}")
            seen_kids.add(kid)
        keys.append(VerificationKey(algorithm, key, label, kid))

    if not keys:
        raise AuthConfigError(f"{source} contains no RS256 or ES256 signature key")
    return keys


def _read_key_file(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read {path} set in {setting}: {exc.strerror or exc}") from None


def load_public_key_file(path: Path, *, setting: str = env_name("jwt_public_key_file")) -> VerificationKey:
    """Read and parse a PEM public key file; errors name the file and the setting."""
    return public_key_from_pem(_read_key_file(path, setting), source=f"{path} (set in {setting})")


def load_jwks_file(path: Path, *, setting: str = env_name("jwt_jwks_file")) -> list[VerificationKey]:
    """Read and parse a JWKS file; errors name the file and the setting."""
    return public_keys_from_jwks(_read_key_file(path, setting), source=f"{path} (set in {setting})")


# Verifying tokens, on every request.


def _unauthorized(reason: AuthReason, message: str) -> AuthError:
    return AuthError(401, reason, message)


def _signature_not_base64url() -> AuthError:
    # PyJWT reads the signature segment with the header, so a signature that
    # is not base64url (say its last character changed) fails there.
    return _unauthorized(
        "BAD_SIGNATURE",
        "the token's signature is not valid base64url, so it cannot match; "
        "send the token exactly as the issuer gave it",
    )


def _bearer_token(authorization_header: str | None) -> str:
    """Return the token of an ``Authorization: Bearer <token>`` header value."""
    if authorization_header is None or not authorization_header.strip():
        raise _unauthorized(
            "MISSING_TOKEN", "missing bearer token; send the header Authorization: Bearer <token>"
        )
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    # RFC 7235 section 2.1: the auth scheme is case-insensitive.
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized(
            "MALFORMED_TOKEN",
            "the Authorization header is not of the form 'Bearer <token>'; "
            "send the header Authorization: Bearer <token>",
        )
    return token


def _utc_text(seconds: Any) -> str:
    try:
        return datetime.fromtimestamp(float(seconds), UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an invalid time"


def _scope_values(claim: str, value: Any) -> list[str]:
    """Return the scopes of a ``scope`` or ``scp`` claim, a space-separated string or a list."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [scope for item in value for scope in item.split()]
    raise _unauthorized(
        "INVALID_CLAIM",
        f"the token's {claim} claim must be a space-separated string or a list of strings",
    )


def scopes_of_claims(claims: Mapping[str, Any]) -> frozenset[str]:
    """Return the union of the scopes in the ``scope`` (RFC 8693) and ``scp`` claims."""
    scopes: set[str] = set()
    for claim in ("scope", "scp"):
        if claim in claims:
            scopes.update(_scope_values(claim, claims[claim]))
    return frozenset(scopes)


class Authenticator:
    """Verify bearer JWTs against keys parsed once at construction.

    Every token must have a signature made with a key of exactly the token's
    algorithm, and of its ``kid`` when the token names one. It must also have:

    - an ``exp`` that has not passed;
    - an ``nbf`` and an ``iat`` that are not in the future, if present;
    - the configured ``iss`` and ``aud``, when an issuer or audience is set;
    - a non-empty string ``sub``.

    Each time check allows leeway seconds of clock skew.
    """

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        self._keys = tuple(keys)
        if not self._keys:
            raise AuthConfigError(
                f"no JWT verification key is configured; set {env_name('jwt_hs256_secret')}, "
                f"{env_name('jwt_public_key_file')} or {env_name('jwt_jwks_file')}"
            )

        self._keys_by_kid: dict[str, VerificationKey] = {}
        for key in self._keys:
            if key.kid is None:
                continue
            if key.kid in self._keys_by_kid:
                raise AuthConfigError(
                    f"{self._keys_by_kid[key.kid].source} and {key.source} have the same kid {key.kid!r}"
                )
            self._keys_by_kid[key.kid] = key

        self._keys_by_algorithm: dict[str, tuple[VerificationKey, ...]] = {
            algorithm: tuple(key for key in self._keys if key.algorithm == algorithm)
            for algorithm in SUPPORTED_ALGORITHMS
            if any(key.algorithm == algorithm for key in self._keys)
        }

        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway

        # NOTE: without a configured audience the aud claim is not checked at all,
        # so tokens that the same issuer made for other services are accepted too.
        self._options: jwt.types.Options = {
            "require": ["exp", "sub"],
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
            # _check_issued_at checks iat, with a message that names it.
            "verify_iat": False,
            "enforce_minimum_key_length": True,
        }

        logger.info(
            "JWT verification keys loaded",
            extra={
                "algorithms": sorted(self._keys_by_algorithm),
                "key_sources": [key.source for key in self._keys],
                "issuer": issuer,
                "audience": audience,
            },
        )

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator:
        """Build an authenticator from the jwt_* settings, reading the key files now."""
        keys: list[VerificationKey] = []
        if settings.jwt_hs256_secret is not None:
            keys.append(
                hs256_key(settings.jwt_hs256_secret.get_secret_value(), source=env_name("jwt_hs256_secret"))
            )
        if settings.jwt_public_key_file is not None:
            keys.append(load_public_key_file(settings.jwt_public_key_file))
        if settings.jwt_jwks_file is not None:
            keys.extend(load_jwks_file(settings.jwt_jwks_file))
        return cls(
            keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience, leeway=settings.jwt_leeway
        )

    def authenticate(self, authorization_header: str | None) -> Caller:
        """Return the caller of a request from its Authorization header value; raise AuthError (401)."""
        token = _bearer_token(authorization_header)
        algorithm, kid = self._read_header(token)
        claims = self._decode(token, self._candidate_keys(algorithm, kid))
        self._check_issued_at(claims)

        subject = claims["sub"]
        if not subject:
            raise _unauthorized("INVALID_CLAIM", "the token's sub claim is empty; it must name the caller")
        return Caller(subject=subject, scopes=scopes_of_claims(claims), token_id=claims.get("jti"))

    def _read_header(self, token: str) -> tuple[str, str | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            if isinstance(exc, jwt.DecodeError) and "crypto padding" in str(exc):
                raise _signature_not_base64url() from None
            raise _unauthorized(
                "MALFORMED_TOKEN",
                f"the bearer token is not a valid JWT ({exc}); send a signed JWT of the form "
                "header.payload.signature",
            ) from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if not isinstance(algorithm, str) or not (kid is None or isinstance(kid, str)):
            raise _unauthorized(
                "MALFORMED_TOKEN", "the token header must contain a string alg and, if any, a string kid"
            )
        return algorithm, kid

    def _candidate_keys(self, algorithm: str, kid: str | None) -> tuple[VerificationKey, ...]:
        """Return the keys that may have signed a token with this alg and kid header."""
        allowed = sorted(self._keys_by_algorithm)
        if algorithm not in self._keys_by_algorithm:
            alg_text = "none (an unsigned token)" if algorithm.lower() == "none" else repr(algorithm[:20])
            raise _unauthorized(
                "ALG_NOT_ALLOWED",
                f"the token's alg {alg_text} is not accepted; this gateway accepts {', '.join(allowed)}",
            )

        if kid is not None and kid in self._keys_by_kid:
            key = self._keys_by_kid[kid]
            if key.algorithm != algorithm:
                raise _unauthorized(
                    "ALG_NOT_ALLOWED",
                    f"the token's alg {algorithm} does not match the algorithm {key.algorithm} "
                    f"of key {kid!r}; sign with {key.algorithm}",
                )
            return (key,)

        # A PEM key or the HS256 secret has no kid, so it may verify a token with
        # any kid. JWKS keys are tried without a kid match only when the token has none.
        candidates = tuple(
            key for key in self._keys_by_algorithm[algorithm] if kid is None or key.kid is None
        )
        if not candidates and kid is not None:
            raise _unauthorized(
                "UNKNOWN_KEY_ID",
                f"no configured {algorithm} key has the token's kid {kid[:64]!r}; "
                "check that the gateway's JWKS contains the issuer's current keys",
            )
        return candidates

    def _decode(self, token: str, candidates: Sequence[VerificationKey]) -> dict[str, Any]:
        """Return the claims of a token verified by one of the candidate keys."""
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    options=self._options,
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise self._claim_error(exc, token) from None
            return claims
        raise _unauthorized(
            "BAD_SIGNATURE",
            "the token's signature does not match any configured key; "
            "request a token from the issuer this gateway trusts",
        )

    def _claim_error(self, exc: jwt.PyJWTError, token: str) -> AuthError:
        """Return the AuthError for a PyJWT error raised after the signature was verified."""
        if isinstance(exc, jwt.ExpiredSignatureError):
            claims = jwt.decode(token, options={"verify_signature": False})
            return _unauthorized(
                "TOKEN_EXPIRED",
                f"the token expired at {_utc_text(claims.get('exp'))} "
                f"(allowed clock skew {self._leeway:g} s); request a new token",
            )
        if isinstance(exc, jwt.ImmatureSignatureError):
            claims = jwt.decode(token, options={"verify_signature": False})
            return _unauthorized(
                "TOKEN_NOT_YET_VALID",
                f"the token is not valid before {_utc_text(claims.get('nbf'))} "
                f"(allowed clock skew {self._leeway:g} s); check the clock of the token issuer",
            )
        missing_claim = exc.claim if isinstance(exc, jwt.MissingRequiredClaimError) else None
        if missing_claim == "iss" or isinstance(exc, jwt.InvalidIssuerError):
            return _unauthorized(
                "WRONG_ISSUER",
                f"the token's iss claim is missing or not {self._issuer!r}; "
                "request a token from that issuer",
            )
        if missing_claim == "aud" or isinstance(exc, jwt.InvalidAudienceError):
            return _unauthorized(
                "WRONG_AUDIENCE",
                f"the token's aud claim is missing or does not contain {self._audience!r}; "
                "request a token for this audience",
            )
        if missing_claim is not None:
            return _unauthorized(
                "MISSING_CLAIM",
                f"the token has no {missing_claim} claim; request a token that contains it",
            )
        if isinstance(exc, InvalidSubjectError | InvalidJTIError):
            return _unauthorized("INVALID_CLAIM", f"the token has an invalid claim: {exc}")
        return _unauthorized("MALFORMED_TOKEN", f"the token is invalid: {exc}")

    def _check_issued_at(self, claims: Mapping[str, Any]) -> None:
        """Reject an ``iat`` that is not a finite number or lies more than leeway seconds ahead.

        PyJWT 2.15 makes the same check but raises the error it uses for nbf,
        so it is turned off there and made here, with a message that names iat.
        """
        if "iat" not in claims:
            return
        issued_at = claims["iat"]
        is_number = isinstance(issued_at, int | float) and not isinstance(issued_at, bool)
        if not is_number or not math.isfinite(issued_at):
            raise _unauthorized("INVALID_CLAIM", "the token's iat claim must be a number of seconds")
        ahead = issued_at - time.time()
        if ahead > self._leeway:
            raise _unauthorized(
                "TOKEN_NOT_YET_VALID",
                f"the token's iat (issued at) is {ahead:.0f} s in the future, more than the allowed "
                f"clock skew of {self._leeway:g} s; check the clock of the token issuer",
            )


def require_scopes(caller: Caller, needed: Iterable[str]) -> None:
    """Raise AuthError (403, MISSING_SCOPE) naming the needed scopes that the caller lacks."""
    missing = sorted(set(needed) - caller.scopes)
    if missing:
        raise AuthError(
            403,
            "MISSING_SCOPE",
            f"the token lacks the scope(s) {' '.join(missing)} that this request needs; "
            "request a token that includes them",
            required_scopes=missing,
        )


def mint_hs256_token(
    secret: str,
    subject: str,
    scopes: Iterable[str],
    *,
    issuer: str | None = None,
    audience: str | None = None,
    lifetime: float = 3600,
) -> str:
    """Sign an HS256 token for local development and tests, valid for lifetime seconds.

    The token has sub, a space-separated scope claim, iat, exp and a random
    jti, plus iss and aud when given.
    """
    key = hs256_key(secret, source="the secret")
    if not subject:
        raise ValueError("subject must not be empty")
    if lifetime <= 0:
        raise ValueError(f"lifetime must be positive, got {lifetime}")
    scope_list = sorted(set(scopes))
    if any(not scope or any(char.isspace() for char in scope) for scope in scope_list):
        raise ValueError("scopes must be non-empty and contain no whitespace")

    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": subject,
        "scope": " ".join(scope_list),
        "iat": now,
        "exp": now + math.ceil(lifetime),
        "jti": uuid.uuid4().hex,
    }
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, key.key, algorithm="HS256")
