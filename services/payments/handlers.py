"""Order event handlers: charge a wallet for each order and refund it when the order closes.

Every handler runs in the consumer's transaction, so the wallet change, the
payment row and the outbox event commit together or not at all.
"""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from services.payments import store
from services.runtime.consumer import Handler
from services.runtime.database import Transaction
from services.runtime.events import Event, ReceivedEvent
from services.runtime.service import Runtime
from tidings.orders.v1 import order_events_pb2
from tidings.payments.v1 import payment_events_pb2

logger = logging.getLogger(__name__)

State = store.State

SUBJECT_CAPTURED = "tidings.payments.payment.captured"
SUBJECT_DECLINED = "tidings.payments.payment.declined"
SUBJECT_REFUNDED = "tidings.payments.payment.refunded"


class PaymentHandlers:
    """Handlers that apply order events to wallets and payments and write the payment events."""

    def __init__(self, runtime: Runtime) -> None:
        self._outbox = runtime.outbox

    def by_event_type(self) -> dict[str, Handler]:
        """Return the handler of each order event type, keyed by its full protobuf name."""
        return {
            order_events_pb2.PaymentRequested.DESCRIPTOR.full_name: self.on_payment_requested,
            order_events_pb2.OrderRejected.DESCRIPTOR.full_name: self.on_order_closed,
            order_events_pb2.OrderCancelled.DESCRIPTOR.full_name: self.on_order_closed,
        }

    async def on_payment_requested(
        self, tx: Transaction, event: ReceivedEvent, message: Message
    ) -> None:
        """Charge the order's amount to the user's wallet, or decline when it does not cover it."""
        assert isinstance(message, order_events_pb2.PaymentRequested)
        order_id, user_id, amount = message.order_id, message.user_id, message.amount_cents
        fields = {"order_id": order_id, "user_id": user_id, "event_id": event.id}
        if not order_id:
            logger.error("payment request without an order id ignored", extra=fields)
            return

        await store.lock_order(tx, order_id)
        if await store.is_order_closed(tx, order_id):
            logger.info("payment request for a rejected or cancelled order ignored", extra=fields)
            return
        if await store.find_payment(tx, order_id) is not None:
            logger.info("payment request for an order already charged ignored", extra=fields)
            return

        if amount <= 0:
            # The orders service sends positive amounts only. Declining lets its
            # saga reject the order instead of waiting for the saga timeout.
            logger.error("payment request with an amount of 0 or less declined",
                         extra={**fields, "amount_cents": amount})
            await self._decline(tx, order_id, user_id, amount)
        elif await store.withdraw(tx, user_id, amount):
            await self._capture(tx, order_id, user_id, amount)
        else:
            await self._decline(tx, order_id, user_id, amount)

    async def _capture(self, tx: Transaction, order_id: str, user_id: str, amount: int) -> None:
        row = await store.insert_payment(tx, order_id, user_id, amount, State.PAYMENT_STATE_CAPTURED)
        captured = payment_events_pb2.PaymentCaptured(payment=store.to_payment_message(row))
        await self._outbox.add(tx, [Event(SUBJECT_CAPTURED, captured, order_id)])
        logger.info(
            "payment captured",
            extra={"order_id": order_id, "user_id": user_id, "amount_cents": amount},
        )

    async def _decline(self, tx: Transaction, order_id: str, user_id: str, amount: int) -> None:
        wallet = await store.find_wallet(tx, user_id)
        balance = wallet.balance_cents if wallet is not None else 0
        row = await store.insert_payment(tx, order_id, user_id, amount, State.PAYMENT_STATE_DECLINED)
        declined = payment_events_pb2.PaymentDeclined(
            payment=store.to_payment_message(row), balance_cents=balance
        )
        await self._outbox.add(tx, [Event(SUBJECT_DECLINED, declined, order_id)])
        logger.info(
            "payment declined",
            extra={"order_id": order_id, "user_id": user_id, "amount_cents": amount,
                   "balance_cents": balance, "wallet_exists": wallet is not None},
        )

    async def on_order_closed(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Remember a rejected or cancelled order and refund its payment if it was captured."""
        assert isinstance(message, order_events_pb2.OrderRejected | order_events_pb2.OrderCancelled)
        order_id = message.order.id
        fields = {"order_id": order_id, "user_id": message.order.user_id, "event_id": event.id}
        if not order_id:
            logger.error("order event without an order id ignored", extra=fields)
            return

        await store.lock_order(tx, order_id)
        await store.close_order(tx, order_id)
        row = await store.mark_refunded(tx, order_id)
        if row is None:
            logger.info("order closed with no captured payment to refund", extra=fields)
            return

        await store.deposit(tx, row.user_id, row.amount_cents)
        refunded = payment_events_pb2.PaymentRefunded(payment=store.to_payment_message(row))
        await self._outbox.add(tx, [Event(SUBJECT_REFUNDED, refunded, order_id)])
        logger.info(
            "payment refunded",
            extra={**fields, "user_id": row.user_id, "amount_cents": row.amount_cents},
        )
