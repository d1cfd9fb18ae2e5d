"""Service log lines made readable for a person at a terminal.

`tidings up` reads each process's JSON log lines and prints them as
``12:00:01.234 users         INFO  consumer started  consumer=… trace=…``,
one column per service, so that the output of six processes in one terminal
can be followed by eye. A line that is not a JSON object, such as the output
of a crashed interpreter, is printed as it came, after the service name.
"""

from __future__ import annotations

import json
from typing import Any

# Fields shown in fixed places of the line, not again among the key=value pairs.
_PLACED_FIELDS = frozenset(
    {"time", "level", "service", "logger", "message", "trace_id", "span_id", "exception"}
)

# Width of the service column: the longest name `tidings up` starts, plus room.
SERVICE_WIDTH = 14

_LEVEL_COLORS = {"DEBUG": "2", "INFO": "32", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}


def render_line(service: str, line: str, *, color: bool = False) -> str:
    """Return one log line of service as text for a terminal, without a trailing newline.

    Args:
        service: Name of the process that wrote the line, such as ``users``.
        line: The line as the process wrote it, with or without its newline.
        color: Whether to color the level with ANSI escape codes.
    """
    line = line.rstrip("\n")
    entry = _json_object(line)
    name = service.ljust(SERVICE_WIDTH)
    if entry is None:
        return f"{' ' * 12} {name} {line}"

    level = str(entry.get("level", ""))
    shown_level = level.ljust(5)
    if color and level in _LEVEL_COLORS:
        shown_level = f"\x1b[{_LEVEL_COLORS[level]}m{shown_level}\x1b[0m"
    parts = [_clock(entry.get("time")), name, shown_level, str(entry.get("message", ""))]
    fields = [f"{key}={_value(value)}" for key, value in entry.items() if key not in _PLACED_FIELDS]
    if "trace_id" in entry:
        fields.append(f"trace={entry['trace_id']}")
    if fields:
        parts.append(" ".join(fields))
    # One space after each column, and two between the message and its fields.
    text = " ".join(parts[:3]) + " " + "  ".join(parts[3:])

    exception = entry.get("exception")
    if exception:
        indented = "\n".join(f"    {row}" for row in str(exception).splitlines())
        text += "\n" + indented
    return text


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _clock(time: Any) -> str:
    """Return the HH:MM:SS.mmm part of an ISO 8601 time, or the value padded when it has none."""
    text = str(time or "")
    _, separator, rest = text.partition("T")
    return rest[:12] if separator else text.ljust(12)


def _value(value: Any) -> str:
    """Return a field value as one token: text as it is or quoted when it has spaces, others as JSON."""
    if not isinstance(value, str):
        return json.dumps(value, default=str, separators=(",", ":"))
    if not value or any(char.isspace() or char == '"' for char in value):
        return json.dumps(value)
    return value
