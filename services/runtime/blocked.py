"""Events that wait behind a failed event of the same entity, so that none overtakes it.

When a handler fails, the consumer retries the event in its own process,
after the configured backoff, and keeps its message in progress so that
JetStream does not hand it to another consumer. Until that event is applied or
dead-lettered, the later events of its entity (its ``ce-subject``) wait
behind it, also those of later batches. Events of other entities go on.

Failed attempts are counted per event in the service's database
(``event_failures``), so a restart neither resets nor inflates the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.message import Message
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, delete, select, update

from services.runtime.consumer_spec import ConsumerSettings, Handler
from services.runtime.database import Database, Transaction
from services.runtime.errors import PermanentEventError
from services.runtime.events import ReceivedEvent

logger = logging.getLogger(__name__)

# Maximum length, in characters, of the error text kept with a failure count.
_MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class Delivery:
    """A decoded message and the handler that applies it."""

    message: Msg
    event: ReceivedEvent
    payload: Message
    handler: Handler

    @property
    def entity(self) -> str:
        """The aggregate the event belongs to (``ce-subject``), or the NATS subject without one."""
        return self.event.subject or self.message.subject


def event_failures_table(metadata: MetaData) -> Table:
    """Define the ``event_failures`` table (failed attempts per consumer and event) on metadata."""
    return Table(
        "event_failures",
        metadata,
        Column("consumer", String(128), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("attempts", Integer, nullable=False),
        Column("last_error", String(_MAX_ERROR_LENGTH), nullable=False),
        Column("failed_at", DateTime(timezone=True), nullable=False),
    )


class FailureCounts:
    """Failed attempts per event of one consumer, kept in the service's database."""

    def __init__(self, database: Database, table: Table, consumer: str) -> None:
        self._database = database
        self._table = table
        self._consumer = consumer

    async def record(self, event_id: str, error: BaseException) -> int:
        """Count one more failed attempt at event_id and return the attempts failed so far."""
        row = (self._table.c.consumer == self._consumer) & (self._table.c.event_id == event_id)
        text = f"{type(error).__name__}: {error}"[:_MAX_ERROR_LENGTH]
        now = datetime.now(UTC)
        async with self._database.transaction() as tx:
            changed = await tx.execute(
                update(self._table).where(row).values(
                    attempts=self._table.c.attempts + 1, last_error=text, failed_at=now
                )
            )
            if changed.rowcount == 0:
                await tx.execute(self._table.insert().values(
                    consumer=self._consumer, event_id=event_id, attempts=1, last_error=text, failed_at=now
                ))
                return 1
            result = await tx.execute(select(self._table.c.attempts).where(row))
            return int(result.scalar_one())

    async def forget(self, tx: Transaction, event_id: str) -> None:
        """Drop the count of event_id as part of tx, the transaction that applies it."""
        await tx.execute(delete(self._table).where(
            (self._table.c.consumer == self._consumer) & (self._table.c.event_id == event_id)
        ))

    async def forget_now(self, event_id: str) -> None:
        """Drop the count of event_id in a transaction of its own (after a dead letter)."""
        async with self._database.transaction() as tx:
            await self.forget(tx, event_id)


# Applies one delivery in its own transaction. The flag is True when the delivery
# failed before. The result is whether the handler ran (False for a duplicate), or the error.
Apply = Callable[[Delivery, bool], Awaitable[bool | Exception]]
# Acks an applied (True) or duplicate (False) delivery.
Ack = Callable[[Delivery, bool], Awaitable[None]]
# Moves a delivery to the dead letters with a reason and the attempts made. The
# result is whether the dead letter was stored.
DeadLetter = Callable[[Delivery, str, Exception, int], Awaitable[bool]]


@dataclass
class _Line:
    """Events of one entity that wait, oldest first. The first one failed."""

    queue: deque[Delivery]
    last_error: Exception | None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class BlockedEntities:
    """Entities of one consumer that have a failed event, each with the events waiting behind it.

    NOTE: the order holds within one process. Replicas that share the durable
    consumer can still apply two events of one entity at the same time.
    """

    def __init__(
        self,
        consumer: str,
        settings: ConsumerSettings,
        failures: FailureCounts,
        *,
        apply: Apply,
        ack: Ack,
        dead_letter: DeadLetter,
        max_waiting: int,
    ) -> None:
        """Prepare an empty set of blocked entities for consumer.

        Args:
            max_waiting: The consumer's max_ack_pending. When this many events
                wait, JetStream sends the consumer nothing more, which is
                logged once.
        """
        self._consumer = consumer
        self._settings = settings
        self._failures = failures
        self._apply = apply
        self._ack = ack
        self._dead_letter = dead_letter
        self._max_waiting = max_waiting
        self._lines: dict[str, _Line] = {}
        self._full = False

    def __bool__(self) -> bool:
        return bool(self._lines)

    def is_blocked(self, entity: str) -> bool:
        """Return whether events of entity wait behind a failed one."""
        return entity in self._lines

    def block(self, delivery: Delivery, error: Exception) -> None:
        """Start retrying a failed delivery. Later events of its entity wait behind it.

        Runs without an await, so that a caller can queue the rest of a batch
        before the retry starts.
        """
        line = self._lines.get(delivery.entity)
        if line is not None:
            # A failed commit fails every event of a batch, also the later
            # ones of an entity that is blocked by then.
            self.wait_behind(delivery)
            return
        line = self._lines[delivery.entity] = _Line(deque([delivery]), error)
        line.task = asyncio.create_task(self._retry(delivery.entity, line), name=f"retry {delivery.entity}")

    def wait_behind(self, delivery: Delivery) -> None:
        """Queue delivery behind the failed event of its entity, which must be blocked."""
        line = self._lines[delivery.entity]
        line.queue.append(delivery)
        logger.info(
            "event waits behind a failed event of its entity",
            extra={"consumer": self._consumer, "event_id": delivery.event.id, "entity": delivery.entity,
                   "failed_event_id": line.queue[0].event.id},
        )
        # NOTE: no entity has a cap of its own, so one entity with a long backlog can
        # fill max_ack_pending and stall every entity until its retries end.
        waiting = sum(len(other.queue) for other in self._lines.values())
        if waiting >= self._max_waiting and not self._full:
            self._full = True
            logger.warning(
                "events waiting behind failed ones fill the consumer's max_ack_pending; it receives "
                "nothing more until they are applied or dead-lettered",
                extra={"consumer": self._consumer, "waiting_events": waiting,
                       "blocked_entities": len(self._lines)},
            )

    async def stop(self) -> None:
        """Cancel every retry, which rolls back an apply in progress. The waiting events stay queued."""
        tasks = [line.task for line in self._lines.values() if line.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def release(self, also: Iterable[Msg] = ()) -> None:
        """Hand every waiting event back to JetStream (nak), then the messages in also.

        Each entity's oldest event goes back first. nats-server 2.15.1 redelivers
        returned messages in the order they came back, ahead of new ones (seen in
        tests/integration/test_consumer_order.py). The caller must make sure that
        no pull request of this consumer is still open. Otherwise JetStream may
        send a returned message there and queue it again behind later ones.
        """
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await _nak_all(line.queue)
        await _nak_all(also)

    async def _retry(self, entity: str, line: _Line) -> None:
        """Retry the first event after its backoff, then apply the rest in order, until none waits."""
        heartbeat = asyncio.create_task(keep_in_progress(
            lambda: [delivery.message for delivery in line.queue], self._settings.ack_wait
        ))
        try:
            await self._work_through(line)
            # No await may come between the last look at the queue and this line,
            # because a batch adds to the queue only while the entity is in _lines.
            del self._lines[entity]
        except asyncio.CancelledError:
            # Cancelled by stop(), so the events stay queued for release().
            raise
        except Exception:
            logger.exception(
                "retrying the events of an entity failed; they go back to JetStream",
                extra={"consumer": self._consumer, "entity": entity, "waiting_events": len(line.queue)},
            )
            while line.queue:
                await _nak_all([line.queue.popleft()])
            del self._lines[entity]
        finally:
            heartbeat.cancel()
            self._full = self._full and bool(self._lines)

    async def _work_through(self, line: _Line) -> None:
        """Apply the queued events in order, retrying or dead-lettering the failed first one."""
        while line.queue:
            delivery = line.queue[0]
            error = line.last_error
            failed_before = error is not None
            if error is not None:
                attempts = await self._failures.record(delivery.event.id, error)
                if await self._give_up(line, attempts):
                    continue
                delay = self._backoff(attempts)
                self._log_retry(line, attempts, delay)
                await asyncio.sleep(delay)
            outcome = await self._apply(delivery, failed_before)
            if isinstance(outcome, Exception):
                line.last_error = outcome
                continue
            line.queue.popleft()
            line.last_error = None
            await self._ack(delivery, outcome)

    async def _give_up(self, line: _Line, attempts: int) -> bool:
        """Dead-letter the first event when it may not be tried again, and return whether it was.

        Returns False as well when the dead-letter publish failed. The event is
        then tried again, and dead-lettered after that attempt.
        """
        delivery, error = line.queue[0], line.last_error
        assert error is not None
        if isinstance(error, PermanentEventError):
            reason = "permanent failure"
        elif attempts >= self._settings.max_deliver:
            reason = f"failed {attempts} attempts"
        else:
            return False
        if not await self._dead_letter(delivery, reason, error, attempts):
            return False
        line.queue.popleft()
        line.last_error = None
        await self._failures.forget_now(delivery.event.id)
        return True

    def _backoff(self, attempts: int) -> float:
        backoff = self._settings.backoff
        return backoff[min(attempts, len(backoff)) - 1] if backoff else 0.0

    def _log_retry(self, line: _Line, attempts: int, delay: float) -> None:
        delivery = line.queue[0]
        logger.warning(
            "handler failed; retry scheduled",
            extra={"consumer": self._consumer, "event_id": delivery.event.id,
                   "event_type": delivery.event.type, "entity": delivery.entity, "attempts": attempts,
                   "delay": delay, "waiting_events": len(line.queue) - 1},
            exc_info=line.last_error,
        )



async def keep_in_progress(messages: Callable[[], Iterable[Msg]], ack_wait: float) -> None:
    """Send an in-progress ack for each message every third of ack_wait, until cancelled.

    messages is called before each round, so that a queue that changes is
    followed. JetStream then redelivers none of them while they are worked on.
    """
    while True:
        await asyncio.sleep(ack_wait / 3)
        for message in list(messages()):
            with contextlib.suppress(NatsError):
                await message.in_progress()


async def _nak_all(deliveries: Iterable[Delivery | Msg]) -> None:
    for item in deliveries:
        message = item.message if isinstance(item, Delivery) else item
        with contextlib.suppress(NatsError):
            await message.nak()
