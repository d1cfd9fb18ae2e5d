"""The gateway process's own logging guard."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import LineTooLong

from gateway.main import _WithoutRequestBytes


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
