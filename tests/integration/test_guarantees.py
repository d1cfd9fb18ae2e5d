"""The start-up guarantee check against a real nats-server: each broken setting is named."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError
from services.runtime.service import Service
from services.users.main import SPEC as USERS
from tests.helpers import running_service


@pytest.fixture
def lazy_sync_monitor() -> Iterator[str]:
    """A stand-in monitoring endpoint whose /varz reports a server that syncs every 2 minutes."""

    class Varz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"jetstream": {"config": {"sync_interval": 120_000_000_000}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Varz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.problem for record in caplog.records if hasattr(record, "problem")]


async def test_embedded_server_passes_strict_check(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime.guarantees")
    strict = settings.model_copy(update={"strict_guarantees": True})

    async with running_service(USERS, strict) as service:
        started = service.port

    assert started > 0
    assert _problems(caplog) == []


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"duplicate_window": 10.0}, "TIDINGS_DUPLICATE_WINDOW"),
        ({"required_replicas": 3}, "TIDINGS_REQUIRED_REPLICAS"),
        ({"consumer_ack_wait": 5.0}, "TIDINGS_CONSUMER_ACK_WAIT"),
        ({"nats_monitor_url": None}, "TIDINGS_NATS_MONITOR_URL"),
    ],
)
async def test_strict_check_refuses_broken_setting(
    settings: Settings, changes: dict[str, object], variable: str
) -> None:
    broken = settings.model_copy(update={"strict_guarantees": True, **changes})
    service = Service(USERS, broken)

    with pytest.raises(ConfigurationError) as raised:
        await service.start()
    await service.stop()

    assert variable in str(raised.value)


async def test_lazy_sync_server_reported(
    settings: Settings, lazy_sync_monitor: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime.guarantees")
    lenient = settings.model_copy(update={"nats_monitor_url": lazy_sync_monitor})

    async with running_service(USERS, lenient):
        pass

    assert any("sync_interval: always" in problem for problem in _problems(caplog))


async def test_too_many_replicas_stops_start(settings: Settings) -> None:
    single_server = settings.model_copy(update={"stream_replicas": 3})
    service = Service(USERS, single_server)

    with pytest.raises(ConfigurationError) as raised:
        await service.start()
    await service.stop()

    assert "TIDINGS_STREAM_REPLICAS" in str(raised.value)
