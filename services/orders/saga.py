"""The order saga's states and transitions, all in one table.

Orders orchestrates the saga: it reacts to replies from inventory and payments
and emits the next request. So the rules on which step follows which, and on
what a rejection or cancellation must undo, are kept here instead of in the
handlers of several services.

    PENDING ──StockReserved──▶ AWAITING_PAYMENT ──PaymentCaptured──▶ CONFIRMED
       │ StockRejected              │ PaymentDeclined                  │ Cancel
       │ Timeout                    │ Timeout                          ▼
       └──────────▶ REJECTED ◀──────┘                               CANCELLED
    PENDING and AWAITING_PAYMENT also go to CANCELLED on Cancel.

A reply that arrives in a state with no transition for it (a late or
duplicate reply) is not applied.
"""

from __future__ import annotations

from enum import StrEnum

from services.runtime.errors import FailedPrecondition
from tidings.orders.v1 import order_pb2

State = order_pb2.OrderState

PENDING = order_pb2.ORDER_STATE_PENDING
AWAITING_PAYMENT = order_pb2.ORDER_STATE_AWAITING_PAYMENT
CONFIRMED = order_pb2.ORDER_STATE_CONFIRMED
REJECTED = order_pb2.ORDER_STATE_REJECTED
CANCELLED = order_pb2.ORDER_STATE_CANCELLED

OPEN_STATES = (PENDING, AWAITING_PAYMENT)
TERMINAL_STATES = (CONFIRMED, REJECTED, CANCELLED)


class Trigger(StrEnum):
    """Cause of an order's move: a reply from another service, the clock or a client."""

    STOCK_RESERVED = "stock reserved"
    STOCK_REJECTED = "stock rejected"
    PAYMENT_CAPTURED = "payment captured"
    PAYMENT_DECLINED = "payment declined"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


TRANSITIONS: dict[tuple[int, Trigger], int] = {
    (PENDING, Trigger.STOCK_RESERVED): AWAITING_PAYMENT,
    (PENDING, Trigger.STOCK_REJECTED): REJECTED,
    (PENDING, Trigger.TIMEOUT): REJECTED,
    (PENDING, Trigger.CANCEL): CANCELLED,
    (AWAITING_PAYMENT, Trigger.PAYMENT_CAPTURED): CONFIRMED,
    (AWAITING_PAYMENT, Trigger.PAYMENT_DECLINED): REJECTED,
    (AWAITING_PAYMENT, Trigger.TIMEOUT): REJECTED,
    (AWAITING_PAYMENT, Trigger.CANCEL): CANCELLED,
    (CONFIRMED, Trigger.CANCEL): CANCELLED,
}


class IllegalTransition(FailedPrecondition):
    """The order's state has no transition for the trigger."""

    reason = "ILLEGAL_TRANSITION"


def next_state(order_id: str, state: int, trigger: Trigger) -> int:
    """Return the state an order in state moves to on trigger.

    Raises:
        IllegalTransition: The table has no such transition.
    """
    target = TRANSITIONS.get((state, trigger))
    if target is None:
        raise IllegalTransition(
            f"order {order_id} is {State.Name(state)}; {trigger} does not apply in that state",
            metadata={"order_id": order_id, "state": State.Name(state), "trigger": str(trigger)},
        )
    return target
