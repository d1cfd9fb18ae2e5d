"""`tidings token` and how `tidings up` names the gateway's URL."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import jwt
import pytest

from services.runtime.cli import supervisor
from services.runtime.cli.embedded_nats import free_port
from services.runtime.cli.supervisor import Supervisor, discover_nats_url
from services.runtime.cli.token import print_token
from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError

SECRET = "a-local-secret-that-is-long-enough-for-hs256"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("TIDINGS_GATEWAY_JWT_HS256_SECRET", raising=False)
    monkeypatch.delenv("TIDINGS_GATEWAY_TLS_CERT_FILE", raising=False)
    return Settings(data_dir=tmp_path / "data")


def _write_secret(settings: Settings) -> None:
    path = settings.data_dir / "secrets" / "jwt"
    path.parent.mkdir(parents=True)
    path.write_text(SECRET)


def test_token_without_a_secret_exits_with_2(settings: Settings) -> None:
    assert print_token(settings, "ada", None, 60) == 2


def test_token_with_an_unknown_scope_exits_with_2(settings: Settings) -> None:
    _write_secret(settings)

    assert print_token(settings, "ada", ["users:admin"], 60) == 2


def test_token_carries_the_chosen_scope(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    _write_secret(settings)

    print_token(settings, "ada", ["users:read"], 60)

    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["scope"] == "users:read"


def test_supervisor_gateway_url_is_http_by_default(settings: Settings) -> None:
    assert Supervisor(settings)._gateway_url() == "http://127.0.0.1:8080"


def test_supervisor_gateway_url_is_https_with_a_certificate(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDINGS_GATEWAY_TLS_CERT_FILE", "/etc/gateway.pem")

    assert Supervisor(settings)._gateway_url() == "https://127.0.0.1:8080"


async def test_supervisor_rejects_unusable_data_dir(settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unusable = settings.model_copy(update={"data_dir": blocker / "data"})

    with pytest.raises(ConfigurationError, match="set TIDINGS_DATA_DIR to a directory"):
        await Supervisor(unusable).run()


def test_discover_nats_url_notes_the_fallback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)

    discover_nats_url(settings)

    assert "Set NATS_URL, or TIDINGS_DATA_DIR" in capsys.readouterr().err


def test_discover_nats_url_reads_the_recorded_url(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "nats.url").write_text("nats://127.0.0.1:4999\n")

    assert discover_nats_url(settings) == "nats://127.0.0.1:4999"


async def test_supervisor_rejects_two_services_on_one_port(settings: Settings) -> None:
    names = ("users", "inventory", "payments", "notifications", "gateway")
    ports = {f"{name}_port": free_port() for name in names}
    clashing = settings.model_copy(update={**ports, "orders_port": ports["users_port"]})

    with pytest.raises(ConfigurationError, match="TIDINGS_USERS_PORT and TIDINGS_ORDERS_PORT"):
        await Supervisor(clashing).run()


async def test_supervisor_rejects_taken_chosen_nats_port(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("TIDINGS_EMBEDDED_NATS_PORT", str(port))
        monkeypatch.delenv("NATS_URL", raising=False)
        chosen = settings.model_copy(update={"embedded_nats_port": port})

        with pytest.raises(ConfigurationError, match="TIDINGS_EMBEDDED_NATS_PORT"):
            await Supervisor(chosen, services=(), gateway=False).run()


async def test_supervisor_names_services_not_ready(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(supervisor, "READY_TIMEOUT", 0.6)
    monkeypatch.setattr(supervisor, "READY_PROGRESS_INTERVAL", 0.2)
    idle = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
    waiting = Supervisor(settings)
    # Nothing listens on a fresh free port, so the health check never passes.
    waiting.children.append(supervisor.Child("users", f"127.0.0.1:{free_port()}", idle))
    try:
        ready = await waiting._wait_until_ready()
    finally:
        idle.kill()
        await idle.wait()

    assert ready is False
    assert "still waiting for users to be SERVING" in capsys.readouterr().err
