"""Durable pull consumers that apply each event once.

Each handler runs in a database transaction that also records the event id in
``processed_events``, so a redelivered event finds its id there and is acked
without running the handler again. On SQLite a fetched batch runs in order in
one transaction, with a savepoint per event. On PostgreSQL the events of one
aggregate (``ce-subject``) in a batch run one after another, each in its own
transaction, and different aggregates run concurrently.

A failed event is retried in this process, after the configured backoff,
while its message is kept in progress. Later events of the same aggregate
wait behind it, so that none overtakes it; those of other aggregates go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
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

# Seconds a fetch waits for messages before the loop looks at stop() again.
FETCH_TIMEOUT = 1.0

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

    @property
    def entity(self) -> str:
        """The aggregate the event belongs to (``ce-subject``), or the NATS subject without one."""
        return self.event.subject or self.message.subject


# The outcome of an event that was not applied because an earlier event of its
# entity failed in the same batch.
_WAITING = "waiting"


@dataclass
class _BlockedEntity:
    """The events of one entity waiting behind a failed one, the failed one first.

    Attributes:
        queue: The waiting events in stream order; the first is retried.
        failures: Failed attempts of the first event in this process.
        last_error: The error of the first event's last attempt.
    """

    queue: deque[_Work]
    failures: int = 0
    last_error: Exception | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


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
        # Entities with a failed event, by entity. Their later events wait in
        # the queue until the failed one is applied or dead-lettered.
        self._blocked: dict[str, _BlockedEntity] = {}

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
                self._subscription.fetch(self._settings.batch_size, timeout=FETCH_TIMEOUT)
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
        # Retries end at stop, and the events that wait go back to JetStream.
        await asyncio.gather(*(blocked.task for blocked in list(self._blocked.values()) if blocked.task))
        await self._release_blocked()
        # An open pull subscription would hold up the connection's drain.
        with contextlib.suppress(NatsError, JetStreamError):
            await self._subscription.unsubscribe()

    async def _apply_batch(self, messages: list[Msg]) -> None:
        prepared = [item for message in messages if (item := await self._prepare(message)) is not None]
        work = []
        for item in prepared:
            blocked = self._blocked.get(item.entity)
            if blocked is None:
                work.append(item)
            else:
                self._wait_behind(blocked, item)
        if not work:
            return

        if self._database.is_sqlite:
            # SQLite runs one transaction at a time anyway, so one transaction
            # per batch (a savepoint per event) saves a commit per event.
            await self._apply_in_one_transaction(work)
            return

        by_aggregate: dict[str, list[_Work]] = {}
        for item in work:
            by_aggregate.setdefault(item.entity, []).append(item)

        async def apply_in_order(group: list[_Work]) -> None:
            for item in group:
                blocked = self._blocked.get(item.entity)
                if blocked is not None:
                    self._wait_behind(blocked, item)
                    continue
                await self._settle(item, await self._apply_alone(item))

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

    async def _apply_alone(self, work: _Work) -> bool | Exception:
        """Apply one event in its own transaction; return whether it ran, or its error."""
        heartbeat = asyncio.create_task(self._keep_in_progress([work.message]))
        try:
            with self._span(work) as span:
                try:
                    async with self._database.transaction() as tx:
                        applied = await self._record_and_handle(tx, work)
                except Exception as exc:
                    mark_failed(span, exc)
                    return exc
                return applied
        finally:
            heartbeat.cancel()

    async def _apply_in_one_transaction(self, batch: list[_Work]) -> None:
        heartbeat = asyncio.create_task(self._keep_in_progress([w.message for w in batch]))
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

        # Holds first and without an await, so that a retry that starts
        # meanwhile finds every event of its entity in its queue.
        for work, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._block(work, outcome)
            elif outcome == _WAITING:
                self._wait_behind(self._blocked[work.entity], work)
        for work, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, bool):
                await self._ack(work, applied=outcome)

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
        """Ack an applied or duplicate event; hold a failed one and the later events of its entity."""
        if isinstance(outcome, Exception):
            self._block(work, outcome)
            return
        await self._ack(work, applied=outcome)

    async def _ack(self, work: _Work, *, applied: bool) -> None:
        await work.message.ack()
        if applied:
            self.applied += 1
            return
        self.duplicates += 1
        logger.info(
            "duplicate event dropped", extra={"consumer": self.spec.durable, "event_id": work.event.id}
        )

    def _block(self, work: _Work, error: Exception) -> None:
        """Start retrying a failed event; later events of its entity wait behind it until it is settled."""
        blocked = self._blocked.get(work.entity)
        if blocked is not None:
            # A failed commit fails every event of the batch, also the later
            # ones of an entity that is now blocked.
            self._wait_behind(blocked, work)
            return
        blocked = self._blocked[work.entity] = _BlockedEntity(deque([work]), failures=1, last_error=error)
        blocked.task = asyncio.create_task(self._retry(work.entity, blocked))

    def _wait_behind(self, blocked: _BlockedEntity, work: _Work) -> None:
        blocked.queue.append(work)
        logger.info(
            "event waits behind a failed event of its entity",
            extra={"consumer": self.spec.durable, "event_id": work.event.id, "entity": work.entity,
                   "failed_event_id": blocked.queue[0].event.id},
        )

    def _attempts(self, blocked: _BlockedEntity) -> int:
        """Attempts at the first waiting event so far: earlier deliveries plus failures here."""
        return blocked.queue[0].message.metadata.num_delivered - 1 + blocked.failures

    async def _give_up_if_done(self, blocked: _BlockedEntity) -> bool:
        """Dead-letter the first waiting event when it may not be tried again; return whether it was.

        Returns False as well when the dead-letter publish failed: the event
        is then tried again, and dead-lettered after that attempt.
        """
        work, error = blocked.queue[0], blocked.last_error
        assert error is not None
        attempts = self._attempts(blocked)
        if isinstance(error, PermanentEventError):
            reason = "permanent failure"
        elif attempts >= self._settings.max_deliver:
            reason = f"failed {attempts} attempts"
        else:
            return False
        stored = await self._dead_letter(
            work.message, reason, error, attempts=attempts, settle_on_failure=False
        )
        if stored:
            blocked.queue.popleft()
            blocked.failures, blocked.last_error = 0, None
        return stored

    async def _retry(self, entity: str, blocked: _BlockedEntity) -> None:
        """Retry the first waiting event after its backoff, then apply the rest in order, until none waits.

        At stop the entity stays blocked: run() hands the waiting events back to
        JetStream, the failed one first, so that a replica or the next start
        takes them over.
        """
        heartbeat = asyncio.create_task(self._keep_in_progress_queue(blocked.queue))
        try:
            while blocked.queue and not self._stopping.is_set():
                work = blocked.queue[0]
                if blocked.failures:
                    if await self._give_up_if_done(blocked):
                        continue
                    self._log_retry(blocked)
                    if await self._stop_within(self._backoff(self._attempts(blocked))):
                        break
                outcome = await self._apply_alone(work)
                if isinstance(outcome, Exception):
                    blocked.failures += 1
                    blocked.last_error = outcome
                    continue
                blocked.queue.popleft()
                blocked.failures, blocked.last_error = 0, None
                await self._ack(work, applied=outcome)
        finally:
            heartbeat.cancel()
            # No await between the last look at the queue and this: a batch
            # adds to the queue only while the entity is in _held.
            if not self._stopping.is_set():
                del self._blocked[entity]

    async def _release_blocked(self) -> None:
        """Hand every waiting event back to JetStream for redelivery, oldest of each entity first.

        The oldest goes back at once and each later one FETCH_TIMEOUT seconds
        after the one before. JetStream may hand a returned message to the
        pull request of the fetch that stop() abandoned, which it keeps for up
        to FETCH_TIMEOUT, and then queue it behind messages returned after it.
        """
        for blocked in self._blocked.values():
            for position, work in enumerate(blocked.queue):
                with contextlib.suppress(NatsError):
                    await work.message.nak(delay=position * FETCH_TIMEOUT or None)
        self._blocked.clear()

    def _backoff(self, attempts: int) -> float:
        backoff = self._settings.backoff
        return backoff[min(attempts, len(backoff)) - 1] if backoff else 0.0

    def _log_retry(self, blocked: _BlockedEntity) -> None:
        work, attempts = blocked.queue[0], self._attempts(blocked)
        logger.warning(
            "handler failed; retry scheduled",
            extra={"consumer": self.spec.durable, "event_id": work.event.id, "event_type": work.event.type,
                   "entity": work.entity, "attempt": attempts, "delay": self._backoff(attempts),
                   "waiting_events": len(blocked.queue) - 1},
            exc_info=blocked.last_error,
        )

    async def _stop_within(self, seconds: float) -> bool:
        """Wait seconds, or less when stop() is called; return whether it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

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
                await message.nak(delay=self._settings.backoff[-1] if self._settings.backoff else None)
            return False
        await message.term()
        self.dead_lettered += 1
        return True

    async def _keep_in_progress_queue(self, queue: deque[_Work]) -> None:
        """Extend the ack deadline of every waiting event, so that none is redelivered while it waits."""
        interval = self._settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for work in list(queue):
                with contextlib.suppress(NatsError):
                    await work.message.in_progress()

    async def _keep_in_progress(self, messages: list[Msg]) -> None:
        """Extend the ack deadline while slow handlers run, so nothing is redelivered meanwhile."""
        interval = self._settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for message in messages:
                with contextlib.suppress(NatsError):
                    await message.in_progress()
