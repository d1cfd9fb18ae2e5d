"""Dead letters against a real nats-server: poison events, replay, and the inbox on replay."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import Column, MetaData, String, Table, func, select

from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from services.runtime.consumer import ConsumerSpec
from services.runtime.database import Transaction
from services.runtime.deadletters import HEADER_PREFIX, read_dead_letters, replay
from services.runtime.errors import PermanentEventError
from services.runtime.events import ReceivedEvent, cloudevent_headers
from services.runtime.service import Runtime, Service, ServiceSpec
from services.runtime.streams import USERS
from tests.helpers import running_service, wait_for
from tidings.users.v1 import user_events_pb2, user_pb2

SUBJECT = "tidings.users.user.created"

_metadata = MetaData()
_applied = Table("applied", _metadata, Column("event_id", String(64), primary_key=True))


class _Handler:
    """Fails for the event ids in `failing`, permanently for those in `permanent`."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.permanent: set[str] = set()
        self.attempts: list[str] = []

    async def __call__(self, tx: Transaction, event: ReceivedEvent, message: object) -> None:
        self.attempts.append(event.id)
        if event.id in self.permanent:
            raise PermanentEventError(f"event {event.id} can never be applied")
        if event.id in self.failing:
            raise RuntimeError(f"handler bug for {event.id}")
        await tx.execute(_applied.insert().values(event_id=event.id))


def _spec(handler: _Handler, max_deliver: int | None = None) -> ServiceSpec:
    def consumers(runtime: Runtime) -> list[ConsumerSpec]:
        return [ConsumerSpec("probe", USERS.name, (SUBJECT,), {"tidings.users.v1.UserCreated": handler},
                             max_deliver=max_deliver, backoff=(0.05,))]

    return ServiceSpec(name="users", metadata=_metadata, servicers=lambda runtime: [],
                       streams=(USERS,), consumers=consumers)


async def _publish(nats_client: NATS, event_id: str, *, body: bytes | None = None) -> None:
    headers = cloudevent_headers(
        event_id=event_id, source="/tests", event_type="tidings.users.v1.UserCreated",
        time=datetime.now(UTC), subject="user-1",
    )
    if body is None:
        body = user_events_pb2.UserCreated(user=user_pb2.User(id="user-1")).SerializeToString()
    await nats_client.jetstream().publish(SUBJECT, body, headers=headers)


async def _applied_ids(service: Service) -> list[str]:
    async with service.runtime.database.transaction() as tx:
        return list((await tx.execute(select(_applied.c.event_id))).scalars())


async def _at_least_applied(service: Service, count: int) -> list[str] | None:
    applied = await _applied_ids(service)
    return applied if len(applied) >= count else None


async def _dead_letter_count(nats_client: NATS, expected: int) -> bool:
    return len(await read_dead_letters(nats_client.jetstream())) >= expected


async def test_poison_event_dead_lettered_after_retries(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    handler.failing.add("poison")
    async with running_service(_spec(handler, max_deliver=3), settings) as service:
        await _publish(nats_client, "poison")
        await _publish(nats_client, "good-1")
        await _publish(nats_client, "good-2")

        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=15)
        applied = await wait_for(lambda: _at_least_applied(service, 2), timeout=10)
        letter = (await read_dead_letters(nats_client.jetstream()))[0]

    assert handler.attempts.count("poison") == 3
    assert sorted(applied) == ["good-1", "good-2"]
    assert [event for event in handler.attempts if event != "poison"] == ["good-1", "good-2"]
    assert letter.event_id == "poison"
    assert letter.consumer == "probe"
    assert letter.subject == SUBJECT
    assert letter.headers[f"{HEADER_PREFIX}Attempts"] == "3"
    assert "handler bug for poison" in letter.headers[f"{HEADER_PREFIX}Error"]


async def test_permanent_error_dead_lettered_at_once(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    handler.permanent.add("hopeless")
    async with running_service(_spec(handler), settings):
        await _publish(nats_client, "hopeless")

        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=10)

    assert handler.attempts == ["hopeless"]


async def test_undecodable_event_dead_lettered(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    async with running_service(_spec(handler), settings):
        await _publish(nats_client, "garbled", body=b"\xff\xff not protobuf")

        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=10)
        letter = (await read_dead_letters(nats_client.jetstream()))[0]

    assert handler.attempts == []
    assert letter.headers[f"{HEADER_PREFIX}Reason"] == "undecodable"


async def test_replay_applies_fixed_event_once(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    handler.permanent.add("fixable")
    async with running_service(_spec(handler), settings) as service:
        await _publish(nats_client, "fixable")
        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=10)
        handler.permanent.clear()
        letter = (await read_dead_letters(nats_client.jetstream()))[0]

        await replay(nats_client.jetstream(), letter)
        applied = await wait_for(lambda: _applied_ids(service), timeout=10)
        remaining = await read_dead_letters(nats_client.jetstream())

    assert applied == ["fixable"]
    assert remaining == []


async def test_replay_of_applied_event_changes_nothing(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    async with running_service(_spec(handler), settings) as service:
        event_id = str(uuid.uuid4())
        await _publish(nats_client, event_id)
        await wait_for(lambda: _applied_ids(service), timeout=10)
        # A dead letter of an event this consumer already applied, as an
        # operator might replay by mistake.
        handler.permanent.add("other")
        await _publish(nats_client, "other")
        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=10)
        letter = (await read_dead_letters(nats_client.jetstream()))[0]
        duplicate = type(letter)(letter.sequence, letter.data, {**letter.headers, "ce-id": event_id})

        await replay(nats_client.jetstream(), duplicate)
        await wait_for(lambda: _duplicates(service, 1), timeout=10)
        count = await _count_applied(service)

    assert count == 1


async def _duplicates(service: Service, expected: int) -> bool:
    return service.consumers[0].duplicates >= expected


async def _count_applied(service: Service) -> int:
    async with service.runtime.database.transaction() as tx:
        return int((await tx.execute(select(func.count()).select_from(_applied))).scalar_one())


async def test_dlq_command_lists_and_purges(
    settings: Settings, nats_client: NATS, capsys, monkeypatch
) -> None:
    from services.runtime.cli import _parser
    from services.runtime.cli.dlq import run_dlq

    monkeypatch.setenv("NATS_URL", settings.nats_url)
    handler = _Handler()
    handler.permanent.update({"first", "second"})
    async with running_service(_spec(handler), settings):
        await _publish(nats_client, "first")
        await _publish(nats_client, "second")
        await wait_for(lambda: _dead_letter_count(nats_client, 2), timeout=10)

    listed = await run_dlq(settings, _parser().parse_args(["dlq", "list", "--consumer", "probe"]))
    listing = capsys.readouterr().out
    rejected = await run_dlq(settings, _parser().parse_args(["dlq", "purge"]))
    purged = await run_dlq(settings, _parser().parse_args(["dlq", "purge", "--id", "first"]))
    remaining = await read_dead_letters(nats_client.jetstream())

    assert listed == 0
    assert "2 dead letter(s)" in listing
    assert rejected == 2
    assert purged == 0
    assert [letter.event_id for letter in remaining] == ["second"]


async def test_slow_handlers_outlive_ack_wait_once(
    settings: Settings, nats_client: NATS, tmp_path
) -> None:
    deliveries: list[tuple[str, int]] = []

    async def slow(tx: Transaction, event: ReceivedEvent, message: object) -> None:
        await asyncio.sleep(1.5)
        await tx.execute(_applied.insert().values(event_id=event.id))

    def consumers(runtime: Runtime) -> list[ConsumerSpec]:
        return [ConsumerSpec("slow", USERS.name, (SUBJECT,), {"tidings.users.v1.UserCreated": slow})]

    spec = ServiceSpec(name="users", metadata=_metadata, servicers=lambda runtime: [],
                       streams=(USERS,), consumers=consumers)
    short_ack = settings.model_copy(update={"consumer_ack_wait": 1.0})
    # A second replica on the same durable would receive any redelivery that
    # an expired ack_wait causes while the first one still works.
    replica = short_ack.model_copy(update={"data_dir": tmp_path / "replica", "users_port": free_port()})
    async with (
        running_service(spec, short_ack) as first,
        running_service(spec, replica) as second,
    ):
        for service in (first, second):
            _record_deliveries(service, deliveries)
        await _publish(nats_client, "slow-1")
        await _publish(nats_client, "slow-2")
        await wait_for(lambda: _applied_in_either(first, second, 2), timeout=20)
        info = await nats_client.jetstream().consumer_info("USERS", "slow")

    assert sorted(event_id for event_id, _ in deliveries) == ["slow-1", "slow-2"]
    assert info.num_redelivered == 0


def _record_deliveries(service: Service, deliveries: list[tuple[str, int]]) -> None:
    original = service.consumers[0]._record_and_handle

    async def recording(tx: Transaction, work) -> bool:  # type: ignore[no-untyped-def]
        deliveries.append((work.event.id, work.message.metadata.num_delivered))
        return await original(tx, work)

    service.consumers[0]._record_and_handle = recording  # type: ignore[method-assign]


async def _applied_in_either(first: Service, second: Service, count: int) -> bool:
    return len(await _applied_ids(first)) + len(await _applied_ids(second)) >= count


async def test_unknown_event_type_dead_lettered(settings: Settings, nats_client: NATS) -> None:
    handler = _Handler()
    async with running_service(_spec(handler), settings):
        headers = cloudevent_headers(
            event_id="unknown-type", source="/tests", event_type="tidings.users.v1.UserDeleted",
            time=datetime.now(UTC), subject="user-1",
        )
        body = user_events_pb2.UserDeleted(user_id="user-1").SerializeToString()
        await nats_client.jetstream().publish(SUBJECT, body, headers=headers)

        await wait_for(lambda: _dead_letter_count(nats_client, 1), timeout=10)
        letter = (await read_dead_letters(nats_client.jetstream()))[0]

    assert handler.attempts == []
    assert letter.headers[f"{HEADER_PREFIX}Reason"] == "unknown event type"


async def test_missing_dead_letter_stream_reported(nats_client: NATS) -> None:
    from services.runtime.deadletters import DeadLetterStreamMissing

    with pytest.raises(DeadLetterStreamMissing):
        await read_dead_letters(nats_client.jetstream())
