"""Tables and queries of the payments service."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    select,
    update,
)

from services.runtime.database import Transaction, as_utc
from services.runtime.errors import NotFound
from tidings.payments.v1 import payment_pb2

metadata = MetaData()

State = payment_pb2.PaymentState

wallets = Table(
    "wallets",
    metadata,
    Column("user_id", String(36), primary_key=True),
    Column("balance_cents", BigInteger, nullable=False),
    Column("topped_up_cents", BigInteger, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    CheckConstraint("balance_cents >= 0", name="wallets_balance_not_negative"),
)

# One row per order: the primary key makes a second charge of an order fail.
payments = Table(
    "payments",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("user_id", String(36), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    # A PaymentState value other than UNSPECIFIED.
    Column("state", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

# Orders that were rejected or cancelled. A later PaymentRequested for one of them charges nothing.
closed_orders = Table(
    "closed_orders",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("closed_at", DateTime(timezone=True), nullable=False),
)

# The saga's hot statements are built once, because building one per call costs
# more CPU than running it. A prebuilt statement also keeps its compiled-cache key.
_NOW = bindparam("now", type_=DateTime(timezone=True))
_WALLET = wallets.c.user_id == bindparam("wallet_user_id")
_WALLET_BY_USER = select(wallets).where(_WALLET)
_WITHDRAW = (
    update(wallets)
    .where(_WALLET, wallets.c.balance_cents >= bindparam("amount"))
    .values(balance_cents=wallets.c.balance_cents - bindparam("amount"), update_time=_NOW)
)
_DEPOSIT = (
    update(wallets)
    .where(_WALLET)
    .values(balance_cents=wallets.c.balance_cents + bindparam("amount"), update_time=_NOW)
)
_PAYMENT_BY_ORDER = select(payments).where(payments.c.order_id == bindparam("paid_order_id"))
_INSERT_PAYMENT = payments.insert()
_CLOSED_ORDER = select(closed_orders.c.order_id).where(
    closed_orders.c.order_id == bindparam("closed_order_id")
)


def to_wallet_message(row: Any) -> payment_pb2.Wallet:
    """Convert a wallets row to its protobuf message."""
    wallet = payment_pb2.Wallet(
        user_id=row.user_id, balance_cents=row.balance_cents, topped_up_cents=row.topped_up_cents
    )
    wallet.create_time.FromDatetime(as_utc(row.create_time))
    wallet.update_time.FromDatetime(as_utc(row.update_time))
    return wallet


def to_payment_message(row: Any) -> payment_pb2.Payment:
    """Convert a payments row to its protobuf message."""
    payment = payment_pb2.Payment(
        order_id=row.order_id, user_id=row.user_id, amount_cents=row.amount_cents, state=row.state
    )
    payment.create_time.FromDatetime(as_utc(row.create_time))
    payment.update_time.FromDatetime(as_utc(row.update_time))
    return payment


async def top_up(tx: Transaction, user_id: str, amount_cents: int) -> Any:
    """Add amount_cents to a user's wallet, creating the wallet on first use, and return its row."""
    now = datetime.now(UTC)
    await tx.execute(
        tx.insert_ignoring_conflicts(wallets).values(
            user_id=user_id, balance_cents=0, topped_up_cents=0, create_time=now, update_time=now
        )
    )
    await tx.execute(
        update(wallets)
        .where(wallets.c.user_id == user_id)
        .values(
            balance_cents=wallets.c.balance_cents + amount_cents,
            topped_up_cents=wallets.c.topped_up_cents + amount_cents,
            update_time=now,
        )
    )
    return await get_wallet(tx, user_id)


async def find_wallet(tx: Transaction, user_id: str) -> Any | None:
    """Return the wallet row of a user, or None if the user never topped up."""
    return (await tx.execute(_WALLET_BY_USER, {"wallet_user_id": user_id})).first()


async def get_wallet(tx: Transaction, user_id: str) -> Any:
    """Return the wallet row of a user.

    Raises:
        NotFound: The user never topped up.
    """
    row = await find_wallet(tx, user_id)
    if row is None:
        raise NotFound(
            f"wallet of user {user_id} not found because the user never topped up; call TopUp first",
            reason="WALLET_NOT_FOUND",
            metadata={"user_id": user_id},
        )
    return row


async def withdraw(tx: Transaction, user_id: str, amount_cents: int) -> bool:
    """Take amount_cents from a wallet if its balance covers it, and return whether it did.

    The balance check and the subtraction are one UPDATE, so concurrent
    withdrawals on PostgreSQL cannot both pass the check and overdraw.
    """
    result = await tx.execute(
        _WITHDRAW, {"wallet_user_id": user_id, "amount": amount_cents, "now": datetime.now(UTC)}
    )
    return bool(result.rowcount == 1)


async def deposit(tx: Transaction, user_id: str, amount_cents: int) -> None:
    """Give amount_cents back to an existing wallet; top-up totals stay as they are."""
    await tx.execute(
        _DEPOSIT, {"wallet_user_id": user_id, "amount": amount_cents, "now": datetime.now(UTC)}
    )


async def find_payment(tx: Transaction, order_id: str) -> Any | None:
    """Return the payment row of an order, or None if the order was never charged."""
    return (await tx.execute(_PAYMENT_BY_ORDER, {"paid_order_id": order_id})).first()


async def get_payment(tx: Transaction, order_id: str) -> Any:
    """Return the payment row of an order.

    Raises:
        NotFound: No payment was made for the order.
    """
    row = await find_payment(tx, order_id)
    if row is None:
        raise NotFound(
            f"payment of order {order_id} not found; the order may not have reached payment yet",
            reason="PAYMENT_NOT_FOUND",
            metadata={"order_id": order_id},
        )
    return row


async def insert_payment(
    tx: Transaction, order_id: str, user_id: str, amount_cents: int, state: int
) -> Any:
    """Insert the payment of an order and return its row.

    Raises:
        sqlalchemy.exc.IntegrityError: The order already has a payment.
    """
    now = datetime.now(UTC)
    await tx.execute(
        _INSERT_PAYMENT,
        {"order_id": order_id, "user_id": user_id, "amount_cents": amount_cents, "state": state,
         "create_time": now, "update_time": now},
    )
    return await get_payment(tx, order_id)


async def mark_refunded(tx: Transaction, order_id: str) -> Any | None:
    """Move a CAPTURED payment to REFUNDED and return its row, or None if it is not CAPTURED.

    The state check is part of the UPDATE, so two concurrent refunds of one
    order cannot both succeed.
    """
    result = await tx.execute(
        update(payments)
        .where(payments.c.order_id == order_id, payments.c.state == State.PAYMENT_STATE_CAPTURED)
        .values(state=State.PAYMENT_STATE_REFUNDED, update_time=datetime.now(UTC))
    )
    if result.rowcount != 1:
        return None
    return await get_payment(tx, order_id)


async def close_order(tx: Transaction, order_id: str) -> None:
    """Record that an order was rejected or cancelled; a second record of it is ignored."""
    await tx.execute(
        tx.insert_ignoring_conflicts(closed_orders), {"order_id": order_id, "closed_at": datetime.now(UTC)}
    )


async def is_order_closed(tx: Transaction, order_id: str) -> bool:
    """Return whether an order was rejected or cancelled."""
    return (await tx.execute(_CLOSED_ORDER, {"closed_order_id": order_id})).first() is not None


async def lock_order(tx: Transaction, order_id: str) -> None:
    """Make the transactions that handle one order run one after another.

    Without it, a capture and a cancellation of one order handled by two
    consumer replicas on PostgreSQL could each miss the other's uncommitted
    row, leaving a capture that is never refunded.
    """
    # NOTE: the PostgreSQL branch of Transaction.lock is not run by the tests,
    # which use SQLite.
    await tx.lock(f"order:{order_id}")
