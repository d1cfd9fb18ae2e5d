"""Durable pull consumers that apply each event once.

Each handler runs in a database transaction that also records the event id in
``processed_events``, so a redelivered event finds its id there and is acked
without running the handler again. On SQLite a fetched batch runs in order in
one transaction, with a savepoint per event. On PostgreSQL the events of one
aggregate (``ce-subject``) in a batch run one after another, each in its own
transaction, and different aggregates run concurrently.

A failed event is retried in this process while the later events of its
aggregate wait behind it (services/runtime/blocked.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import Error as JetStreamError
from sqlalchemy import Table

from observability.messaging import consumer_span, mark_failed
from services.runtime.blocked import BlockedEntities, Delivery, FailureCounts, keep_in_progress
from services.runtime.consumer_spec import (
    ConsumerSettings,
    ConsumerSpec,
    Handler,
    processed_events_table,
)
from services.runtime.database import Database, Transaction
from services.runtime.deadletters import DeadLetterPublisher
from services.runtime.events import EventDecodeError, decode_event
from services.runtime.stall import StallWatch

logger = logging.getLogger(__name__)

# Seconds a fetch waits for messages before the loop looks at stop() again.
FETCH_TIMEOUT = 1.0

__all__ = [
    "ConsumerSettings",
    "ConsumerSpec",
    "EventConsumer",
    "Handler",
    "processed_events_table",
]


# The outcome of an event that was not applied because an earlier event of its
# entity failed in the same batch.
_WAITING = "waiting"


class EventConsumer:
    """Fetches batches from one durable consumer and applies them until stopped."""

    def __init__(
        self,
        spec: ConsumerSpec,
        database: Database,
        table: Table,
        nats: NATS,
        settings: ConsumerSettings,
        failures_table: Table,
    ) -> None:
        """Prepare a consumer. start() creates it on the server.

        Args:
            table: The service's ``processed_events`` table.
            failures_table: The service's ``event_failures`` table.
        """
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
        self._failures = FailureCounts(database, failures_table, spec.durable)
        self._max_ack_pending = max(1000, settings.batch_size * 4)
        self._blocked = BlockedEntities(
            spec.durable, settings, self._failures, apply=self._apply_alone, ack=self._ack,
            dead_letter=self._dead_letter_delivery, max_waiting=self._max_ack_pending,
        )

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
            max_ack_pending=self._max_ack_pending,
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
        fetch_started = 0.0
        unread: list[Msg] = []
        try:
            while not self._stopping.is_set():
                fetch_started = asyncio.get_running_loop().time()
                fetch = asyncio.ensure_future(
                    self._subscription.fetch(self._settings.batch_size, timeout=FETCH_TIMEOUT)
                )
                # Waiting on stop too lets shutdown skip the rest of an idle fetch.
                await asyncio.wait({fetch, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    unread = await self._end_fetch(fetch)
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
        finally:
            stop_requested.cancel()
            await self._hand_back_waiting(unread, fetch_started)
            # An open pull subscription would hold up the connection's drain.
            with contextlib.suppress(NatsError, JetStreamError):
                await self._subscription.unsubscribe()

    async def _end_fetch(self, fetch: asyncio.Future[list[Msg]]) -> list[Msg]:
        """End the fetch that stop() interrupted and return the messages it got.

        Without blocked entities it is cancelled. Messages on their way to it
        are redelivered after ack_wait, so none is lost. With blocked ones it
        runs to its end, because an open pull request would take the events
        handed back at stop (see _hand_back_waiting).
        """
        if not self._blocked:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return []
        try:
            return await fetch
        except (NatsError, JetStreamError, TimeoutError):
            return []

    async def _hand_back_waiting(self, unread: list[Msg], fetch_started: float) -> None:
        """Hand the events that wait behind failed ones back to JetStream, in order.

        JetStream redelivers returned messages in the order they came back,
        before new ones, but may first send one to a pull request that is
        still open and queue it again behind the others. So the retries stop,
        then the last pull request expires, then the events go back.
        """
        await self._blocked.stop()
        if not self._blocked and not unread:
            return
        await asyncio.sleep(max(0.0, fetch_started + FETCH_TIMEOUT - asyncio.get_running_loop().time()))
        await self._blocked.release(unread)

    async def _apply_batch(self, messages: list[Msg]) -> None:
        prepared = [item for message in messages if (item := await self._prepare(message)) is not None]
        work = []
        for item in prepared:
            if self._blocked.is_blocked(item.entity):
                self._blocked.wait_behind(item)
            else:
                work.append(item)
        if not work:
            return

        if self._database.is_sqlite:
            # SQLite runs one transaction at a time anyway, so one transaction
            # per batch (a savepoint per event) saves a commit per event.
            await self._apply_in_one_transaction(work)
            return

        by_aggregate: dict[str, list[Delivery]] = {}
        for item in work:
            by_aggregate.setdefault(item.entity, []).append(item)

        async def apply_in_order(group: list[Delivery]) -> None:
            for item in group:
                if self._blocked.is_blocked(item.entity):
                    self._blocked.wait_behind(item)
                    continue
                outcome = await self._apply_alone(item)
                if isinstance(outcome, Exception):
                    self._blocked.block(item, outcome)
                else:
                    await self._ack(item, outcome)

        async with asyncio.TaskGroup() as group_tasks:
            for group in by_aggregate.values():
                group_tasks.create_task(apply_in_order(group))

    async def _prepare(self, message: Msg) -> Delivery | None:
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
        return Delivery(message, event, payload, handler)

    async def _apply_alone(self, work: Delivery, failed_before: bool = False) -> bool | Exception:
        """Apply one event in its own transaction, and return whether it ran, or its error.

        failed_before is True when the event has a failure count to drop.
        """
        heartbeat = asyncio.create_task(keep_in_progress(lambda: [work.message], self._settings.ack_wait))
        try:
            with self._span(work) as span:
                try:
                    async with self._database.transaction() as tx:
                        applied = await self._record_and_handle(tx, work, failed_before)
                except Exception as exc:
                    mark_failed(span, exc)
                    return exc
                return applied
        finally:
            heartbeat.cancel()

    async def _apply_in_one_transaction(self, batch: list[Delivery]) -> None:
        messages = [work.message for work in batch]
        heartbeat = asyncio.create_task(keep_in_progress(lambda: messages, self._settings.ack_wait))
        outcomes: list[bool | Exception | str] = []
        try:
            async with self._database.transaction() as tx:
                failed: set[str] = set()
                for work in batch:
                    if work.entity in failed:
                        outcomes.append(_WAITING)
                        continue
                    with self._span(work) as span:
                        try:
                            async with tx.savepoint():
                                outcomes.append(await self._record_and_handle(tx, work))
                        except Exception as exc:
                            mark_failed(span, exc)
                            outcomes.append(exc)
                            failed.add(work.entity)
        except Exception as exc:
            # The commit failed, so nothing of the batch was applied.
            logger.error("batch commit failed; the events are redelivered",
                         extra={"consumer": self.spec.durable, "events": len(batch)}, exc_info=exc)
            outcomes = [exc] * len(batch)
        finally:
            heartbeat.cancel()

        # Blocks first and without an await, so that a retry that starts
        # meanwhile finds every event of its entity in its queue.
        for work, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._blocked.block(work, outcome)
            elif outcome == _WAITING:
                self._blocked.wait_behind(work)
        for work, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, bool):
                await self._ack(work, outcome)

    async def _record_and_handle(self, tx: Transaction, work: Delivery, failed_before: bool = False) -> bool:
        """Run the handler unless this consumer already applied the event; return whether it ran."""
        if failed_before or work.message.metadata.num_delivered > 1:
            # A redelivered event may have failed in an earlier process.
            await self._failures.forget(tx, work.event.id)
        inserted = await tx.execute(
            self._insert_processed,
            {"consumer": self.spec.durable, "event_id": work.event.id, "processed_at": datetime.now(UTC)},
        )
        if inserted.rowcount == 0:
            return False
        async with asyncio.timeout(self._settings.handler_timeout):
            await work.handler(tx, work.event, work.payload)
        return True

    async def _ack(self, work: Delivery, applied: bool) -> None:
        """Ack an applied (applied=True) or duplicate event."""
        with contextlib.suppress(NatsError):
            # A lost ack only means a redelivery, which processed_events drops.
            await work.message.ack()
        if applied:
            self.applied += 1
            return
        self.duplicates += 1
        logger.info(
            "duplicate event dropped", extra={"consumer": self.spec.durable, "event_id": work.event.id}
        )

    def _span(self, work: Delivery) -> Any:
        return consumer_span(
            subject=work.message.subject,
            headers=work.message.headers,
            consumer=self.spec.durable,
            event_id=work.event.id,
            event_type=work.event.type,
            aggregate_id=work.event.subject,
            delivery_count=work.message.metadata.num_delivered,
        )

    async def _dead_letter_delivery(
        self, work: Delivery, reason: str, error: Exception, attempts: int
    ) -> bool:
        return await self._dead_letter(
            work.message, reason, error, attempts=attempts, settle_on_failure=False
        )

    async def _dead_letter(
        self,
        message: Msg,
        reason: str,
        error: BaseException | str,
        *,
        attempts: int | None = None,
        settle_on_failure: bool = True,
    ) -> bool:
        """Move a message to the dead letters and return True, or return False when that fails.

        When the publish fails and settle_on_failure is set, the message is
        handed back for redelivery after the longest backoff.
        """
        try:
            await self._dead_letters.publish(message, reason=reason, error=error, attempts=attempts)
        except (NatsError, JetStreamError, TimeoutError) as exc:
            logger.warning(
                "dead letter not stored; the event is tried again",
                extra={"consumer": self.spec.durable, "subject": message.subject, "error": repr(exc)},
            )
            if settle_on_failure:
                with contextlib.suppress(NatsError):
                    await message.nak(delay=self._settings.backoff[-1] if self._settings.backoff else None)
            return False
        with contextlib.suppress(NatsError):
            # A message whose term is lost comes again and is dead-lettered once more.
            # Within the duplicate window, the dead letter's Nats-Msg-Id makes JetStream drop it.
            await message.term()
        self.dead_lettered += 1
        return True
