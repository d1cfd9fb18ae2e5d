"""Fixtures shared by every test: a real nats-server, settings, in-memory spans."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
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
        nats_monitor_url=nats_server.monitor_url,
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


POSTGRES_ADMIN_URL = os.environ.get(
    "TIDINGS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


SERVICE_NAMES = ("users", "orders", "inventory", "payments", "notifications")


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A database URL template with one new, empty PostgreSQL database per service.

    The URL contains ``{service}``, which Settings.database_url_for replaces
    with the service name. The databases are dropped afterwards. Uses the
    server at TIDINGS_TEST_POSTGRES_URL (default: the local one with trust
    authentication); the test is skipped, saying why, when none accepts a connection.
    """
    prefix = f"tidings_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL} ({exc}); set TIDINGS_TEST_POSTGRES_URL")
    names = [f"{prefix}_{service}" for service in SERVICE_NAMES]
    try:
        for name in names:
            await admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        yield f"{base}/{prefix}_{{service}}"
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
