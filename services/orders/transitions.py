"""Applying saga transitions: the state change and the events it causes, in one transaction."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from google.protobuf.message import Message

from services.orders import store
from services.orders.saga import (
    AWAITING_PAYMENT,
    CANCELLED,
    CONFIRMED,
    REJECTED,
    IllegalTransition,
    State,
    Trigger,
    next_state,
)
from services.runtime.database import Transaction
from services.runtime.events import Event
from services.runtime.outbox import Outbox
from tidings.orders.v1 import order_events_pb2, order_pb2

logger = logging.getLogger(__name__)

SUBJECT_PLACED = "tidings.orders.order.placed"
SUBJECT_PAYMENT_REQUESTED = "tidings.orders.payment.requested"
SUBJECT_CONFIRMED = "tidings.orders.order.confirmed"
SUBJECT_REJECTED = "tidings.orders.order.rejected"
SUBJECT_CANCELLED = "tidings.orders.order.cancelled"


class OrderSaga:
    """Moves orders between states and writes the events each move requires."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def place(self, tx: Transaction, order: order_pb2.Order) -> None:
        """Write OrderPlaced for a newly inserted order, which starts its saga."""
        await self._outbox.add(
            tx, [Event(SUBJECT_PLACED, order_events_pb2.OrderPlaced(order=order), order.id)]
        )

    async def apply(
        self, tx: Transaction, order_id: str, trigger: Trigger, **changes: Any
    ) -> order_pb2.Order:
        """Apply trigger to an order, store the new state and write its events.

        Raises:
            NotFound: No order has this id.
            IllegalTransition: The order's state has no transition for trigger,
                or another writer changed the state first.
        """
        row = await store.get_order_row(tx, order_id)
        target = next_state(order_id, row.state, trigger)
        update_time = await store.set_state(tx, order_id, row.state, target, **changes)
        if update_time is None:
            raise IllegalTransition(
                f"order {order_id} changed state while {trigger} was applied",
                metadata={"order_id": order_id, "trigger": str(trigger)},
            )

        # The new row is the old one with the UPDATE's values, so it is not read again.
        updated = SimpleNamespace(**{**row._mapping, **changes, "state": target, "update_time": update_time})
        order = store.to_message(updated, await store.lines_of(tx, order_id))
        events = [Event(subject, message, order_id) for subject, message in _events_for(order)]
        await self._outbox.add(tx, events)
        logger.info(
            "order state changed",
            extra={
                "order_id": order_id,
                "from_state": State.Name(row.state),
                "to_state": State.Name(target),
                "trigger": str(trigger),
            },
        )
        return order


def _events_for(order: order_pb2.Order) -> list[tuple[str, Message]]:
    if order.state == AWAITING_PAYMENT:
        if order.total_cents == 0:
            # Nothing to charge; the caller confirms the order right away.
            return []
        request = order_events_pb2.PaymentRequested(
            order_id=order.id, user_id=order.user_id, amount_cents=order.total_cents
        )
        return [(SUBJECT_PAYMENT_REQUESTED, request)]
    if order.state == CONFIRMED:
        return [(SUBJECT_CONFIRMED, order_events_pb2.OrderConfirmed(order=order))]
    if order.state == REJECTED:
        return [(SUBJECT_REJECTED, order_events_pb2.OrderRejected(order=order))]
    if order.state == CANCELLED:
        return [(SUBJECT_CANCELLED, order_events_pb2.OrderCancelled(order=order))]
    return []
