"""Order of one entity's events when a handler fails, against a real nats-server.

A failed event is retried while the later events of its entity wait behind
it; the events of other entities go on. The first two tests run on SQLite
(one transaction per batch) and on PostgreSQL (a transaction per event, the
entities of a batch concurrently).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import MetaData

from services.runtime.config import Settings
from services.runtime.consumer import ConsumerSpec
from services.runtime.database import Transaction
from services.runtime.deadletters import HEADER_PREFIX, DeadLetter, read_dead_letters
from services.runtime.events import ReceivedEvent, cloudevent_headers
from services.runtime.service import Runtime, ServiceSpec
from services.runtime.streams import USERS
from tests.helpers import running_service, wait_for
from tidings.users.v1 import user_events_pb2, user_pb2

SUBJECT = "tidings.users.user.created"
DURABLE = "probe"


class _Handler:
    """Records the events it applies, in order, and fails the ones in `failing`."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.attempts: list[str] = []
        self.applied: list[str] = []
        self.applied_event = asyncio.Event()

    async def __call__(self, tx: Transaction, event: ReceivedEvent, message: object) -> None:
        self.attempts.append(event.id)
        if event.id in self.failing:
            raise RuntimeError(f"handler failure for {event.id}")
        self.applied.append(event.id)
        self.applied_event.set()


def _spec(handler: _Handler, *, max_deliver: int = 5, backoff: tuple[float, ...] = (0.05,)) -> ServiceSpec:
    def consumers(runtime: Runtime) -> list[ConsumerSpec]:
        return [ConsumerSpec(DURABLE, USERS.name, (SUBJECT,), {"tidings.users.v1.UserCreated": handler},
                             max_deliver=max_deliver, backoff=backoff)]

    return ServiceSpec(name="users", metadata=MetaData(), servicers=lambda runtime: [],
                       streams=(USERS,), consumers=consumers)


async def _publish(nats_client: NATS, event_id: str, entity: str) -> None:
    headers = cloudevent_headers(
        event_id=event_id, source="/tests", event_type="tidings.users.v1.UserCreated",
        time=datetime.now(UTC), subject=entity,
    )
    body = user_events_pb2.UserCreated(user=user_pb2.User(id=entity)).SerializeToString()
    await nats_client.jetstream().publish(SUBJECT, body, headers=headers)


def _applied(handler: _Handler, count: int):  # type: ignore[no-untyped-def]
    async def probe() -> list[str] | None:
        return list(handler.applied) if len(handler.applied) >= count else None

    return probe


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Settings for SQLite, or for PostgreSQL (skipped, saying why, when no server accepts a connection)."""
    if request.param == "sqlite":
        return settings
    return settings.model_copy(update={"database_url": request.getfixturevalue("postgres_url")})


async def test_failed_event_is_not_overtaken(
    store_settings: Settings, nats_client: NATS
) -> None:
    handler = _Handler()
    handler.failing.add("first")
    async with running_service(_spec(handler), store_settings):
        await _publish(nats_client, "first", "user-1")
        await _publish(nats_client, "second", "user-1")
        await wait_for(lambda: _attempted(handler, "first", times=1))
        handler.failing.clear()

        applied = await wait_for(_applied(handler, 2))

    assert applied == ["first", "second"]


async def _attempted(handler: _Handler, event_id: str, *, times: int) -> bool:
    return handler.attempts.count(event_id) >= times


async def test_failed_event_spares_other_entities(
    store_settings: Settings, nats_client: NATS
) -> None:
    handler = _Handler()
    handler.failing.add("first")
    async with running_service(_spec(handler, backoff=(0.05,)), store_settings):
        await _publish(nats_client, "first", "user-1")
        await _publish(nats_client, "other", "user-2")
        # "first" keeps failing until "other" is applied, so this only ends
        # when the failure of user-1 does not hold user-2 back.
        await wait_for(_applied(handler, 1))
        handler.failing.clear()

        applied = await wait_for(_applied(handler, 2))

    assert applied == ["other", "first"]


async def test_dead_lettered_event_releases_its_entity(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    handler.failing.add("poison")
    async with running_service(_spec(handler, max_deliver=2), settings):
        await _publish(nats_client, "poison", "user-1")
        await _publish(nats_client, "next", "user-1")

        await wait_for(_applied(handler, 1))

    assert handler.attempts == ["poison", "poison", "next"]


async def test_waiting_events_are_handed_back_at_stop(settings: Settings, nats_client: NATS) -> None:
    failing = _Handler()
    failing.failing.add("first")
    # A long backoff: the first service stops while "first" waits for its retry.
    async with running_service(_spec(failing, backoff=(30.0,)), settings):
        await _publish(nats_client, "first", "user-1")
        await _publish(nats_client, "second", "user-1")
        await wait_for(lambda: _ack_pending(nats_client, 2))
    # Published while no consumer runs: it must not overtake the two handed back.
    await _publish(nats_client, "third", "user-1")

    fixed = _Handler()
    async with running_service(_spec(fixed), settings):
        applied = await wait_for(_applied(fixed, 3))

    assert failing.attempts == ["first"]
    assert applied == ["first", "second", "third"]


async def test_failed_attempts_count_across_restarts(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    handler.failing.add("poison")
    async with running_service(_spec(handler, max_deliver=3, backoff=(0.05, 30.0)), settings):
        await _publish(nats_client, "poison", "user-1")
        await wait_for(lambda: _attempted(handler, "poison", times=2))
    async with running_service(_spec(handler, max_deliver=3, backoff=(0.05, 30.0)), settings):
        [letter] = await wait_for(lambda: _dead_letters(nats_client))

    assert handler.attempts.count("poison") == 3
    assert letter.headers[f"{HEADER_PREFIX}Attempts"] == "3"


async def _dead_letters(nats_client: NATS) -> list[DeadLetter] | None:
    letters = await read_dead_letters(nats_client.jetstream())
    return letters or None


async def _ack_pending(nats_client: NATS, count: int) -> bool:
    info = await nats_client.jetstream().consumer_info(USERS.name, DURABLE)
    return info.num_ack_pending >= count
