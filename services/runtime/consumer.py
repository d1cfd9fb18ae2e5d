"""Durable pull consumers that apply each event once.

Each handler runs in a database transaction that also records the event id in
``processed_events``; a redelivered event finds its id there and is acked
without running the handler again. Events of one aggregate (``ce-subject``)
within a fetched batch run one after another; different aggregates run
concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from sqlalchemy import Column, DateTime, MetaData, String, Table

from observability.propagation import extract_context
from services.runtime.database import Database, Transaction
from services.runtime.events import EventDecodeError, ReceivedEvent, decode_event

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Handler = Callable[[Transaction, ReceivedEvent, Message], Awaitable[None]]


def processed_events_table(metadata: MetaData) -> Table:
    """Define the ``processed_events`` (inbox) table on a service's metadata."""
    return Table(
        "processed_events",
        metadata,
        Column("consumer", String(128), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
    )


@dataclass(frozen=True)
class ConsumerSpec:
    """What one durable consumer reads and which handler each event type gets.

    Attributes:
        durable: Durable consumer name, shared by every replica of the service.
        stream: Stream to read, such as ``USERS``.
        subjects: Subject filters within the stream.
        handlers: Handler per CloudEvents type (full protobuf name). Events of
            other types are acknowledged and skipped.
    """

    durable: str
    stream: str
    subjects: tuple[str, ...]
    handlers: Mapping[str, Handler]


@dataclass(frozen=True)
class ConsumerSettings:
    """Delivery settings of a consumer; see Settings for their meaning."""

    batch_size: int
    ack_wait: float
    max_deliver: int
    backoff: tuple[float, ...]


class EventConsumer:
    """Fetches batches from one durable consumer and applies them until stopped."""

    def __init__(
        self,
        spec: ConsumerSpec,
        database: Database,
        table: Table,
        nats: NATS,
        settings: ConsumerSettings,
    ) -> None:
        self.spec = spec
        self._database = database
        self._table = table
        self._js = nats.jetstream()
        self._settings = settings
        self._stopping = asyncio.Event()
        self.applied = 0
        self.duplicates = 0

    async def start(self) -> None:
        """Create or update the durable consumer on the server and bind to it."""
        config = ConsumerConfig(
            durable_name=self.spec.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._settings.ack_wait,
            max_deliver=self._settings.max_deliver,
            filter_subjects=list(self.spec.subjects),
            max_ack_pending=max(1000, self._settings.batch_size * 4),
        )
        await self._js.add_consumer(self.spec.stream, config)
        self._subscription = await self._js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.spec.stream
        )
        logger.info(
            "consumer started",
            extra={"consumer": self.spec.durable, "stream": self.spec.stream},
        )

    def stop(self) -> None:
        """Stop fetching; run() returns once the batch in progress is applied and acked."""
        self._stopping.set()

    async def run(self) -> None:
        """Fetch and apply batches until stop() is called."""
        stop_requested = asyncio.ensure_future(self._stopping.wait())
        while not self._stopping.is_set():
            fetch = asyncio.ensure_future(
                self._subscription.fetch(self._settings.batch_size, timeout=1.0)
            )
            # Waiting on stop too lets shutdown skip the rest of an idle fetch.
            # Messages of a cancelled fetch are not acked, so JetStream
            # redelivers them after ack_wait; none is lost.
            await asyncio.wait({fetch, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
                break
            try:
                messages = fetch.result()
            except (NatsTimeoutError, TimeoutError):
                continue
            except (NatsError, JetStreamError) as exc:
                logger.warning(
                    "fetch failed; retrying",
                    extra={"consumer": self.spec.durable, "error": repr(exc)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
                continue
            await self._apply_batch(messages)

        stop_requested.cancel()
        # An open pull subscription would hold up the connection's drain.
        with contextlib.suppress(NatsError, JetStreamError):
            await self._subscription.unsubscribe()

    async def _apply_batch(self, messages: list[Msg]) -> None:
        by_aggregate: dict[str, list[Msg]] = {}
        for message in messages:
            key = (message.headers or {}).get("ce-subject", message.subject)
            by_aggregate.setdefault(key, []).append(message)

        async def apply_in_order(group: list[Msg]) -> None:
            for message in group:
                await self._apply(message)

        async with asyncio.TaskGroup() as group_tasks:
            for group in by_aggregate.values():
                group_tasks.create_task(apply_in_order(group))

    async def _apply(self, message: Msg) -> None:
        try:
            event = decode_event(message.headers, message.data)
            payload = event.message()
        except EventDecodeError as exc:
            # NOTE: terminated, not dead-lettered; the log line is the only record.
            logger.error(
                "event cannot be decoded; terminated",
                extra={"consumer": self.spec.durable, "subject": message.subject, "error": str(exc)},
            )
            await message.term()
            return

        handler = self.spec.handlers.get(event.type)
        if handler is None:
            logger.debug("no handler for event type; skipped", extra={"event_type": event.type})
            await message.ack()
            return

        parent = extract_context(message.headers)
        producer = trace.get_current_span(parent).get_span_context()
        with tracer.start_as_current_span(
            f"process {message.subject}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=[Link(producer)] if producer.is_valid else None,
            attributes=self._span_attributes(message, event),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            heartbeat = asyncio.create_task(self._keep_in_progress(message))
            try:
                applied = await self._apply_once(event, payload, handler)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                await self._retry_later(message, event, exc)
                return
            finally:
                heartbeat.cancel()
            await message.ack()

        if applied:
            self.applied += 1
        else:
            self.duplicates += 1
            logger.info(
                "duplicate event dropped",
                extra={"consumer": self.spec.durable, "event_id": event.id},
            )

    async def _apply_once(self, event: ReceivedEvent, payload: Message, handler: Handler) -> bool:
        """Run the handler unless this consumer already applied the event; return whether it ran."""
        async with self._database.transaction() as tx:
            inserted = await tx.execute(
                self._database.insert_ignoring_conflicts(self._table).values(
                    consumer=self.spec.durable, event_id=event.id, processed_at=datetime.now(UTC)
                )
            )
            if inserted.rowcount == 0:
                return False
            await handler(tx, event, payload)
        return True

    async def _retry_later(self, message: Msg, event: ReceivedEvent, error: Exception) -> None:
        delivered = message.metadata.num_delivered
        fields = {
            "consumer": self.spec.durable,
            "event_id": event.id,
            "event_type": event.type,
            "delivery": delivered,
        }
        if delivered >= self._settings.max_deliver:
            # NOTE: terminated, not dead-lettered; the log line is the only record.
            logger.error("handler failed on the last delivery; event terminated", extra=fields,
                         exc_info=error)
            await message.term()
            return
        backoff = self._settings.backoff
        delay = backoff[min(delivered, len(backoff)) - 1] if backoff else None
        logger.warning("handler failed; redelivery scheduled", extra={**fields, "delay": delay},
                       exc_info=error)
        await message.nak(delay=delay)

    async def _keep_in_progress(self, message: Msg) -> None:
        """Extend the ack deadline while a slow handler runs, so it is not redelivered meanwhile."""
        interval = self._settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(NatsError):
                await message.in_progress()

    def _span_attributes(self, message: Msg, event: ReceivedEvent) -> dict[str, str | int]:
        return {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.subject,
            "messaging.consumer.group.name": self.spec.durable,
            "messaging.message.id": event.id,
            "messaging.message.delivery_count": message.metadata.num_delivered,
            "cloudevents.event_id": event.id,
            "cloudevents.event_type": event.type,
            "cloudevents.event_subject": event.subject,
        }
