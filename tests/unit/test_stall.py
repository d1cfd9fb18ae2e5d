"""The decision rule of the stalled-consumer watch."""

from __future__ import annotations

from services.runtime.stall import ConsumerPosition, confirms_stall


def position(
    delivered: int = 11, pending: int = 0, ack_pending: int = 0, newest: int = 26
) -> ConsumerPosition:
    return ConsumerPosition(delivered=delivered, pending=pending, ack_pending=ack_pending, newest=newest)


def test_position_with_undelivered_newer_message_looks_stalled() -> None:
    assert position().looks_stalled()


def test_position_with_pending_messages_is_not_stalled() -> None:
    assert not position(pending=15).looks_stalled()


def test_position_with_unacked_messages_is_not_stalled() -> None:
    assert not position(ack_pending=3).looks_stalled()


def test_position_caught_up_is_not_stalled() -> None:
    assert not position(delivered=26).looks_stalled()


def test_confirms_stall_needs_a_first_check() -> None:
    assert not confirms_stall(None, position())


def test_confirms_stall_with_two_equal_checks() -> None:
    assert confirms_stall(position(), position())


def test_confirms_stall_not_when_delivery_moved_on() -> None:
    assert not confirms_stall(position(delivered=11), position(delivered=12))


def test_confirms_stall_not_when_second_check_is_healthy() -> None:
    assert not confirms_stall(position(), position(pending=15))
