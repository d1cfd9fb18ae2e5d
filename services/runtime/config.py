"""Process configuration from TIDINGS_*, NATS_URL and OTEL_* environment variables."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, TypeVar, overload

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from observability.logging import redact_url
from services.runtime.errors import ConfigurationError

# Default gRPC ports; each can be changed with TIDINGS_<SERVICE>_PORT.
DEFAULT_PORTS: dict[str, int] = {
    "users": 50051,
    "orders": 50052,
    "inventory": 50053,
    "payments": 50054,
    "notifications": 50055,
    "gateway": 8080,
}

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    """Settings shared by every Tidings process; field ``x`` is read from ``TIDINGS_X``."""

    model_config = SettingsConfigDict(
        env_prefix="TIDINGS_", extra="ignore", frozen=True, populate_by_name=True
    )

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        validation_alias=AliasChoices("NATS_URL", "TIDINGS_NATS_URL"),
        description="NATS server URL(s), comma-separated for a cluster.",
    )
    embedded_nats_port: Port = Field(
        default=4222,
        description="Port for the nats-server `tidings up` starts; a free one if it is taken.",
    )
    host: str = Field(default="127.0.0.1", description="Address the gRPC servers bind to.")
    data_dir: Path = Field(default=Path("data"), description="Directory for SQLite files.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default is sqlite+aiosqlite:///<data_dir>/<service>.sqlite3.",
    )

    users_port: Port = DEFAULT_PORTS["users"]
    orders_port: Port = DEFAULT_PORTS["orders"]
    inventory_port: Port = DEFAULT_PORTS["inventory"]
    payments_port: Port = DEFAULT_PORTS["payments"]
    notifications_port: Port = DEFAULT_PORTS["notifications"]
    gateway_port: Port = DEFAULT_PORTS["gateway"]

    stream_replicas: Annotated[int, Field(ge=1, le=5)] = 1
    duplicate_window: PositiveSeconds = Field(
        default=120.0, description="JetStream duplicate window of each stream, in seconds."
    )

    relay_enabled: bool = True
    relay_batch_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    relay_poll_interval: PositiveSeconds = Field(
        default=1.0, description="Seconds between outbox scans when no commit wakes the relay."
    )
    relay_publish_timeout: PositiveSeconds = 5.0
    relay_linger: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.005,
        description="Seconds the relay waits after a wake-up so that more commits join the batch.",
    )

    consumer_handler_timeout: PositiveSeconds = Field(
        default=30.0, description="Seconds a handler may run before the attempt counts as failed."
    )
    consumer_batch_size: Annotated[int, Field(ge=1, le=1000)] = 64
    consumer_ack_wait: PositiveSeconds = 60.0
    consumer_max_deliver: Annotated[int, Field(ge=1)] = 5
    consumer_backoff: tuple[PositiveSeconds, ...] = Field(
        default=(0.5, 2.0, 10.0),
        description="Seconds before the retry after the 1st, 2nd, ... failure of an event (JSON list).",
    )

    saga_timeout: PositiveSeconds = Field(
        default=30.0, description="Seconds an order may wait for a saga step before it is rejected."
    )
    call_timeout: PositiveSeconds = Field(
        default=5.0, description="Timeout of a gRPC call between services when the caller has none."
    )

    required_replicas: Annotated[int, Field(ge=1, le=5)] = Field(
        default=1, description="Minimum stream replicas the start-up check accepts."
    )
    max_relay_downtime: PositiveSeconds = Field(
        default=60.0,
        description="Longest assumed time a relay is down between a publish and marking it sent.",
    )
    nats_monitor_url: str | None = Field(
        default=None, description="nats-server monitoring URL; the start-up check reads /varz there."
    )
    strict_guarantees: bool = Field(
        default=False, description="Refuse to start when the start-up check finds a problem."
    )

    identity_secret: SecretStr | None = Field(
        default=None,
        description="Secret the gateway signs caller identities with; services trust identities only "
        "when it is set and the signature matches.",
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate the gRPC server presents.")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None, description="CA of the client certificates the gRPC server requires (mTLS)."
    )

    shutdown_grace: PositiveSeconds = Field(
        default=10.0, description="Seconds in-flight calls get to finish after SIGTERM."
    )
    log_level: str = "INFO"

    @field_validator("nats_url")
    @classmethod
    def _check_nats_url(cls, value: str) -> str:
        for server in value.split(","):
            if not server.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError("expected nats://host:port (comma-separated for several)")
        return value

    @field_validator("identity_secret")
    @classmethod
    def _check_identity_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes; generate one with `openssl rand -base64 32`")
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _check_data_dir(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name a directory, or unset it to use ./data")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both TIDINGS_TLS_CERT_FILE and TIDINGS_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "TIDINGS_TLS_CLIENT_CA_FILE needs TIDINGS_TLS_CERT_FILE and TIDINGS_TLS_KEY_FILE"
            )
        return self

    def port_of(self, service: str) -> int:
        """Return the configured port of a service by name, such as ``users``."""
        return int(getattr(self, f"{service}_port"))

    def address_of(self, service: str) -> str:
        """Return ``host:port`` where a service's gRPC server listens."""
        return f"{self.host}:{self.port_of(service)}"

    def database_url_for(self, service: str) -> str:
        """Return the database URL of a service, a SQLite file under data_dir by default.

        A ``{service}`` in TIDINGS_DATABASE_URL is replaced with the service
        name, so one setting gives each service a database of its own.
        """
        if self.database_url:
            return self.database_url.replace("{service}", service)
        return f"sqlite+aiosqlite:///{self.data_dir.resolve() / f'{service}.sqlite3'}"


def _unparsable_variable(message: str, prefix: str) -> str:
    match = re.search(r'field "(\w+)"', message)
    field = match.group(1) if match else "?"
    return f"{prefix}{field.upper()}"


SettingsT = TypeVar("SettingsT", bound=BaseSettings)

_URL_VARIABLES = frozenset({"NATS_URL", "TIDINGS_DATABASE_URL"})
_SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")


def _variable_name(location: tuple[str | int, ...], prefix: str) -> str:
    field = str(location[0]) if location else ""
    if field.upper() in {"NATS_URL", "TIDINGS_NATS_URL"}:
        return "NATS_URL"
    if not field:
        # A check across several settings; its message names them.
        return prefix.rstrip("_") + " settings"
    return f"{prefix}{field.upper()}"


@overload
def load_settings() -> Settings: ...


@overload
def load_settings(settings_class: type[SettingsT]) -> SettingsT: ...


def load_settings(settings_class: type[BaseSettings] = Settings) -> BaseSettings:
    """Read settings of settings_class (the runtime Settings by default) from the environment.

    Raises:
        ConfigurationError: A variable has an invalid value; the message names
            each such variable, its value (secrets masked) and what is expected.
    """
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    try:
        return settings_class()
    except SettingsError as exc:
        # Raised before validation when a list setting is not valid JSON.
        name = _unparsable_variable(str(exc), prefix)
        field = settings_class.model_fields.get(name.removeprefix(prefix).lower())
        annotation = str(field.annotation) if field is not None else ""
        example = '{"users": "127.0.0.1:50051"}' if annotation.startswith("dict") else '[0.5, 2, 10]'
        if "str" in annotation and not annotation.startswith("dict"):
            example = '["https://app.example.com"]'
        raise ConfigurationError(
            f"invalid {name}={os.environ.get(name, '')!r}: expected a JSON value such as {example}"
        ) from exc
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = _variable_name(error["loc"], prefix)
            if not error["loc"]:
                problems.append(f"invalid {name}: {error['msg'].removeprefix('Value error, ')}")
                continue
            value = error.get("input")
            if len(error["loc"]) > 1:
                # An element of a list setting: show the whole value as it was set.
                value = os.environ.get(name, value)
            if name in _URL_VARIABLES and isinstance(value, str):
                value = redact_url(value)
            if any(word in name for word in _SECRET_WORDS):
                value = "***"
            problems.append(f"invalid {name}={value!r}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError("; ".join(dict.fromkeys(problems))) from exc
