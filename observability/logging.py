"""JSON-lines logging with the service name and the current trace and span ids."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else came in through `extra=` and
# is written as a field of its own.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object with trace ids and `extra` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }

        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")

        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value

        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record of this process to stderr as JSON lines.

    Args:
        service: Name written into every line, such as ``users``.
        level: Root level name, such as ``INFO`` or ``DEBUG``.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    # The OTLP exporter logs a warning per failed batch and per retry; the
    # tracing module reports an unreachable collector once instead.
    logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)


def redact_url(url: str) -> str:
    """Return the URL with its secrets masked, safe to write to a log.

    Handles comma-separated server lists and bracketed IPv6 hosts. Passwords
    are masked everywhere; a NATS URL's lone user part is a token and is
    masked too, while a database URL keeps its user name.
    """
    return _CREDENTIALS.sub(_mask_credentials, url)


# scheme://user:password@ or scheme://token@, up to the first "@" of that URL.
_CREDENTIALS = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^:@/,\s]*)(?P<password>:[^@/,\s]*)?@"
)
_TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


def _mask_credentials(match: re.Match[str]) -> str:
    scheme = match.group("scheme")
    if match.group("password") is not None:
        return f"{scheme}://{match.group('user')}:***@"
    if scheme.lower() in _TOKEN_SCHEMES:
        return f"{scheme}://***@"
    return match.group(0)
