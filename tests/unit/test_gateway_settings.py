"""Gateway settings and the runtime settings the gateway added, read from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from services.runtime.config import load_settings
from services.runtime.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TIDINGS_") or name == "NATS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _gateway_error() -> str:
    with pytest.raises(ConfigurationError) as raised:
        load_settings(GatewaySettings)
    return str(raised.value)


def _runtime_error() -> str:
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    return str(raised.value)


def test_gateway_settings_without_a_key_name_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "TIDINGS_GATEWAY_JWT_HS256_SECRET" in _gateway_error()


def test_gateway_settings_credentials_with_wildcard_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_GATEWAY_AUTH_ENABLED", "false")
    monkeypatch.setenv("TIDINGS_GATEWAY_CORS_ORIGINS", '["*"]')
    monkeypatch.setenv("TIDINGS_GATEWAY_CORS_ALLOW_CREDENTIALS", "true")

    assert "TIDINGS_GATEWAY_CORS_ALLOW_CREDENTIALS=true cannot be combined" in _gateway_error()


def test_gateway_settings_invalid_secret_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_GATEWAY_JWT_HS256_SECRET", "s3cr3t-value")
    monkeypatch.setenv("TIDINGS_GATEWAY_MAX_BODY_BYTES", "12")

    assert "s3cr3t-value" not in _gateway_error()


def test_gateway_settings_backends_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_GATEWAY_AUTH_ENABLED", "false")
    monkeypatch.setenv("TIDINGS_GATEWAY_BACKENDS", '{"users": "10.0.0.5:50051,10.0.0.6:50051"}')

    assert load_settings(GatewaySettings).backends == {"users": "10.0.0.5:50051,10.0.0.6:50051"}


def test_identity_secret_shorter_than_32_bytes_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_IDENTITY_SECRET", "short")

    message = _runtime_error()

    assert "TIDINGS_IDENTITY_SECRET" in message
    assert "'short'" not in message


def test_tls_key_without_certificate_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TLS_KEY_FILE", "/tmp/key.pem")

    assert "TIDINGS_TLS_CERT_FILE and TIDINGS_TLS_KEY_FILE" in _runtime_error()


def test_tls_client_ca_without_certificate_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TLS_CLIENT_CA_FILE", "/tmp/ca.pem")

    assert "TIDINGS_TLS_CLIENT_CA_FILE needs" in _runtime_error()
