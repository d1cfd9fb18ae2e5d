"""Durable pull consumers that apply each event once.

Each handler runs in a database transaction that also records the event id in
``processed_events``, so a redelivered event finds its id there and is acked
without running the handler again. On SQLite a fetched batch runs in order in
one transaction, with a savepoint per event. On PostgreSQL the events of one
aggregate (``ce-subject``) in a batch run one after another, each in its own
transaction, and different aggregates run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError
from sqlalchemy import Table

from observability.messaging import consumer_span, mark_failed
from services.runtime.consumer_spec import (
    ConsumerSettings,
    ConsumerSpec,
    Handler,
    processed_events_table,
)
from services.runtime.database import Database, Transaction
from services.runtime.deadletters import DeadLetterPublisher
from services.runtime.errors import PermanentEventError
from services.runtime.events import EventDecodeError, ReceivedEvent, decode_event
from services.runtime.stall import StallWatch

logger = logging.getLogger(__name__)

__all__ = [
    "ConsumerSettings",
    "ConsumerSpec",
    "EventConsumer",
    "Handler",
    "processed_events_table",
]


@dataclass(frozen=True)
class _Work:
    """A decoded message and the handler that applies it."""

    message: Msg
    event: ReceivedEvent
    payload: Message
    handler: Handler


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
        self._insert_processed = database.insert_ignoring_conflicts(table)
        self._dead_letters = DeadLetterPublisher(self._js, spec.durable, spec.stream)
        self.stall_watch = StallWatch(nats, spec.stream, spec.durable, spec.subjects)
        self.dead_lettered = 0
        self.applied = 0
        self.duplicates = 0

    async def start(self) -> None:
        """Create or update the durable consumer on the server and bind to it."""
        config = ConsumerConfig(
            durable_name=self.spec.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._settings.ack_wait,
            # The consumer counts deliveries itself and dead-letters on the
            # last one. A server-side limit would drop a message whose
            # dead-letter publish failed, instead of delivering it again.
            max_deliver=-1,
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
                await self.stall_watch.on_idle()
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
        work = [item for message in messages if (item := await self._prepare(message)) is not None]
        if not work:
            return

        if self._database.is_sqlite:
            # SQLite runs one transaction at a time anyway, so one transaction
            # per batch (a savepoint per event) saves a commit per event.
            await self._apply_in_one_transaction(work)
            return

        by_aggregate: dict[str, list[_Work]] = {}
        for item in work:
            by_aggregate.setdefault(item.event.subject or item.message.subject, []).append(item)

        async def apply_in_order(group: list[_Work]) -> None:
            for item in group:
                await self._apply_alone(item)

        async with asyncio.TaskGroup() as group_tasks:
            for group in by_aggregate.values():
                group_tasks.create_task(apply_in_order(group))

    async def _prepare(self, message: Msg) -> _Work | None:
        """Decode a message; settle at once what has no handler or cannot be decoded."""
        if logger.isEnabledFor(logging.DEBUG):
            metadata = message.metadata
            logger.debug(
                "message fetched",
                extra={"consumer": self.spec.durable, "stream_sequence": metadata.sequence.stream,
                       "consumer_sequence": metadata.sequence.consumer,
                       "delivery": metadata.num_delivered, "subject": message.subject},
            )
        try:
            event = decode_event(message.headers, message.data)
            payload = event.message()
        except EventDecodeError as exc:
            await self._dead_letter(message, "undecodable", exc)
            return None

        handler = self.spec.handlers.get(event.type)
        if handler is None:
            # The consumer's subjects carried a type it does not know, such
            # as a new event added upstream; keep it for an operator.
            await self._dead_letter(message, "unknown event type", f"no handler for {event.type}")
            return None
        return _Work(message, event, payload, handler)

    async def _apply_alone(self, work: _Work) -> None:
        heartbeat = asyncio.create_task(self._keep_in_progress([work.message]))
        try:
            with self._span(work) as span:
                try:
                    async with self._database.transaction() as tx:
                        applied = await self._record_and_handle(tx, work)
                except Exception as exc:
                    mark_failed(span, exc)
                    outcome: bool | Exception = exc
                else:
                    outcome = applied
        finally:
            heartbeat.cancel()
        await self._settle(work, outcome)

    async def _apply_in_one_transaction(self, batch: list[_Work]) -> None:
        heartbeat = asyncio.create_task(self._keep_in_progress([w.message for w in batch]))
        outcomes: list[bool | Exception] = []
        try:
            async with self._database.transaction() as tx:
                for work in batch:
                    with self._span(work) as span:
                        try:
                            async with tx.savepoint():
                                outcomes.append(await self._record_and_handle(tx, work))
                        except Exception as exc:
                            mark_failed(span, exc)
                            outcomes.append(exc)
        except Exception as exc:
            # The commit failed, so nothing of the batch was applied.
            logger.error("batch commit failed; the events are redelivered",
                         extra={"consumer": self.spec.durable, "events": len(batch)}, exc_info=exc)
            outcomes = [exc] * len(batch)
        finally:
            heartbeat.cancel()

        for work, outcome in zip(batch, outcomes, strict=True):
            await self._settle(work, outcome)

    async def _record_and_handle(self, tx: Transaction, work: _Work) -> bool:
        """Run the handler unless this consumer already applied the event; return whether it ran."""
        inserted = await tx.execute(
            self._insert_processed,
            {"consumer": self.spec.durable, "event_id": work.event.id, "processed_at": datetime.now(UTC)},
        )
        if inserted.rowcount == 0:
            return False
        async with asyncio.timeout(self._settings.handler_timeout):
            await work.handler(tx, work.event, work.payload)
        return True

    async def _settle(self, work: _Work, outcome: bool | Exception) -> None:
        """Ack an applied or duplicate event; schedule a retry for a failed one."""
        if isinstance(outcome, Exception):
            await self._retry_later(work.message, work.event, outcome)
            return
        await work.message.ack()
        if outcome:
            self.applied += 1
            return
        self.duplicates += 1
        logger.info(
            "duplicate event dropped", extra={"consumer": self.spec.durable, "event_id": work.event.id}
        )

    def _span(self, work: _Work) -> Any:
        return consumer_span(
            subject=work.message.subject,
            headers=work.message.headers,
            consumer=self.spec.durable,
            event_id=work.event.id,
            event_type=work.event.type,
            aggregate_id=work.event.subject,
            delivery_count=work.message.metadata.num_delivered,
        )

    async def _retry_later(self, message: Msg, event: ReceivedEvent, error: Exception) -> None:
        delivered = message.metadata.num_delivered
        if isinstance(error, PermanentEventError):
            await self._dead_letter(message, "permanent failure", error)
            return
        if delivered >= self._settings.max_deliver:
            await self._dead_letter(message, f"failed {delivered} deliveries", error)
            return
        backoff = self._settings.backoff
        delay = backoff[min(delivered, len(backoff)) - 1] if backoff else None
        logger.warning(
            "handler failed; redelivery scheduled",
            extra={"consumer": self.spec.durable, "event_id": event.id, "event_type": event.type,
                   "delivery": delivered, "delay": delay},
            exc_info=error,
        )
        await message.nak(delay=delay)

    async def _dead_letter(self, message: Msg, reason: str, error: BaseException | str) -> None:
        """Move a message to the dead letters, or leave it for redelivery if that fails."""
        try:
            await self._dead_letters.publish(message, reason=reason, error=error)
        except (NatsError, JetStreamError, TimeoutError) as exc:
            logger.warning(
                "dead letter not stored; the event is delivered again",
                extra={"consumer": self.spec.durable, "subject": message.subject, "error": repr(exc)},
            )
            await message.nak(delay=self._settings.backoff[-1] if self._settings.backoff else None)
            return
        await message.term()
        self.dead_lettered += 1

    async def _keep_in_progress(self, messages: list[Msg]) -> None:
        """Extend the ack deadline while slow handlers run, so nothing is redelivered meanwhile."""
        interval = self._settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for message in messages:
                with contextlib.suppress(NatsError):
                    await message.in_progress()
