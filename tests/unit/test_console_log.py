"""Unit tests of services/runtime/cli/console_log.py: JSON log lines as text for a terminal."""

from __future__ import annotations

import json
from typing import Any

from services.runtime.cli.console_log import render_line

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def _line(**fields: Any) -> str:
    entry = {"time": "2026-12-05T10:11:12.345+00:00", "level": "INFO", "service": "users",
             "logger": "services.runtime.service", "message": "service ready", **fields}
    return json.dumps(entry) + "\n"


def test_render_line_starts_with_columns() -> None:
    assert render_line("users", _line()).startswith("10:11:12.345 users          INFO ")


def test_render_line_shows_the_message() -> None:
    assert render_line("users", _line()).endswith("INFO  service ready")


def test_render_line_shows_extra_fields() -> None:
    text = render_line("users", _line(port=50051, event_id="e-1"))

    assert text.endswith("service ready  port=50051 event_id=e-1")


def test_render_line_shows_the_trace_id_last() -> None:
    text = render_line("users", _line(trace_id=TRACE_ID, span_id="b7ad6b7169203331", user_id="u-1"))

    assert text.endswith(f"user_id=u-1 trace={TRACE_ID}")


def test_render_line_quotes_values_with_spaces() -> None:
    assert render_line("users", _line(error="disk is full")).endswith('error="disk is full"')


def test_render_line_indents_the_exception_below() -> None:
    text = render_line("users", _line(exception="Traceback (most recent call last):\nValueError: bad"))

    assert text.splitlines()[1:] == ["    Traceback (most recent call last):", "    ValueError: bad"]


def test_render_line_of_plain_text() -> None:
    assert render_line("orders", "Fatal Python error: Aborted\n") == (
        " " * 12 + " orders         Fatal Python error: Aborted"
    )


def test_render_line_of_json_array() -> None:
    assert render_line("orders", "[1, 2]").endswith("orders         [1, 2]")


def test_render_line_colors_the_level_when_asked() -> None:
    assert "\x1b[33mWARNING\x1b[0m" in render_line("users", _line(level="WARNING"), color=True)


def test_render_line_plain_without_color() -> None:
    assert "\x1b" not in render_line("users", _line(level="WARNING"))


def test_render_line_compact_json_values() -> None:
    assert render_line("gateway", _line(algorithms=["HS256"], issuer=None)).endswith(
        'algorithms=["HS256"] issuer=null'
    )
