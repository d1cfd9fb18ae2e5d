"""`tidings token`: mint a bearer token for the gateway of a local system."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from gateway.auth import mint_hs256_token
from gateway.routes import EVENTS_SCOPE, load_routes
from services.runtime.config import Settings


def every_scope() -> list[str]:
    """Return every scope that some gateway route requires."""
    return sorted({route.scope for route in load_routes()} | {EVENTS_SCOPE})


def local_jwt_secret(settings: Settings) -> str | None:
    """Return the gateway's HS256 secret: the environment's, else the one `tidings up` made."""
    configured = os.environ.get("TIDINGS_GATEWAY_JWT_HS256_SECRET")
    if configured:
        return configured
    path = settings.data_dir.resolve() / "secrets" / "jwt"
    return path.read_text().strip() if path.exists() else None


def print_token(settings: Settings, subject: str, scopes: Sequence[str] | None, lifetime: int) -> int:
    """Print a token for subject with scopes (every scope when None); return the exit code."""
    secret = local_jwt_secret(settings)
    if secret is None:
        print(
            "tidings token: no HS256 secret found; run `tidings up` first (it creates "
            f"{settings.data_dir}/secrets/jwt) or set TIDINGS_GATEWAY_JWT_HS256_SECRET",
            file=sys.stderr,
        )
        return 2
    known = every_scope()
    unknown = [scope for scope in scopes or () if scope not in known]
    if unknown:
        print(f"tidings token: unknown scope {unknown[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    print(mint_hs256_token(secret, subject, scopes or known, lifetime=lifetime))
    return 0
