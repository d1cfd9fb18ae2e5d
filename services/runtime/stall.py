"""A watch for durable consumers that the server stopped feeding.

On a JetStream cluster, a consumer can stop delivering after the stream or
consumer leader moves to another node. Its leader then reports nothing
pending while the stream stores newer messages on the consumer's subjects.
With nats-server 2.15.1, the chaos scenario that kills one node of three hit
this in 2 of 6 runs on a loaded machine; the nats-server GitHub issues
#5679, #6290 and #7664 report the same symptom. A new consumer leader
computes the pending messages afresh and delivers them, so the watch
requests one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError

logger = logging.getLogger(__name__)

# Seconds between checks while a consumer receives nothing.
CHECK_INTERVAL = 5.0


@dataclass(frozen=True)
class ConsumerPosition:
    """Consumer state from its leader, and the newest stream sequence on its subjects."""

    delivered: int
    pending: int
    ack_pending: int
    newest: int

    def looks_stalled(self) -> bool:
        """Return whether the stream contains a message the consumer neither delivered nor counts."""
        return self.pending == 0 and self.ack_pending == 0 and self.newest > self.delivered


def confirms_stall(first: ConsumerPosition | None, second: ConsumerPosition) -> bool:
    """Return whether two checks in a row show the same stall.

    One check can see a message that the consumer leader's replica has not
    stored yet, because replication takes milliseconds. A second check
    seconds later, with the delivered sequence unchanged, cannot.
    """
    return (
        first is not None
        and first.looks_stalled()
        and second.looks_stalled()
        and second.delivered == first.delivered
        and second.newest >= first.newest
    )


class StallWatch:
    """Checks one durable consumer while it is idle and requests a new leader when it is stuck."""

    def __init__(self, nats: NATS, stream: str, durable: str, subjects: Sequence[str]) -> None:
        self._nats = nats
        self._js = nats.jetstream()
        self._stream = stream
        self._durable = durable
        self._subjects = tuple(subjects)
        self._last_check = time.monotonic()
        self._suspect: ConsumerPosition | None = None
        self.stepdowns = 0

    async def on_idle(self) -> None:
        """Call after a fetch that returned nothing; checks at most every CHECK_INTERVAL seconds."""
        now = time.monotonic()
        if now - self._last_check < CHECK_INTERVAL:
            return
        self._last_check = now
        try:
            position = await self._position()
        except (NatsError, JetStreamError, TimeoutError) as exc:
            logger.debug("stall check failed", extra={"consumer": self._durable, "error": repr(exc)})
            return

        if not confirms_stall(self._suspect, position):
            self._suspect = position if position.looks_stalled() else None
            return
        self._suspect = None
        await self._step_down(position)

    async def _position(self) -> ConsumerPosition:
        # The newest sequence is read first: a message stored before the
        # consumer info was taken must show up in that info as pending.
        newest = 0
        for subject in self._subjects:
            try:
                message = await self._js.get_last_msg(self._stream, subject)
            except NotFoundError:
                continue
            newest = max(newest, message.seq or 0)
        info = await self._js.consumer_info(self._stream, self._durable)
        return ConsumerPosition(
            delivered=info.delivered.stream_seq if info.delivered and info.delivered.stream_seq else 0,
            pending=info.num_pending or 0,
            ack_pending=info.num_ack_pending or 0,
            newest=newest,
        )

    async def _step_down(self, position: ConsumerPosition) -> None:
        logger.warning(
            "consumer stalled: the stream contains events it does not deliver; "
            "requesting a new consumer leader",
            extra={"consumer": self._durable, "stream": self._stream,
                   "delivered_sequence": position.delivered, "newest_sequence": position.newest},
        )
        subject = f"$JS.API.CONSUMER.LEADER.STEPDOWN.{self._stream}.{self._durable}"
        try:
            reply = await self._nats.request(subject, b"", timeout=5.0)
        except (NatsError, TimeoutError) as exc:
            logger.warning("consumer leader stepdown failed", extra={"consumer": self._durable,
                                                                      "error": repr(exc)})
            return
        answer = json.loads(reply.data or b"{}")
        if "error" in answer:
            # A consumer with one replica has no other leader to elect.
            logger.warning("consumer leader stepdown refused", extra={"consumer": self._durable,
                                                                       "error": answer["error"]})
            return
        self.stepdowns += 1
