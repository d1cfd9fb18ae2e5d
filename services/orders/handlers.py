"""Saga replies from inventory and payments, applied as transitions."""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from services.orders.saga import IllegalTransition, Trigger
from services.orders.transitions import OrderSaga
from services.runtime.consumer import Handler
from services.runtime.database import Transaction
from services.runtime.errors import NotFound
from services.runtime.events import ReceivedEvent
from tidings.inventory.v1 import inventory_events_pb2
from tidings.orders.v1 import order_pb2
from tidings.payments.v1 import payment_events_pb2

logger = logging.getLogger(__name__)

_STOCK_REASONS = {
    inventory_events_pb2.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK:
        order_pb2.REJECTION_REASON_OUT_OF_STOCK,
    inventory_events_pb2.STOCK_REJECTION_REASON_UNKNOWN_PRODUCT:
        order_pb2.REJECTION_REASON_UNKNOWN_PRODUCT,
}


class SagaHandlers:
    """Consumer handlers that feed replies into the order saga."""

    def __init__(self, saga: OrderSaga) -> None:
        self._saga = saga

    async def on_stock_reserved(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Ask payments for the order total, or confirm at once when there is nothing to pay."""
        assert isinstance(message, inventory_events_pb2.StockReserved)
        reservation = message.reservation
        order = await self._apply(
            tx, event, reservation.order_id, Trigger.STOCK_RESERVED,
            total_cents=reservation.total_cents,
        )
        if order is not None and order.total_cents == 0:
            await self._apply(tx, event, order.id, Trigger.PAYMENT_CAPTURED)

    async def on_stock_rejected(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Reject the order: nothing was reserved, so nothing needs undoing."""
        assert isinstance(message, inventory_events_pb2.StockRejected)
        reason = _STOCK_REASONS.get(message.reason)
        if reason is None:
            # ORDER_CLOSED: inventory saw the placement after the order ended.
            logger.info("stock reply for a closed order ignored", extra={"order_id": message.order_id})
            return
        await self._apply(
            tx, event, message.order_id, Trigger.STOCK_REJECTED,
            rejection_reason=reason, status_detail=message.detail,
        )

    async def on_payment_captured(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Confirm the order."""
        assert isinstance(message, payment_events_pb2.PaymentCaptured)
        await self._apply(tx, event, message.payment.order_id, Trigger.PAYMENT_CAPTURED)

    async def on_payment_declined(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Reject the order; OrderRejected makes inventory release the stock."""
        assert isinstance(message, payment_events_pb2.PaymentDeclined)
        payment = message.payment
        await self._apply(
            tx, event, payment.order_id, Trigger.PAYMENT_DECLINED,
            rejection_reason=order_pb2.REJECTION_REASON_INSUFFICIENT_FUNDS,
            status_detail=(
                f"wallet balance {message.balance_cents} cents is below the total "
                f"{payment.amount_cents} cents"
            ),
        )

    async def _apply(
        self, tx: Transaction, event: ReceivedEvent, order_id: str, trigger: Trigger, **changes: object
    ) -> order_pb2.Order | None:
        try:
            return await self._saga.apply(tx, order_id, trigger, **changes)
        except NotFound:
            logger.warning(
                "saga reply for an unknown order ignored",
                extra={"order_id": order_id, "event_id": event.id, "trigger": str(trigger)},
            )
            return None
        except IllegalTransition as exc:
            # A late reply (after a timeout or cancellation) or a repeated one:
            # the compensation events already sent take care of its effects.
            logger.info(
                "saga reply not applied",
                extra={"order_id": order_id, "event_id": event.id, "reason": exc.message},
            )
            return None

    def by_type(self) -> dict[str, Handler]:
        """Return the handlers keyed by the event type they handle."""
        return {
            inventory_events_pb2.StockReserved.DESCRIPTOR.full_name: self.on_stock_reserved,
            inventory_events_pb2.StockRejected.DESCRIPTOR.full_name: self.on_stock_rejected,
            payment_events_pb2.PaymentCaptured.DESCRIPTOR.full_name: self.on_payment_captured,
            payment_events_pb2.PaymentDeclined.DESCRIPTOR.full_name: self.on_payment_declined,
        }
