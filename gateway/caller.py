"""The authenticated caller, shared by the gateway's token check and the services' identity check.

Kept apart from gateway.auth so that a service process, which only verifies
the gateway's signed identity, does not load PyJWT and cryptography.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 7518 section 3.2: an HS256 key must be at least as long as the SHA-256 output.
MIN_HMAC_SECRET_BYTES = 32


@dataclass(frozen=True)
class Caller:
    """The authenticated client of a request: the token's subject, scopes and ``jti``."""

    subject: str
    scopes: frozenset[str]
    token_id: str | None = None
