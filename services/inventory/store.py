"""Tables and queries of the inventory service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    select,
    update,
)

from services.runtime.database import Transaction, as_utc
from services.runtime.errors import FailedPrecondition, NotFound
from tidings.inventory.v1 import product_pb2

metadata = MetaData()

# Order ids come from the orders service, so their column is as wide as the outbox's aggregate_id.
ORDER_ID_LENGTH = 128

products = Table(
    "products",
    metadata,
    # Insertion order, used as the pagination keyset.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("id", String(36), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("price_cents", BigInteger, nullable=False),
    # Units on hand, including the reserved ones.
    Column("stock", BigInteger, nullable=False),
    # Units held by RESERVED reservations.
    Column("reserved", BigInteger, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    CheckConstraint("price_cents >= 0", name="products_price_not_negative"),
    CheckConstraint("reserved >= 0", name="products_reserved_not_negative"),
    CheckConstraint("reserved <= stock", name="products_reserved_within_stock"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", String(ORDER_ID_LENGTH), primary_key=True),
    # A product_pb2.ReservationState value.
    Column("state", Integer, nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

reservation_lines = Table(
    "reservation_lines",
    metadata,
    Column(
        "order_id",
        String(ORDER_ID_LENGTH),
        ForeignKey("reservations.order_id"),
        primary_key=True,
    ),
    Column("product_id", String(36), ForeignKey("products.id"), primary_key=True),
    Column("quantity", Integer, nullable=False),
    # Price when the stock was reserved. Later price changes do not alter the reservation.
    Column("unit_price_cents", BigInteger, nullable=False),
    CheckConstraint("quantity > 0", name="reservation_lines_quantity_positive"),
)

# Orders that were rejected or cancelled. An OrderPlaced that arrives after the
# order was closed (a redelivery delayed past the rejection) must not reserve.
closed_orders = Table(
    "closed_orders",
    metadata,
    Column("order_id", String(ORDER_ID_LENGTH), primary_key=True),
    Column("closed_at", DateTime(timezone=True), nullable=False),
)

# The saga's hot statements are built once, because building one per call took
# about a third of the inventory process's CPU in a profile under load. A
# prebuilt statement also keeps its compiled-cache key.
_NOW = bindparam("now", type_=DateTime(timezone=True))
_PRODUCT = products.c.id == bindparam("product_id")
_PRODUCT_BY_ID = select(products).where(_PRODUCT)
_PRODUCTS_BY_IDS = select(products).where(products.c.id.in_(bindparam("product_ids", expanding=True)))
_RESERVE = (
    update(products)
    .where(_PRODUCT, products.c.stock - products.c.reserved >= bindparam("quantity"))
    .values(reserved=products.c.reserved + bindparam("quantity"), update_time=_NOW)
)
_RELEASE = (
    update(products)
    .where(_PRODUCT)
    .values(reserved=products.c.reserved - bindparam("quantity"), update_time=_NOW)
)
_REMOVE = (
    update(products)
    .where(_PRODUCT)
    .values(
        stock=products.c.stock - bindparam("quantity"),
        reserved=products.c.reserved - bindparam("quantity"),
        update_time=_NOW,
    )
)
_RESTOCK = (
    update(products)
    .where(_PRODUCT)
    .values(stock=products.c.stock + bindparam("quantity"), update_time=_NOW)
)
_INSERT_RESERVATION = reservations.insert()
_INSERT_RESERVATION_LINES = reservation_lines.insert()
_RESERVATION = reservations.c.order_id == bindparam("reserved_order_id")
_RESERVATION_BY_ORDER = select(reservations).where(_RESERVATION)
_RESERVATION_LINES_BY_ORDER = (
    select(reservation_lines)
    .where(reservation_lines.c.order_id == bindparam("reserved_order_id"))
    .order_by(reservation_lines.c.product_id)
)
_SET_RESERVATION_STATE = (
    update(reservations).where(_RESERVATION).values(state=bindparam("new_state"), update_time=_NOW)
)
_CLOSED_ORDER = select(closed_orders.c.order_id).where(
    closed_orders.c.order_id == bindparam("closed_order_id")
)


def product_to_message(row: Any) -> product_pb2.Product:
    """Convert a products row to its protobuf message."""
    product = product_pb2.Product(
        id=row.id,
        name=row.name,
        price_cents=row.price_cents,
        stock=row.stock,
        reserved=row.reserved,
    )
    product.create_time.FromDatetime(as_utc(row.create_time))
    product.update_time.FromDatetime(as_utc(row.update_time))
    return product


def reservation_to_message(row: Any, lines: Iterable[Any]) -> product_pb2.Reservation:
    """Convert a reservations row and its line rows to a protobuf message."""
    reservation = product_pb2.Reservation(
        order_id=row.order_id,
        state=row.state,
        total_cents=row.total_cents,
        lines=[
            product_pb2.ReservationLine(
                product_id=line.product_id,
                quantity=line.quantity,
                unit_price_cents=line.unit_price_cents,
            )
            for line in lines
        ],
    )
    reservation.create_time.FromDatetime(as_utc(row.create_time))
    reservation.update_time.FromDatetime(as_utc(row.update_time))
    return reservation


async def insert_product(
    tx: Transaction, product_id: str, name: str, price_cents: int, stock: int
) -> Any:
    """Insert a product with nothing reserved and return its row."""
    now = datetime.now(UTC)
    await tx.execute(
        products.insert().values(
            id=product_id,
            name=name,
            price_cents=price_cents,
            stock=stock,
            reserved=0,
            create_time=now,
            update_time=now,
        )
    )
    return await get_product(tx, product_id)


async def get_product(tx: Transaction, product_id: str) -> Any:
    """Return the row of a product.

    Raises:
        NotFound: No product has this id.
    """
    row = (await tx.execute(_PRODUCT_BY_ID, {"product_id": product_id})).first()
    if row is None:
        raise NotFound(
            f"product {product_id} not found",
            reason="PRODUCT_NOT_FOUND",
            metadata={"product_id": product_id},
        )
    return row


async def list_products(tx: Transaction, after: int | None, limit: int) -> list[Any]:
    """Return up to limit products with seq greater than after, oldest first."""
    query = select(products).order_by(products.c.seq).limit(limit)
    if after is not None:
        query = query.where(products.c.seq > after)
    return list((await tx.execute(query)).all())


async def products_by_id(tx: Transaction, product_ids: Iterable[str]) -> dict[str, Any]:
    """Return the rows of the products that exist among product_ids, by id."""
    rows = (await tx.execute(_PRODUCTS_BY_IDS, {"product_ids": list(product_ids)})).all()
    return {row.id: row for row in rows}


async def update_product(tx: Transaction, product_id: str, changes: dict[str, Any]) -> Any:
    """Apply changes to a product and return the new row.

    The stock check is part of the UPDATE, so a reservation committed by
    another transaction between a read and this write cannot leave the
    product with more units reserved than in stock.

    Raises:
        NotFound: No product has this id.
        FailedPrecondition: The new stock is below the units reserved.
    """
    await get_product(tx, product_id)
    statement = (
        update(products)
        .where(products.c.id == product_id)
        .values(**changes, update_time=datetime.now(UTC))
    )
    if "stock" in changes:
        statement = statement.where(products.c.reserved <= changes["stock"])
    result = await tx.execute(statement)
    if "stock" in changes and result.rowcount == 0:
        current = await get_product(tx, product_id)
        raise FailedPrecondition(
            f"stock {changes['stock']} of product {product_id} is below its {current.reserved} "
            "reserved units; wait until orders are confirmed or released, or set a higher stock",
            reason="STOCK_BELOW_RESERVED",
            metadata={
                "product_id": product_id,
                "stock": str(changes["stock"]),
                "reserved": str(current.reserved),
            },
        )
    return await get_product(tx, product_id)


async def reserve_units(tx: Transaction, product_id: str, quantity: int) -> bool:
    """Add quantity to the reserved units if that many are available; return whether it did.

    The availability check is in the UPDATE's WHERE clause, so concurrent
    reservations on PostgreSQL cannot both take the last units.
    """
    result = await tx.execute(
        _RESERVE, {"product_id": product_id, "quantity": quantity, "now": datetime.now(UTC)}
    )
    return bool(result.rowcount == 1)


async def release_units(tx: Transaction, product_id: str, quantity: int) -> None:
    """Make reserved units available again."""
    await tx.execute(
        _RELEASE, {"product_id": product_id, "quantity": quantity, "now": datetime.now(UTC)}
    )


async def remove_units(tx: Transaction, product_id: str, quantity: int) -> None:
    """Take reserved units out of stock, because the order that held them was confirmed."""
    await tx.execute(
        _REMOVE, {"product_id": product_id, "quantity": quantity, "now": datetime.now(UTC)}
    )


async def restock_units(tx: Transaction, product_id: str, quantity: int) -> None:
    """Put units of a confirmed and then cancelled order back into stock."""
    await tx.execute(
        _RESTOCK, {"product_id": product_id, "quantity": quantity, "now": datetime.now(UTC)}
    )


async def insert_reservation(
    tx: Transaction, order_id: str, state: int, lines: Sequence[dict[str, Any]]
) -> tuple[Any, list[Any]]:
    """Insert a reservation with its lines and return the stored rows.

    Each line is a dict with product_id, quantity and unit_price_cents.
    """
    now = datetime.now(UTC)
    total = sum(line["quantity"] * line["unit_price_cents"] for line in lines)
    await tx.execute(
        _INSERT_RESERVATION,
        {"order_id": order_id, "state": state, "total_cents": total, "create_time": now,
         "update_time": now},
    )
    await tx.execute(
        _INSERT_RESERVATION_LINES, [{**line, "order_id": order_id} for line in lines]
    )
    found = await get_reservation(tx, order_id)
    assert found is not None
    return found


async def get_reservation(tx: Transaction, order_id: str) -> tuple[Any, list[Any]] | None:
    """Return the reservation row of an order and its line rows ordered by product id, or None."""
    row = (await tx.execute(_RESERVATION_BY_ORDER, {"reserved_order_id": order_id})).first()
    if row is None:
        return None
    lines = (await tx.execute(_RESERVATION_LINES_BY_ORDER, {"reserved_order_id": order_id})).all()
    return row, list(lines)


async def set_reservation_state(tx: Transaction, order_id: str, state: int) -> Any:
    """Change the state of a reservation and return its new row."""
    await tx.execute(
        _SET_RESERVATION_STATE,
        {"reserved_order_id": order_id, "new_state": state, "now": datetime.now(UTC)},
    )
    return (await tx.execute(_RESERVATION_BY_ORDER, {"reserved_order_id": order_id})).one()


async def close_order(tx: Transaction, order_id: str) -> None:
    """Record that an order was rejected or cancelled; closing it again changes nothing."""
    await tx.execute(
        tx.insert_ignoring_conflicts(closed_orders), {"order_id": order_id, "closed_at": datetime.now(UTC)}
    )


async def is_order_closed(tx: Transaction, order_id: str) -> bool:
    """Return whether the order was rejected or cancelled."""
    return (await tx.execute(_CLOSED_ORDER, {"closed_order_id": order_id})).first() is not None
