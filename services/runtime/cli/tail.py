"""`tidings events tail`: print events from NATS as they arrive, decoded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

import nats
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg

from observability.logging import redact_url
from services.runtime.cli.supervisor import discover_nats_url
from services.runtime.config import Settings
from services.runtime.events import EventDecodeError, decode_event
from tidings.inventory.v1 import inventory_events_pb2
from tidings.orders.v1 import order_events_pb2
from tidings.payments.v1 import payment_events_pb2
from tidings.users.v1 import user_events_pb2

# Imported so that every event type can be decoded by its name.
EVENT_MODULES = (inventory_events_pb2, order_events_pb2, payment_events_pb2, user_events_pb2)

CONNECT_ATTEMPTS = 3


def describe(message: Msg) -> str:
    """Render one NATS message as a JSON line: type, id, subject, trace id and payload."""
    headers = message.headers or {}
    traceparent = headers.get("traceparent", "")
    trace_id = traceparent.split("-")[1] if traceparent.count("-") >= 3 else None
    entry: dict[str, object] = {"subject": message.subject, "trace_id": trace_id}
    try:
        event = decode_event(headers, message.data)
        entry.update(type=event.type, id=event.id, aggregate=event.subject,
                     time=headers.get("ce-time"))
        entry["payload"] = MessageToDict(event.message())
    except EventDecodeError as exc:
        entry["error"] = str(exc)
        entry["size"] = len(message.data)
    return json.dumps(entry)


async def ignore_error(error: Exception) -> None:
    # A failed connect is reported once by tail_events; nats-py would log a
    # traceback per attempt.
    return None


def subject_problem(subject: str) -> str | None:
    """Return what makes subject an invalid NATS subscription subject, or None when it is valid."""
    tokens = subject.split(".")
    if not subject or any(char.isspace() for char in subject):
        return "a subject is dot-separated tokens with no spaces"
    if any(not token for token in tokens):
        return "a subject has no empty tokens (no leading, trailing or double dots)"
    wildcard_inside = [token for token in tokens if len(token) > 1 and ("*" in token or ">" in token)]
    if wildcard_inside or ">" in tokens[:-1]:
        return "'*' and '>' must be whole tokens, and '>' only the last one"
    return None


async def tail_events(settings: Settings, subject: str, *, count: int = 0) -> int:
    """Subscribe to subject and print each event until Ctrl-C or count events."""
    problem = subject_problem(subject)
    if problem is not None:
        print(f"invalid subject {subject!r}: {problem}; for example 'tidings.users.>' or "
              "'tidings.orders.order.*'", file=sys.stderr)
        return 2
    url = discover_nats_url(settings)
    try:
        client = await nats.connect(
            servers=url.split(","), name="tidings-tail", connect_timeout=2,
            max_reconnect_attempts=CONNECT_ATTEMPTS, allow_reconnect=False, error_cb=ignore_error,
        )
    except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
        print(f"cannot connect to NATS at {redact_url(url)}: {exc}; start the system with "
              "`tidings up` or set NATS_URL to a running server")
        return 1
    done = asyncio.Event()
    received = 0

    async def on_message(message: Msg) -> None:
        nonlocal received
        print(describe(message), flush=True)
        received += 1
        if count and received >= count:
            done.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)

    await client.subscribe(subject, cb=on_message)
    print(f"listening on {subject} at {redact_url(url)}; Ctrl-C stops", flush=True)
    await done.wait()
    with contextlib.suppress(Exception):
        await client.drain()
    return 0
