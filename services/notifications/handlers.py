"""Event handlers: one notification per user event, written in the consumer's transaction."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from google.protobuf.message import Message

from services.notifications import store
from services.runtime.database import Transaction
from services.runtime.events import ReceivedEvent
from tidings.notifications.v1 import notification_pb2
from tidings.orders.v1 import order_events_pb2, order_pb2
from tidings.users.v1 import user_events_pb2

logger = logging.getLogger(__name__)

Kind = notification_pb2.NotificationKind


async def on_user_created(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Welcome a new user."""
    assert isinstance(message, user_events_pb2.UserCreated)
    user = message.user
    await _notify(
        tx, event, user.id, Kind.NOTIFICATION_KIND_WELCOME,
        title=f"Welcome, {user.display_name}",
        body=f"Your account {user.email} is ready.",
    )


async def on_user_updated(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Tell a user which profile fields changed."""
    assert isinstance(message, user_events_pb2.UserUpdated)
    changed = ", ".join(message.changed_fields.paths) or "nothing"
    await _notify(
        tx, event, message.user.id, Kind.NOTIFICATION_KIND_PROFILE_UPDATED,
        title="Profile updated",
        body=f"These fields of your profile changed: {changed}.",
    )


async def on_user_deleted(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Confirm an account deletion."""
    assert isinstance(message, user_events_pb2.UserDeleted)
    await _notify(
        tx, event, message.user_id, Kind.NOTIFICATION_KIND_ACCOUNT_DELETED,
        title="Account deleted",
        body=f"The account {message.email} was deleted.",
    )


async def on_order_confirmed(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Tell the user the order is confirmed and paid."""
    assert isinstance(message, order_events_pb2.OrderConfirmed)
    order = message.order
    await _notify(
        tx, event, order.user_id, Kind.NOTIFICATION_KIND_ORDER_CONFIRMED,
        title="Order confirmed",
        body=f"Order {order.id} is confirmed; {_money(order.total_cents)} was charged.",
    )


async def on_order_rejected(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Tell the user why the order was rejected."""
    assert isinstance(message, order_events_pb2.OrderRejected)
    order = message.order
    reason = order_pb2.RejectionReason.Name(order.rejection_reason)
    reason_text = reason.removeprefix("REJECTION_REASON_").replace("_", " ").lower()
    await _notify(
        tx, event, order.user_id, Kind.NOTIFICATION_KIND_ORDER_REJECTED,
        title="Order rejected",
        body=f"Order {order.id} was rejected ({reason_text}): {order.status_detail}. "
        "Nothing was charged.",
    )


async def on_order_cancelled(tx: Transaction, event: ReceivedEvent, message: Message) -> None:
    """Confirm a cancellation."""
    assert isinstance(message, order_events_pb2.OrderCancelled)
    order = message.order
    await _notify(
        tx, event, order.user_id, Kind.NOTIFICATION_KIND_ORDER_CANCELLED,
        title="Order cancelled",
        body=f"Order {order.id} was cancelled; any charge is refunded.",
    )


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


USER_HANDLERS = {
    user_events_pb2.UserCreated.DESCRIPTOR.full_name: on_user_created,
    user_events_pb2.UserUpdated.DESCRIPTOR.full_name: on_user_updated,
    user_events_pb2.UserDeleted.DESCRIPTOR.full_name: on_user_deleted,
}

ORDER_HANDLERS = {
    order_events_pb2.OrderConfirmed.DESCRIPTOR.full_name: on_order_confirmed,
    order_events_pb2.OrderRejected.DESCRIPTOR.full_name: on_order_rejected,
    order_events_pb2.OrderCancelled.DESCRIPTOR.full_name: on_order_cancelled,
}


async def _notify(
    tx: Transaction, event: ReceivedEvent, user_id: str, kind: int, *, title: str, body: str
) -> None:
    notification_id = str(uuid.uuid4())
    await store.insert_notification(
        tx,
        {
            "id": notification_id,
            "user_id": user_id,
            "kind": kind,
            "title": title[:200],
            "body": body,
            "source_event_id": event.id,
            "event_time": event.time or datetime.now(UTC),
        },
    )
    logger.info(
        "notification stored",
        extra={"notification_id": notification_id, "user_id": user_id, "event_id": event.id},
    )
