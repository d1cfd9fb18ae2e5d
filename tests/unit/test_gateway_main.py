"""The gateway process's own logging guard."""

from __future__ import annotations

import logging
import sys

import pytest
from aiohttp.http_exceptions import LineTooLong

from gateway.main import _NatsErrorReport, _WithoutRequestBytes


def _record_of(error: Exception) -> logging.LogRecord:
    try:
        raise error
    except LineTooLong:
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request",
                                 (), sys.exc_info())


def test_log_filter_drops_request_bytes() -> None:
    record = _record_of(LineTooLong(b"Bearer secret-token-bytes", "8190"))

    _WithoutRequestBytes().filter(record)

    assert "secret" not in record.getMessage()


def test_log_filter_drops_the_traceback() -> None:
    record = _record_of(LineTooLong(b"Bearer secret-token-bytes", "8190"))

    _WithoutRequestBytes().filter(record)

    assert record.exc_info is None


async def test_nats_error_report_warns_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    report = _NatsErrorReport("nats://user:secret-pass@127.0.0.1:4999")

    with caplog.at_level(logging.WARNING, logger="gateway.main"):
        await report.on_error(ConnectionRefusedError("refused"))
        await report.on_error(ConnectionRefusedError("refused"))

    assert len(caplog.records) == 1


async def test_nats_error_report_masks_the_password(caplog: pytest.LogCaptureFixture) -> None:
    report = _NatsErrorReport("nats://user:secret-pass@127.0.0.1:4999")

    with caplog.at_level(logging.WARNING, logger="gateway.main"):
        await report.on_error(ConnectionRefusedError("refused"))

    assert "secret-pass" not in str(caplog.records[0].__dict__)
