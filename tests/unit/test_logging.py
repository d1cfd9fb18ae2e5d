"""Unit tests of observability/logging.py.

Spans come from the global SDK tracer provider that tests/conftest.py installs.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry import trace

from observability.logging import JsonFormatter, redact_url


class _Capture:
    """A logger whose records are formatted by JsonFormatter into a string buffer."""

    def __init__(self, logger: logging.Logger, stream: io.StringIO) -> None:
        self.logger = logger
        self._stream = stream

    def lines(self) -> list[str]:
        return self._stream.getvalue().splitlines()

    def entry(self) -> dict[str, Any]:
        """Return the only line written so far, parsed."""
        lines = self.lines()
        assert len(lines) == 1, f"expected one log line, got {lines}"
        return json.loads(lines[0])


@pytest.fixture
def capture() -> Iterator[_Capture]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("users"))
    logger = logging.getLogger("tests.unit.logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    yield _Capture(logger, stream)

    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def test_json_formatter_one_object_per_record(capture: _Capture) -> None:
    capture.logger.info("first")
    capture.logger.info("second line\nwith a newline")

    lines = capture.lines()

    assert len(lines) == 2
    assert json.loads(lines[1])["message"] == "second line\nwith a newline"


def test_json_formatter_standard_fields(capture: _Capture) -> None:
    capture.logger.warning("user %s created", "42")

    entry = capture.entry()

    assert entry["level"] == "WARNING"
    assert entry["service"] == "users"
    assert entry["logger"] == "tests.unit.logging"
    assert entry["message"] == "user 42 created"


def test_json_formatter_time_utc_milliseconds(capture: _Capture) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    capture.logger.info("started")

    logged_time = datetime.fromisoformat(capture.entry()["time"])

    assert logged_time.utcoffset().total_seconds() == 0
    assert logged_time >= before
    assert logged_time.microsecond % 1000 == 0


def test_json_formatter_no_span_no_ids(capture: _Capture) -> None:
    capture.logger.info("outside any span")

    entry = capture.entry()

    assert "trace_id" not in entry
    assert "span_id" not in entry


def test_json_formatter_current_span_ids(capture: _Capture) -> None:
    tracer = trace.get_tracer("tests.unit.logging")

    with tracer.start_as_current_span("handle") as span:
        capture.logger.info("inside a span")
    span_context = span.get_span_context()

    entry = capture.entry()
    assert entry["trace_id"] == format(span_context.trace_id, "032x")
    assert entry["span_id"] == format(span_context.span_id, "016x")


def test_json_formatter_extra_fields_as_keys(capture: _Capture) -> None:
    capture.logger.info(
        "call rejected", extra={"rpc_method": "/tidings.users.v1.UserService/GetUser", "code": "NOT_FOUND"}
    )

    entry = capture.entry()

    assert entry["rpc_method"] == "/tidings.users.v1.UserService/GetUser"
    assert entry["code"] == "NOT_FOUND"


def test_json_formatter_non_json_extra_as_string(capture: _Capture) -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    capture.logger.info("event stored", extra={"event_time": when})

    assert capture.entry()["event_time"] == str(when)


def test_json_formatter_record_attributes_omitted(capture: _Capture) -> None:
    capture.logger.info("plain")

    entry = capture.entry()

    assert set(entry) == {"time", "level", "service", "logger", "message"}


def test_json_formatter_exception_traceback(capture: _Capture) -> None:
    try:
        raise RuntimeError("database is locked")
    except RuntimeError:
        capture.logger.exception("call failed")

    entry = capture.entry()

    assert entry["level"] == "ERROR"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: database is locked" in entry["exception"]


def test_redact_url_hides_password() -> None:
    redacted = redact_url("nats://user:secret@host:4222")

    assert redacted == "nats://user:***@host:4222"


def test_redact_url_without_port() -> None:
    redacted = redact_url("postgresql+asyncpg://tidings:secret@db.internal/tidings?ssl=require")

    assert redacted == "postgresql+asyncpg://tidings:***@db.internal/tidings?ssl=require"


def test_redact_url_without_password_unchanged() -> None:
    redacted = redact_url("nats://127.0.0.1:4222")

    assert redacted == "nats://127.0.0.1:4222"


def test_redact_url_sqlite_path_unchanged() -> None:
    redacted = redact_url("sqlite+aiosqlite:////var/lib/tidings/users.sqlite3")

    assert redacted == "sqlite+aiosqlite:////var/lib/tidings/users.sqlite3"


def test_redact_url_cluster_with_credentials() -> None:
    urls = "nats://user:secret@127.0.0.1:4222,nats://user:secret@127.0.0.1:4223"

    redacted = redact_url(urls)

    assert "secret" not in redacted


def test_redact_url_cluster_second_server_password() -> None:
    redacted = redact_url("nats://127.0.0.1:4222,nats://user:secret@127.0.0.1:4223")

    assert "secret" not in redacted


def test_redact_url_ipv6_brackets_kept() -> None:
    redacted = redact_url("nats://user:secret@[::1]:4222")

    assert redacted == "nats://user:***@[::1]:4222"


def test_redact_url_port_out_of_range() -> None:
    redacted = redact_url("nats://user:secret@127.0.0.1:422200")

    assert "secret" not in redacted
