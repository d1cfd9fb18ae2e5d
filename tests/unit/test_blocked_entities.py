"""Unit tests of services/runtime/blocked.py with stand-ins for the consumer's callbacks.

The integration tests in tests/integration/test_consumer_order.py cover the
same class against a real nats-server; these cover what needs many events.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from services.runtime.blocked import BlockedEntities
from services.runtime.consumer_spec import ConsumerSettings

SETTINGS = ConsumerSettings(batch_size=1, ack_wait=60.0, max_deliver=5, backoff=(30.0,))


class _Failures:
    async def record(self, event_id: str, error: BaseException) -> int:
        return 1

    async def forget_now(self, event_id: str) -> None:
        return None


def _delivery(event_id: str, entity: str) -> Any:
    return SimpleNamespace(
        event=SimpleNamespace(id=event_id, type="tidings.test.v1.Probe", subject=entity),
        message=SimpleNamespace(subject="tidings.test.probe"),
        entity=entity,
    )


async def _never_called(*arguments: Any) -> Any:
    raise AssertionError(f"unexpected call with {arguments}")


def _blocked(max_waiting: int) -> BlockedEntities:
    return BlockedEntities(
        "probe", SETTINGS, _Failures(),  # type: ignore[arg-type]
        apply=_never_called, ack=_never_called, dead_letter=_never_called, max_waiting=max_waiting,
    )


async def test_blocked_entities_warn_once_when_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = _blocked(max_waiting=3)
    blocked.block(_delivery("first", "user-1"), RuntimeError("handler failure"))

    with caplog.at_level(logging.WARNING, logger="services.runtime.blocked"):
        for index in range(4):
            blocked.wait_behind(_delivery(f"later-{index}", "user-1"))
        await asyncio.sleep(0)
    await blocked.stop()

    filled = [record for record in caplog.records if "max_ack_pending" in record.getMessage()]
    assert len(filled) == 1


async def test_blocked_entities_block_failed_entity() -> None:
    blocked = _blocked(max_waiting=100)
    blocked.block(_delivery("first", "user-1"), RuntimeError("handler failure"))

    failed_entity_blocked = blocked.is_blocked("user-1")
    other_entity_blocked = blocked.is_blocked("user-2")
    await blocked.stop()

    assert failed_entity_blocked
    assert not other_entity_blocked
