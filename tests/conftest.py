"""Fixtures shared by every test: a real nats-server, settings, in-memory spans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.config import Settings

_EXPORTER = InMemorySpanExporter()


def pytest_configure(config: pytest.Config) -> None:
    # The global tracer provider can be set once per process; every in-process
    # test shares this one and clears its spans through the `spans` fixture.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter every in-process span ends up in, emptied for this test."""
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A JetStream nats-server of this test on a free loopback port."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(tmp_path: Path, nats_server: EmbeddedNats) -> Settings:
    """Settings pointing at the test's nats-server, SQLite files in tmp_path and free ports."""
    return Settings(
        nats_url=nats_server.url,
        data_dir=tmp_path / "data",
        users_port=free_port(),
        orders_port=free_port(),
        inventory_port=free_port(),
        payments_port=free_port(),
        notifications_port=free_port(),
        relay_poll_interval=0.2,
        consumer_backoff=(0.1, 0.2, 0.5),
        shutdown_grace=5.0,
    )
