"""Order event handlers: reserve, commit and release stock inside the consumer's transaction."""

from __future__ import annotations

import logging

from google.protobuf.message import Message

from services.inventory import store
from services.runtime.consumer import Handler
from services.runtime.database import Transaction
from services.runtime.events import Event, ReceivedEvent
from services.runtime.service import Runtime
from tidings.inventory.v1 import inventory_events_pb2, product_pb2
from tidings.orders.v1 import order_events_pb2, order_pb2

logger = logging.getLogger(__name__)

SUBJECT_RESERVED = "tidings.inventory.stock.reserved"
SUBJECT_REJECTED = "tidings.inventory.stock.rejected"
SUBJECT_RELEASED = "tidings.inventory.stock.released"

State = product_pb2.ReservationState
Reason = inventory_events_pb2.StockRejectionReason


class OrderEventHandlers:
    """Applies order events to products and reservations and writes inventory events to the outbox.

    Every event written has the order id as its aggregate id, so the order
    service receives the events of one order in the order they were written.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._outbox = runtime.outbox

    def by_type(self) -> dict[str, Handler]:
        """Return the handler of each order event type, keyed by its full protobuf name."""
        return {
            order_events_pb2.OrderPlaced.DESCRIPTOR.full_name: self.on_order_placed,
            order_events_pb2.OrderConfirmed.DESCRIPTOR.full_name: self.on_order_confirmed,
            order_events_pb2.OrderRejected.DESCRIPTOR.full_name: self.on_order_closed,
            order_events_pb2.OrderCancelled.DESCRIPTOR.full_name: self.on_order_closed,
        }

    async def on_order_placed(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Reserve every line of a new order, or none of them and write StockRejected."""
        assert isinstance(message, order_events_pb2.OrderPlaced)
        order = message.order
        quantities = _quantities_by_product(event, order)
        if quantities is None:
            return

        if await store.is_order_closed(tx, order.id):
            await self._reject(tx, order.id, Reason.STOCK_REJECTION_REASON_ORDER_CLOSED,
                               f"order {order.id} was already rejected or cancelled")
            return
        if await store.get_reservation(tx, order.id) is not None:
            logger.info("order already has a reservation; placement ignored",
                        extra={"order_id": order.id, "event_id": event.id})
            return

        found = await store.products_by_id(tx, quantities)
        unknown = [product_id for product_id in quantities if product_id not in found]
        if unknown:
            await self._reject(tx, order.id, Reason.STOCK_REJECTION_REASON_UNKNOWN_PRODUCT,
                               "; ".join(f"product {product_id} does not exist" for product_id in unknown))
            return
        short = [
            _shortage(product_id, quantity, found[product_id].stock - found[product_id].reserved)
            for product_id, quantity in quantities.items()
            if found[product_id].stock - found[product_id].reserved < quantity
        ]
        if short:
            await self._reject(tx, order.id, Reason.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK,
                               "; ".join(short))
            return

        if not await self._reserve_all(tx, order.id, quantities):
            return
        lines = [
            {"product_id": product_id, "quantity": quantity,
             "unit_price_cents": found[product_id].price_cents}
            for product_id, quantity in quantities.items()
        ]
        row, line_rows = await store.insert_reservation(tx, order.id, State.RESERVATION_STATE_RESERVED,
                                                        lines)
        reservation = store.reservation_to_message(row, line_rows)
        await self._outbox.add(tx, [
            Event(SUBJECT_RESERVED, inventory_events_pb2.StockReserved(reservation=reservation), order.id)
        ])
        logger.info("stock reserved",
                    extra={"order_id": order.id, "product_ids": sorted(quantities),
                           "total_cents": reservation.total_cents})

    async def _reserve_all(self, tx: Transaction, order_id: str, quantities: dict[str, int]) -> bool:
        """Reserve every quantity and return True, or undo the lines done so far and write StockRejected.

        The caller has checked availability, so a shortfall here means another
        transaction reserved the units after that check. That can happen on
        PostgreSQL, where consumers commit in parallel, but not on SQLite,
        where transactions run one at a time.
        """
        done: list[tuple[str, int]] = []
        # Row locks are taken in product id order, as the commit and release
        # paths do (reservation lines are read in that order), so on PostgreSQL
        # two transactions that share products wait for each other instead of
        # deadlocking.
        for product_id in sorted(quantities):
            quantity = quantities[product_id]
            if await store.reserve_units(tx, product_id, quantity):
                done.append((product_id, quantity))
                continue

            for done_id, done_quantity in done:
                await store.release_units(tx, done_id, done_quantity)
            current = await store.get_product(tx, product_id)
            await self._reject(tx, order_id, Reason.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK,
                               _shortage(product_id, quantity, current.stock - current.reserved))
            return False
        return True

    async def on_order_confirmed(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Take the reserved units of a confirmed order out of stock."""
        assert isinstance(message, order_events_pb2.OrderConfirmed)
        order_id = message.order.id
        found = await store.get_reservation(tx, order_id)
        if found is None:
            logger.warning("confirmed order has no reservation; nothing to commit",
                           extra={"order_id": order_id, "event_id": event.id})
            return
        row, lines = found
        if row.state != State.RESERVATION_STATE_RESERVED:
            logger.warning("reservation is not RESERVED; confirmation ignored",
                           extra={"order_id": order_id, "event_id": event.id,
                                  "state": State.Name(row.state)})
            return

        for line in lines:
            await store.remove_units(tx, line.product_id, line.quantity)
        await store.set_reservation_state(tx, order_id, State.RESERVATION_STATE_COMMITTED)
        logger.info("reservation committed", extra={"order_id": order_id})

    async def on_order_closed(self, tx: Transaction, event: ReceivedEvent, message: Message) -> None:
        """Release the stock of a rejected or cancelled order and mark the order closed."""
        assert isinstance(message, (order_events_pb2.OrderRejected, order_events_pb2.OrderCancelled))
        order_id = message.order.id
        await store.close_order(tx, order_id)
        found = await store.get_reservation(tx, order_id)
        if found is None:
            logger.info("closed order has no reservation; nothing to release",
                        extra={"order_id": order_id, "event_id": event.id})
            return
        row, lines = found
        if row.state == State.RESERVATION_STATE_RESERVED:
            for line in lines:
                await store.release_units(tx, line.product_id, line.quantity)
        elif row.state == State.RESERVATION_STATE_COMMITTED:
            # The order was cancelled after confirmation: its units come back into stock.
            for line in lines:
                await store.restock_units(tx, line.product_id, line.quantity)
        else:
            logger.info("reservation already released",
                        extra={"order_id": order_id, "event_id": event.id})
            return

        released = await store.set_reservation_state(tx, order_id, State.RESERVATION_STATE_RELEASED)
        reservation = store.reservation_to_message(released, lines)
        await self._outbox.add(tx, [
            Event(SUBJECT_RELEASED, inventory_events_pb2.StockReleased(reservation=reservation), order_id)
        ])
        logger.info("reservation released",
                    extra={"order_id": order_id, "previous_state": State.Name(row.state)})

    async def _reject(
        self, tx: Transaction, order_id: str, reason: inventory_events_pb2.StockRejectionReason, detail: str
    ) -> None:
        rejected = inventory_events_pb2.StockRejected(order_id=order_id, reason=reason, detail=detail)
        await self._outbox.add(tx, [Event(SUBJECT_REJECTED, rejected, order_id)])
        logger.info("stock rejected",
                    extra={"order_id": order_id, "reason": Reason.Name(reason), "detail": detail})


def _quantities_by_product(event: ReceivedEvent, order: order_pb2.Order) -> dict[str, int] | None:
    """Return the ordered units per product id, or None for an order that cannot be reserved.

    Lines naming the same product are added up, so the availability check
    covers the whole quantity.
    """
    invalid = not order.id or not order.line_items or any(
        line.quantity <= 0 for line in order.line_items
    )
    if invalid:
        # NOTE: StockRejectionReason has no value for a malformed order, so none
        # is sent; the order service's saga timeout rejects the order instead.
        logger.error("placed order has no id, no lines or a line without units; event ignored",
                     extra={"order_id": order.id, "event_id": event.id,
                            "line_count": len(order.line_items)})
        return None
    quantities: dict[str, int] = {}
    for line in order.line_items:
        quantities[line.product_id] = quantities.get(line.product_id, 0) + line.quantity
    return quantities


def _shortage(product_id: str, requested: int, available: int) -> str:
    return f"product {product_id}: requested {requested}, available {available}"
