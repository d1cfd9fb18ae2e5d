"""Gateway configuration from TIDINGS_GATEWAY_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PositiveSeconds = Annotated[float, Field(gt=0)]


class GatewaySettings(BaseSettings):
    """Settings of the gateway process; field ``x`` is read from ``TIDINGS_GATEWAY_X``.

    Where the services listen (host and ports) comes from the shared
    runtime Settings. This class contains what only the edge needs.
    """

    model_config = SettingsConfigDict(
        env_prefix="TIDINGS_GATEWAY_", extra="ignore", frozen=True, populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds to.")

    # Backends: several comma-separated host:port per service mean replicas.
    backends: dict[str, str] = Field(
        default_factory=dict,
        description="Backend addresses per service as JSON, e.g. "
        '{"users": "127.0.0.1:50051,127.0.0.1:50061"}; services not listed use the runtime host and port.',
    )
    backend_timeout: PositiveSeconds = Field(
        default=10.0, description="Deadline of a backend call when the client asks for none shorter."
    )
    retry_attempts: Annotated[int, Field(ge=1, le=5)] = Field(
        default=3, description="Attempts per call of a method with no side effects (1 disables retries)."
    )
    retry_budget_tokens: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=10, description="gRPC retry throttling: tokens per backend; retries stop below half."
    )
    retry_budget_ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.1, description="gRPC retry throttling: tokens a successful call gives back."
    )
    breaker_failures: Annotated[int, Field(ge=1)] = Field(
        default=5, description="Consecutive backend failures that open its circuit breaker."
    )
    breaker_reset: PositiveSeconds = Field(
        default=5.0, description="Seconds an open breaker fails fast before it lets one call try."
    )

    # Authentication: at least one key source must be set unless auth is off.
    auth_enabled: bool = Field(
        default=True, description="Require a bearer JWT on every /v1 route (false only for local tests)."
    )
    jwt_hs256_secret: SecretStr | None = Field(default=None, description="Shared secret for HS256 tokens.")
    jwt_public_key_file: Path | None = Field(
        default=None, description="PEM public key for RS256 or ES256 tokens."
    )
    jwt_jwks_file: Path | None = Field(default=None, description="JWKS file with RS256/ES256 public keys.")
    jwt_issuer: str | None = Field(default=None, description="Required `iss` claim, if set.")
    jwt_audience: str | None = Field(default=None, description="Required `aud` claim, if set.")
    jwt_leeway: Annotated[float, Field(ge=0, le=300)] = Field(
        default=30.0, description="Seconds of clock skew allowed for exp, nbf and iat."
    )

    # Rate limits: token bucket per caller and route.
    rate_limit_per_second: Annotated[float, Field(gt=0)] = Field(
        default=50.0, description="Requests per second each caller may make to each route."
    )
    rate_limit_burst: Annotated[int, Field(ge=1)] = Field(
        default=100, description="Requests a caller may make at once before the rate applies."
    )

    # Request limits.
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=1_048_576, description="Largest request body accepted; larger gets 413."
    )
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=16_384, description="Largest total size of request headers; larger gets 431."
    )

    # CORS.
    cors_origins: tuple[str, ...] = Field(
        default=(), description='Allowed browser origins as a JSON list, e.g. ["https://app.example"].'
    )
    cors_allow_credentials: bool = False
    cors_allowed_headers: tuple[str, ...] | None = Field(
        default=None,
        description="Request headers browsers may send, as a JSON list; unset means Authorization, "
        "Content-Type, Last-Event-ID, traceparent, tracestate, Request-Timeout and X-Request-Id.",
    )
    cors_exposed_headers: tuple[str, ...] | None = Field(
        default=None,
        description="Response headers browser scripts may read, as a JSON list; unset means "
        "Retry-After, traceparent and X-Request-Id.",
    )
    cors_max_age: Annotated[int, Field(ge=0, le=86_400)] = 600

    # Live events.
    max_streams_per_caller: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5, description="Event streams (GET /v1/events) one caller may keep open at once."
    )

    # TLS at the edge and toward the services.
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate chain served over HTTPS.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    backend_ca_file: Path | None = Field(
        default=None, description="CA that signed the services' certificates; setting it turns on TLS."
    )
    backend_cert_file: Path | None = Field(
        default=None, description="Client certificate the gateway presents to the services (mTLS)."
    )
    backend_key_file: Path | None = Field(default=None, description="Private key of backend_cert_file.")

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"origin {origin!r} must be scheme://host[:port] or *")
            if origin.endswith("/"):
                raise ValueError(f"origin {origin!r} must not end with a slash")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> GatewaySettings:
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "TIDINGS_GATEWAY_CORS_ALLOW_CREDENTIALS=true cannot be combined with the origin * in "
                "TIDINGS_GATEWAY_CORS_ORIGINS; list the origins explicitly"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both TIDINGS_GATEWAY_TLS_CERT_FILE and TIDINGS_GATEWAY_TLS_KEY_FILE, or neither"
            )
        if (self.backend_cert_file is None) != (self.backend_key_file is None):
            raise ValueError(
                "set both TIDINGS_GATEWAY_BACKEND_CERT_FILE and TIDINGS_GATEWAY_BACKEND_KEY_FILE, or neither"
            )
        if self.backend_cert_file is not None and self.backend_ca_file is None:
            raise ValueError(
                "TIDINGS_GATEWAY_BACKEND_CERT_FILE needs TIDINGS_GATEWAY_BACKEND_CA_FILE to verify the "
                "services"
            )
        has_key = self.jwt_hs256_secret or self.jwt_public_key_file or self.jwt_jwks_file
        if self.auth_enabled and not has_key:
            raise ValueError(
                "auth is on but no key is configured: set TIDINGS_GATEWAY_JWT_HS256_SECRET, "
                "TIDINGS_GATEWAY_JWT_PUBLIC_KEY_FILE or TIDINGS_GATEWAY_JWT_JWKS_FILE (or "
                "TIDINGS_GATEWAY_AUTH_ENABLED=false for local tests)"
            )
        return self
