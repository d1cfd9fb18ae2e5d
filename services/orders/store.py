"""Tables and queries of the orders service."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    select,
    update,
)

from services.runtime.database import Transaction, as_utc
from services.runtime.errors import NotFound
from tidings.orders.v1 import order_pb2

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("user_id", String(36), nullable=False),
    Column("state", Integer, nullable=False),
    Column("total_cents", BigInteger, nullable=False, default=0),
    Column("rejection_reason", Integer, nullable=False, default=0),
    Column("status_detail", Text, nullable=False, default=""),
    # When an open order is rejected for want of a reply.
    Column("deadline", DateTime(timezone=True), nullable=False),
    # traceparent/tracestate of PlaceOrder as JSON, so a timeout joins that trace.
    Column("trace_headers", Text, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)
Index("orders_by_user", orders.c.user_id, orders.c.seq)
Index("orders_open_by_deadline", orders.c.state, orders.c.deadline)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", String(36), ForeignKey("orders.id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("product_id", String(36), nullable=False),
    Column("quantity", Integer, nullable=False),
)

# The saga's hot statements are built once, because building one per call took a
# large share of the saga services' CPU in a profile under load. A prebuilt
# statement also keeps its compiled-cache key.
_INSERT_ORDER = orders.insert()
_INSERT_LINES = order_lines.insert()
_ORDER_BY_ID = select(orders).where(orders.c.id == bindparam("order_id"))
# The SET clause comes from the parameter names that match columns: state,
# update_time and whatever set_state's caller changes.
_SET_STATE = update(orders).where(
    orders.c.id == bindparam("order_id"), orders.c.state == bindparam("expected")
)
_LINES_OF = (
    select(order_lines)
    .where(order_lines.c.order_id.in_(bindparam("order_ids", expanding=True)))
    .order_by(order_lines.c.order_id, order_lines.c.position)
)


async def insert_order(
    tx: Transaction,
    order_id: str,
    user_id: str,
    lines: list[tuple[str, int]],
    deadline: datetime,
    trace_headers: str,
) -> order_pb2.Order:
    """Insert a PENDING order with its lines and return it."""
    now = datetime.now(UTC)
    values = {
        "id": order_id, "user_id": user_id, "state": order_pb2.ORDER_STATE_PENDING, "total_cents": 0,
        "rejection_reason": 0, "status_detail": "", "deadline": deadline,
        "trace_headers": trace_headers, "create_time": now, "update_time": now,
    }
    await tx.execute(_INSERT_ORDER, values)
    await tx.execute(
        _INSERT_LINES,
        [
            {"order_id": order_id, "position": position, "product_id": product, "quantity": quantity}
            for position, (product, quantity) in enumerate(lines)
        ],
    )
    # Built from the inserted values instead of read back, which saves two queries per order.
    line_items = [order_pb2.LineItem(product_id=product, quantity=quantity) for product, quantity in lines]
    return to_message(SimpleNamespace(**values), line_items)


async def get_order_row(tx: Transaction, order_id: str) -> Any:
    """Return the orders row of an order.

    Raises:
        NotFound: No order has this id.
    """
    row = (await tx.execute(_ORDER_BY_ID, {"order_id": order_id})).first()
    if row is None:
        raise NotFound(
            f"order {order_id} not found", reason="ORDER_NOT_FOUND", metadata={"order_id": order_id}
        )
    return row


async def get_order(tx: Transaction, order_id: str) -> order_pb2.Order:
    """Return an order with its lines.

    Raises:
        NotFound: No order has this id.
    """
    row = await get_order_row(tx, order_id)
    lines = await _lines_of(tx, [order_id])
    return to_message(row, lines.get(order_id, []))


async def list_orders(tx: Transaction, user_id: str, after: int | None, limit: int) -> list[Any]:
    """Return up to limit order rows of a user with seq greater than after, oldest first."""
    query = select(orders).where(orders.c.user_id == user_id).order_by(orders.c.seq).limit(limit)
    if after is not None:
        query = query.where(orders.c.seq > after)
    return list((await tx.execute(query)).all())


async def messages_for(tx: Transaction, rows: list[Any]) -> list[order_pb2.Order]:
    """Convert order rows to messages, loading their lines in one query."""
    lines = await _lines_of(tx, [row.id for row in rows])
    return [to_message(row, lines.get(row.id, [])) for row in rows]


async def set_state(
    tx: Transaction, order_id: str, expected: int, new: int, **changes: Any
) -> datetime | None:
    """Move an order from state expected to new and return the update time it stored.

    Returns None, and changes nothing, if the order's state was not expected.
    The state check is in the UPDATE itself, so two writers racing on one
    order (a reply and the timeout scanner) cannot both apply a transition.
    """
    now = datetime.now(UTC)
    result = await tx.execute(
        _SET_STATE,
        {"order_id": order_id, "expected": expected, "state": new, "update_time": now, **changes},
    )
    return now if result.rowcount else None


async def lines_of(tx: Transaction, order_id: str) -> list[order_pb2.LineItem]:
    """Return the line items of an order in their original order."""
    lines = await _lines_of(tx, [order_id])
    return lines.get(order_id, [])


async def overdue_orders(tx: Transaction, now: datetime, limit: int) -> list[Any]:
    """Return open orders whose deadline has passed, oldest deadline first."""
    query = (
        select(orders.c.id, orders.c.trace_headers)
        .where(
            orders.c.state.in_([order_pb2.ORDER_STATE_PENDING, order_pb2.ORDER_STATE_AWAITING_PAYMENT]),
            orders.c.deadline < now,
        )
        .order_by(orders.c.deadline)
        .limit(limit)
    )
    return list((await tx.execute(query)).all())


def to_message(row: Any, lines: list[order_pb2.LineItem]) -> order_pb2.Order:
    """Convert an orders row and its lines to the protobuf message."""
    order = order_pb2.Order(
        id=row.id,
        user_id=row.user_id,
        line_items=lines,
        state=row.state,
        total_cents=row.total_cents,
        rejection_reason=row.rejection_reason,
        status_detail=row.status_detail,
    )
    order.create_time.FromDatetime(as_utc(row.create_time))
    order.update_time.FromDatetime(as_utc(row.update_time))
    return order


async def _lines_of(tx: Transaction, order_ids: list[str]) -> dict[str, list[order_pb2.LineItem]]:
    if not order_ids:
        return {}
    found: dict[str, list[order_pb2.LineItem]] = {}
    for line in (await tx.execute(_LINES_OF, {"order_ids": order_ids})).all():
        found.setdefault(line.order_id, []).append(
            order_pb2.LineItem(product_id=line.product_id, quantity=line.quantity)
        )
    return found
