"""Unit tests of services/runtime/config.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.runtime.config import DEFAULT_PORTS, load_settings
from services.runtime.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Remove TIDINGS_* and NATS_URL from the environment and run in tmp_path."""
    for name in list(os.environ):
        if name.startswith("TIDINGS_") or name == "NATS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _configuration_error() -> str:
    with pytest.raises(ConfigurationError) as raised:
        load_settings()
    return str(raised.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("abc", "valid integer", id="not-a-number"),
        pytest.param("0", "greater than or equal to 1", id="zero"),
        pytest.param("-1", "greater than or equal to 1", id="negative"),
        pytest.param("70000", "less than or equal to 65535", id="above-65535"),
    ],
)
def test_port_invalid_names_variable(monkeypatch: pytest.MonkeyPatch, value: str, problem: str) -> None:
    monkeypatch.setenv("TIDINGS_USERS_PORT", value)

    message = _configuration_error()

    assert f"invalid TIDINGS_USERS_PORT={value!r}" in message
    assert problem in message


@pytest.mark.parametrize("value", ["1", "65535"])
def test_port_limits_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TIDINGS_USERS_PORT", value)

    settings = load_settings()

    assert settings.port_of("users") == int(value)


def test_settings_every_invalid_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_USERS_PORT", "abc")
    monkeypatch.setenv("TIDINGS_LOG_LEVEL", "LOUD")

    message = _configuration_error()

    assert "TIDINGS_USERS_PORT='abc'" in message
    assert "TIDINGS_LOG_LEVEL='LOUD'" in message


def test_nats_url_invalid_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "http://x")

    message = _configuration_error()

    assert message.startswith("invalid NATS_URL='http://x'")


def test_nats_url_invalid_shows_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "http://x")

    message = _configuration_error()

    assert "'http://x'" in message
    assert "expected nats://host:port" in message


def test_nats_url_one_bad_server_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4222,127.0.0.1:4223")

    message = _configuration_error()

    assert "expected nats://host:port" in message


def test_nats_url_invalid_hides_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "http://alice:s3cret-pw@127.0.0.1:4222")

    message = _configuration_error()

    assert "s3cret-pw" not in message
    assert "'http://alice:***@127.0.0.1:4222'" in message


def test_tidings_nats_url_invalid_hides_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_NATS_URL", "http://alice:s3cret-pw@127.0.0.1:4222")

    message = _configuration_error()

    assert "s3cret-pw" not in message


def test_nats_url_bad_port_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "http://alice:s3cret-pw@127.0.0.1:422200")

    message = _configuration_error()

    assert "s3cret-pw" not in message


def test_nats_url_bad_cluster_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://alice:s3cret-pw@127.0.0.1:4222,127.0.0.1:4223")

    message = _configuration_error()

    assert "s3cret-pw" not in message


def test_nats_url_cluster_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    urls = "nats://127.0.0.1:4222, tls://127.0.0.1:4223,ws://127.0.0.1:8080"
    monkeypatch.setenv("NATS_URL", urls)

    settings = load_settings()

    assert settings.nats_url == urls


def test_nats_url_tidings_prefix_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_NATS_URL", "nats://127.0.0.1:4333")

    settings = load_settings()

    assert settings.nats_url == "nats://127.0.0.1:4333"


def test_settings_default_nats_url() -> None:
    settings = load_settings()

    assert settings.nats_url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("service", "port"),
    [
        ("users", 50051),
        ("orders", 50052),
        ("inventory", 50053),
        ("payments", 50054),
        ("notifications", 50055),
        ("gateway", 8080),
    ],
)
def test_settings_default_ports(service: str, port: int) -> None:
    settings = load_settings()

    assert settings.port_of(service) == port


def test_settings_default_ports_cover_all_services() -> None:
    assert set(DEFAULT_PORTS) == {"users", "orders", "inventory", "payments", "notifications", "gateway"}


def test_settings_port_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_ORDERS_PORT", "6000")

    settings = load_settings()

    assert settings.address_of("orders") == "127.0.0.1:6000"


def test_database_url_default_sqlite_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIDINGS_DATA_DIR", str(tmp_path / "data"))

    settings = load_settings()

    database_file = (tmp_path / "data").resolve() / "users.sqlite3"
    assert settings.database_url_for("users") == f"sqlite+aiosqlite:///{database_file}"


def test_database_url_relative_data_dir_resolved(tmp_path: Path) -> None:
    settings = load_settings()

    database_file = tmp_path.resolve() / "data" / "notifications.sqlite3"
    assert settings.database_url_for("notifications") == f"sqlite+aiosqlite:///{database_file}"


def test_database_url_explicit_used_for_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_DATABASE_URL", "postgresql+asyncpg://tidings@127.0.0.1/tidings")

    settings = load_settings()

    assert settings.database_url_for("users") == "postgresql+asyncpg://tidings@127.0.0.1/tidings"
    assert settings.database_url_for("orders") == "postgresql+asyncpg://tidings@127.0.0.1/tidings"


def test_log_level_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_LOG_LEVEL", "debug")

    settings = load_settings()

    assert settings.log_level == "DEBUG"


def test_consumer_backoff_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_CONSUMER_BACKOFF", "[1, 5.5]")

    settings = load_settings()

    assert settings.consumer_backoff == (1.0, 5.5)


def test_consumer_backoff_zero_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_CONSUMER_BACKOFF", "[0]")

    message = _configuration_error()

    assert "invalid TIDINGS_CONSUMER_BACKOFF=" in message


def test_backoff_not_json_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_CONSUMER_BACKOFF", "2,3")

    with pytest.raises(ConfigurationError) as raised:
        load_settings()

    assert "TIDINGS_CONSUMER_BACKOFF='2,3'" in str(raised.value)


def test_backoff_not_json_gives_a_list_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_CONSUMER_BACKOFF", "[1,")

    assert _configuration_error().endswith("expected a JSON value such as [0.5, 2, 10]")


def test_empty_data_dir_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_DATA_DIR", " ")

    assert "invalid TIDINGS_DATA_DIR=' ': is empty" in _configuration_error()


def test_configuration_error_has_no_validator_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_LOG_LEVEL", "loud")

    assert "Value error" not in _configuration_error()
