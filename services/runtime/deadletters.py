"""Dead letters: events a consumer gave up on, kept with the reason in a stream of their own.

A dead letter is the original message (body and headers) published on
``tidings.deadletter.<consumer>`` in the DEADLETTERS stream, plus
``Tidings-Dlq-*`` headers naming the consumer that gave up, the delivery
count and the reason. `tidings dlq` lists, shows, replays and purges them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.runtime.errors import TidingsError
from services.runtime.streams import StreamSpec

logger = logging.getLogger(__name__)

DEADLETTERS = StreamSpec("DEADLETTERS", ("tidings.deadletter.>",))
SUBJECT_PREFIX = "tidings.deadletter."
HEADER_PREFIX = "Tidings-Dlq-"

# NATS header values are single lines; longer error texts are cut.
_MAX_ERROR_LENGTH = 500


class DeadLetterStreamMissing(TidingsError):
    """The server has no DEADLETTERS stream: no Tidings consumer ever ran against it."""


@dataclass(frozen=True)
class DeadLetter:
    """One message of the DEADLETTERS stream."""

    sequence: int
    data: bytes
    headers: Mapping[str, str]

    @property
    def consumer(self) -> str:
        """Durable consumer that gave up on the event."""
        return self.headers.get(f"{HEADER_PREFIX}Consumer", "")

    @property
    def subject(self) -> str:
        """Subject the event was originally published on."""
        return self.headers.get(f"{HEADER_PREFIX}Subject", "")

    @property
    def event_id(self) -> str:
        """CloudEvents id of the event, empty when the message had none."""
        return self.headers.get("ce-id", "")

    def original_headers(self) -> dict[str, str]:
        """Return the headers the event had before it was dead-lettered."""
        return {k: v for k, v in self.headers.items() if not k.startswith(HEADER_PREFIX)}


class DeadLetterPublisher:
    """Publishes a consumer's failed messages to the DEADLETTERS stream."""

    def __init__(self, js: JetStreamContext, consumer: str, stream: str) -> None:
        self._js = js
        self._consumer = consumer
        self._stream = stream

    async def publish(
        self, message: Msg, *, reason: str, error: BaseException | str, attempts: int | None = None
    ) -> None:
        """Store message as a dead letter and wait for JetStream's ack.

        attempts is how often the consumer's handler failed on it, for a
        message that reached the handler; it is written to the ``Attempts``
        header. ``Deliveries`` is JetStream's delivery count.

        Raises:
            nats.errors.Error: The publish failed; the caller must not settle
                the message, so that it is delivered again.
        """
        metadata = message.metadata
        stream_sequence = metadata.sequence.stream if metadata.sequence else 0
        headers = dict(message.headers or {})
        headers.update({
            f"{HEADER_PREFIX}Consumer": self._consumer,
            f"{HEADER_PREFIX}Stream": self._stream,
            f"{HEADER_PREFIX}Subject": message.subject,
            f"{HEADER_PREFIX}Stream-Sequence": str(stream_sequence),
            f"{HEADER_PREFIX}Deliveries": str(metadata.num_delivered),
            f"{HEADER_PREFIX}Reason": reason,
            f"{HEADER_PREFIX}Error": _one_line(error),
            f"{HEADER_PREFIX}Time": datetime.now(UTC).isoformat(),
            # One dead letter per consumer and original message, however often
            # the consumer tries to store it.
            "Nats-Msg-Id": f"dlq:{self._consumer}:{self._stream}:{stream_sequence}",
        })
        if attempts is not None:
            headers[f"{HEADER_PREFIX}Attempts"] = str(attempts)
        await self._js.publish(SUBJECT_PREFIX + self._consumer, message.data, headers=headers)
        logger.error(
            "event moved to the dead letters",
            extra={
                "consumer": self._consumer,
                "event_id": headers.get("ce-id", ""),
                "subject": message.subject,
                "deliveries": metadata.num_delivered,
                "attempts": attempts,
                "reason": reason,
                "error": headers[f"{HEADER_PREFIX}Error"],
            },
        )


def _one_line(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:_MAX_ERROR_LENGTH]


async def read_dead_letters(js: JetStreamContext) -> list[DeadLetter]:
    """Return every dead letter, oldest first."""
    try:
        await js.stream_info(DEADLETTERS.name)
    except NotFoundError as exc:
        raise DeadLetterStreamMissing(
            f"no {DEADLETTERS.name} stream on this server; is this the server `tidings up` runs? "
            "Set NATS_URL to it"
        ) from exc
    letters: list[DeadLetter] = []
    sequence = 1
    while True:
        try:
            raw = await js.get_msg(DEADLETTERS.name, seq=sequence, subject=SUBJECT_PREFIX + ">", next=True)
        except NotFoundError:
            return letters
        assert raw.seq is not None
        letters.append(DeadLetter(raw.seq, raw.data or b"", dict(raw.headers or {})))
        sequence = raw.seq + 1


def select_dead_letters(
    letters: Iterable[DeadLetter],
    *,
    sequences: Iterable[int] = (),
    event_ids: Iterable[str] = (),
    consumer: str | None = None,
    subject: str | None = None,
) -> list[DeadLetter]:
    """Return the letters that match every given filter; no filter matches all."""
    chosen_sequences = set(sequences)
    chosen_ids = set(event_ids)
    return [
        letter for letter in letters
        if (not chosen_sequences or letter.sequence in chosen_sequences)
        and (not chosen_ids or letter.event_id in chosen_ids)
        and (consumer is None or letter.consumer == consumer)
        and (subject is None or letter.subject == subject)
    ]


async def replay(js: JetStreamContext, letter: DeadLetter) -> None:
    """Publish a dead letter again on its original subject, then delete it.

    The republished message keeps the event id in ``ce-id`` but gets a new
    ``Nats-Msg-Id``, so JetStream's duplicate window does not drop it. Each
    consumer's processed-events table still applies it only where it was
    never applied.
    """
    headers = letter.original_headers()
    headers["Nats-Msg-Id"] = f"replay:{letter.event_id or letter.sequence}:{datetime.now(UTC).isoformat()}"
    await js.publish(letter.subject, letter.data, headers=headers)
    await js.delete_msg(DEADLETTERS.name, letter.sequence)
    logger.info(
        "dead letter replayed",
        extra={"event_id": letter.event_id, "subject": letter.subject, "consumer": letter.consumer},
    )


async def purge(js: JetStreamContext, letter: DeadLetter) -> None:
    """Delete a dead letter for good."""
    await js.delete_msg(DEADLETTERS.name, letter.sequence)
