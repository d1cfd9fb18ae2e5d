"""JetStream streams: one per bounded context, created or updated at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """A stream over every subject of one context, such as USERS over ``tidings.users.>``."""

    name: str
    subjects: tuple[str, ...]


USERS = StreamSpec("USERS", ("tidings.users.>",))
ORDERS = StreamSpec("ORDERS", ("tidings.orders.>",))
INVENTORY = StreamSpec("INVENTORY", ("tidings.inventory.>",))
PAYMENTS = StreamSpec("PAYMENTS", ("tidings.payments.>",))

ALL_STREAMS = (USERS, ORDERS, INVENTORY, PAYMENTS)


async def ensure_stream(
    js: JetStreamContext, spec: StreamSpec, *, replicas: int, duplicate_window: float
) -> None:
    """Create the stream, or update it when its subjects or settings differ."""
    desired = StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window,
    )
    try:
        current = (await js.stream_info(spec.name)).config
    except NotFoundError:
        await js.add_stream(desired)
        logger.info("stream created", extra={"stream": spec.name, "replicas": replicas})
        return

    if (
        sorted(current.subjects or []) != sorted(spec.subjects)
        or current.num_replicas != replicas
        or current.duplicate_window != duplicate_window
    ):
        current.subjects = list(spec.subjects)
        current.num_replicas = replicas
        current.duplicate_window = duplicate_window
        await js.update_stream(current)
        logger.info("stream updated", extra={"stream": spec.name, "replicas": replicas})
