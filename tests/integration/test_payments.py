"""PaymentService and its order-event consumer against a real nats-server and SQLite."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import Table, func, select

from services.payments import store
from services.payments.main import SPEC as PAYMENTS
from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from services.runtime.consumer import EventConsumer
from services.runtime.events import cloudevent_headers
from services.runtime.service import Service
from tests.helpers import error_reason, field_violations, running_service, wait_for
from tidings.orders.v1 import order_events_pb2, order_pb2
from tidings.payments.v1 import (
    payment_events_pb2,
    payment_pb2,
    payment_service_pb2,
    payment_service_pb2_grpc,
)

PaymentStub = payment_service_pb2_grpc.PaymentServiceStub
State = payment_pb2.PaymentState

SUBJECT_REQUESTED = "tidings.orders.payment.requested"
SUBJECT_REJECTED = "tidings.orders.order.rejected"
SUBJECT_CANCELLED = "tidings.orders.order.cancelled"

EVENT_TYPES: dict[str, type[Message]] = {
    "tidings.payments.payment.captured": payment_events_pb2.PaymentCaptured,
    "tidings.payments.payment.declined": payment_events_pb2.PaymentDeclined,
    "tidings.payments.payment.refunded": payment_events_pb2.PaymentRefunded,
}


@pytest.fixture
def payments_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"payments_port": free_port()})


@pytest.fixture
async def payments_service(payments_settings: Settings) -> AsyncIterator[Service]:
    async with running_service(PAYMENTS, payments_settings) as service:
        yield service


@pytest.fixture
async def payments(
    payments_service: Service, payments_settings: Settings
) -> AsyncIterator[PaymentStub]:
    async with grpc.aio.insecure_channel(payments_settings.address_of("payments")) as channel:
        yield PaymentStub(channel)


@pytest.fixture
async def payment_events(
    payments_service: Service, nats_client: NATS
) -> JetStreamContext.PushSubscription:
    """An ordered subscription to every event the payments service publishes."""
    return await nats_client.jetstream().subscribe("tidings.payments.>", ordered_consumer=True)


def new_id() -> str:
    return str(uuid.uuid4())


async def top_up(stub: PaymentStub, user_id: str, amount: int, request_id: str = "") -> payment_pb2.Wallet:
    request = payment_service_pb2.TopUpRequest(
        user_id=user_id, amount_cents=amount, request_id=request_id
    )
    return (await stub.TopUp(request)).wallet


async def get_wallet(stub: PaymentStub, user_id: str) -> payment_pb2.Wallet:
    return (await stub.GetWallet(payment_service_pb2.GetWalletRequest(user_id=user_id))).wallet


async def get_payment(stub: PaymentStub, order_id: str) -> payment_pb2.Payment:
    return (await stub.GetPayment(payment_service_pb2.GetPaymentRequest(order_id=order_id))).payment


async def publish_order_event(
    nats_client: NATS,
    subject: str,
    message: Message,
    order_id: str,
    *,
    event_id: str | None = None,
    msg_id: str | None = None,
) -> None:
    """Publish an order event the way the orders service's relay does."""
    headers = cloudevent_headers(
        event_id=event_id or new_id(),
        source="/tests",
        event_type=message.DESCRIPTOR.full_name,
        time=datetime.now(UTC),
        subject=order_id,
    )
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    await nats_client.jetstream().publish(subject, message.SerializeToString(), headers=headers)


async def request_payment(
    nats_client: NATS,
    order_id: str,
    user_id: str,
    amount: int,
    *,
    event_id: str | None = None,
    msg_id: str | None = None,
) -> None:
    message = order_events_pb2.PaymentRequested(order_id=order_id, user_id=user_id, amount_cents=amount)
    await publish_order_event(
        nats_client, SUBJECT_REQUESTED, message, order_id, event_id=event_id, msg_id=msg_id
    )


async def close_order(nats_client: NATS, subject: str, order_id: str, user_id: str) -> None:
    """Publish OrderRejected or OrderCancelled, chosen by subject."""
    if subject == SUBJECT_REJECTED:
        order = order_pb2.Order(
            id=order_id,
            user_id=user_id,
            state=order_pb2.ORDER_STATE_REJECTED,
            rejection_reason=order_pb2.REJECTION_REASON_OUT_OF_STOCK,
        )
        message: Message = order_events_pb2.OrderRejected(order=order)
    else:
        order = order_pb2.Order(id=order_id, user_id=user_id, state=order_pb2.ORDER_STATE_CANCELLED)
        message = order_events_pb2.OrderCancelled(order=order)
    await publish_order_event(nats_client, subject, message, order_id)


async def next_event(subscription: JetStreamContext.PushSubscription) -> tuple[Msg, Message]:
    """Return the next payment event and its decoded body."""
    received = await subscription.next_msg(timeout=10)
    return received, EVENT_TYPES[received.subject].FromString(received.data)


async def count_rows(service: Service, table: Table) -> int:
    async with service.runtime.database.transaction() as tx:
        return int((await tx.execute(select(func.count()).select_from(table))).scalar_one())


async def outbox_rows(service: Service) -> int:
    return await count_rows(service, service.runtime.outbox.table)


async def money_totals(service: Service) -> tuple[int, int]:
    """Return the sum of top-ups and the sum of balances plus captured payments, which must match."""
    wallets, payments = store.wallets, store.payments
    async with service.runtime.database.transaction() as tx:
        topped_up = (await tx.execute(select(func.coalesce(func.sum(wallets.c.topped_up_cents), 0))))
        balances = (await tx.execute(select(func.coalesce(func.sum(wallets.c.balance_cents), 0))))
        captured = await tx.execute(
            select(func.coalesce(func.sum(payments.c.amount_cents), 0)).where(
                payments.c.state == State.PAYMENT_STATE_CAPTURED
            )
        )
        return int(topped_up.scalar_one()), int(balances.scalar_one()) + int(captured.scalar_one())


def consumer_of(service: Service) -> EventConsumer:
    return service.consumers[0]


async def settled(consumer: EventConsumer, total: int) -> bool:
    """Return whether the consumer has applied or dropped total events."""
    return consumer.applied + consumer.duplicates >= total


# TopUp, GetWallet and GetPayment


async def test_top_up_creates_wallet(payments: PaymentStub) -> None:
    user_id = new_id()

    wallet = await top_up(payments, user_id, 1500)

    assert wallet.user_id == user_id
    assert wallet.balance_cents == 1500
    assert wallet.topped_up_cents == 1500
    assert wallet.create_time == wallet.update_time


async def test_top_ups_add_up(payments: PaymentStub) -> None:
    user_id = new_id()
    await top_up(payments, user_id, 1500)

    wallet = await top_up(payments, user_id, 250)

    assert wallet.balance_cents == 1750
    assert wallet.topped_up_cents == 1750


async def test_get_wallet_returns_balance(payments: PaymentStub) -> None:
    user_id = new_id()
    topped_up = await top_up(payments, user_id, 900)

    wallet = await get_wallet(payments, user_id)

    assert wallet == topped_up


async def test_top_up_uppercase_id_canonicalized(payments: PaymentStub) -> None:
    user_id = new_id()
    await top_up(payments, user_id.upper(), 900)

    wallet = await get_wallet(payments, user_id)

    assert wallet.balance_cents == 900


@pytest.mark.parametrize(
    ("user_id", "amount", "request_id", "field"),
    [
        ("", 100, "", "user_id"),
        ("42", 100, "", "user_id"),
        ("00000000-0000-4000-8000-000000000001", 0, "", "amount_cents"),
        ("00000000-0000-4000-8000-000000000001", -100, "", "amount_cents"),
        ("00000000-0000-4000-8000-000000000001", 100_000_001, "", "amount_cents"),
        ("00000000-0000-4000-8000-000000000001", 100, "r" * 129, "request_id"),
        ("00000000-0000-4000-8000-000000000001", 100, "has space", "request_id"),
    ],
)
async def test_top_up_bad_input_rejected(
    payments: PaymentStub, payments_service: Service,
    user_id: str, amount: int, request_id: str, field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await top_up(payments, user_id, amount, request_id)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert await count_rows(payments_service, store.wallets) == 0
    assert await count_rows(payments_service, payments_service.runtime.request_log.table) == 0


async def test_top_up_reports_every_bad_field(payments: PaymentStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await top_up(payments, "nope", 0)

    assert set(field_violations(raised.value)) == {"user_id", "amount_cents"}


async def test_top_up_limits_accepted(payments: PaymentStub) -> None:
    user_id = new_id()
    await top_up(payments, user_id, 1)

    wallet = await top_up(payments, user_id, 100_000_000)

    assert wallet.balance_cents == 100_000_001


async def test_top_up_retry_adds_once(payments: PaymentStub, payments_service: Service) -> None:
    user_id = new_id()
    first = await top_up(payments, user_id, 500, request_id="top-up-1")

    second = await top_up(payments, user_id, 500, request_id="top-up-1")

    assert second == first
    assert (await get_wallet(payments, user_id)).balance_cents == 500
    assert await count_rows(payments_service, payments_service.runtime.request_log.table) == 1


async def test_top_up_reused_request_id_rejected(payments: PaymentStub) -> None:
    user_id = new_id()
    await top_up(payments, user_id, 500, request_id="same-key")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await top_up(payments, user_id, 700, request_id="same-key")

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(raised.value) == "REQUEST_ID_REUSED"
    assert (await get_wallet(payments, user_id)).balance_cents == 500


async def test_get_wallet_never_topped_up_not_found(payments: PaymentStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_wallet(payments, new_id())

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(raised.value) == "WALLET_NOT_FOUND"


async def test_get_wallet_malformed_id_invalid(payments: PaymentStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_wallet(payments, "42")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in field_violations(raised.value)


async def test_get_payment_unknown_order_not_found(payments: PaymentStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_payment(payments, new_id())

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(raised.value) == "PAYMENT_NOT_FOUND"


async def test_get_payment_missing_id_invalid(payments: PaymentStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_payment(payments, "")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order_id" in field_violations(raised.value)


# PaymentRequested


async def test_payment_request_captures_amount(
    payments: PaymentStub, nats_client: NATS, payment_events: JetStreamContext.PushSubscription
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)

    await request_payment(nats_client, order_id, user_id, 300)
    received, event = await next_event(payment_events)

    headers = received.headers or {}
    assert received.subject == "tidings.payments.payment.captured"
    assert headers["ce-type"] == "tidings.payments.v1.PaymentCaptured"
    assert headers["ce-subject"] == order_id
    assert isinstance(event, payment_events_pb2.PaymentCaptured)
    assert event.payment.order_id == order_id
    assert event.payment.user_id == user_id
    assert event.payment.amount_cents == 300
    assert event.payment.state == State.PAYMENT_STATE_CAPTURED
    assert await get_payment(payments, order_id) == event.payment
    assert (await get_wallet(payments, user_id)).balance_cents == 700


async def test_payment_request_low_balance_declined(
    payments: PaymentStub, nats_client: NATS, payment_events: JetStreamContext.PushSubscription
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 100)

    await request_payment(nats_client, order_id, user_id, 300)
    received, event = await next_event(payment_events)

    assert received.subject == "tidings.payments.payment.declined"
    assert isinstance(event, payment_events_pb2.PaymentDeclined)
    assert event.balance_cents == 100
    assert event.payment.state == State.PAYMENT_STATE_DECLINED
    assert (await get_payment(payments, order_id)).state == State.PAYMENT_STATE_DECLINED
    assert (await get_wallet(payments, user_id)).balance_cents == 100


async def test_payment_request_without_wallet_declined(
    payments: PaymentStub,
    payments_service: Service,
    nats_client: NATS,
    payment_events: JetStreamContext.PushSubscription,
) -> None:
    user_id, order_id = new_id(), new_id()

    await request_payment(nats_client, order_id, user_id, 300)
    received, event = await next_event(payment_events)

    assert received.subject == "tidings.payments.payment.declined"
    assert isinstance(event, payment_events_pb2.PaymentDeclined)
    assert event.balance_cents == 0
    assert event.payment.amount_cents == 300
    assert await count_rows(payments_service, store.wallets) == 0


async def test_payment_request_exact_balance_captured(
    payments: PaymentStub, nats_client: NATS, payment_events: JetStreamContext.PushSubscription
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 300)

    await request_payment(nats_client, order_id, user_id, 300)
    received, _ = await next_event(payment_events)

    assert received.subject == "tidings.payments.payment.captured"
    assert (await get_wallet(payments, user_id)).balance_cents == 0


async def test_redelivered_payment_request_charged_once(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    user_id, order_id, event_id = new_id(), new_id(), new_id()
    await top_up(payments, user_id, 1000)
    # A second copy under another Nats-Msg-Id passes JetStream's duplicate
    # check, as a redelivery or a republish after the window would.
    await request_payment(nats_client, order_id, user_id, 300, event_id=event_id)
    await request_payment(nats_client, order_id, user_id, 300, event_id=event_id, msg_id=new_id())
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 2))

    assert consumer.duplicates == 1
    assert (await get_wallet(payments, user_id)).balance_cents == 700
    assert await outbox_rows(payments_service) == 1


async def test_second_payment_request_charged_once(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)
    await request_payment(nats_client, order_id, user_id, 300)
    await request_payment(nats_client, order_id, user_id, 300)
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 2))

    assert consumer.applied == 2
    assert (await get_wallet(payments, user_id)).balance_cents == 700
    assert await outbox_rows(payments_service) == 1


async def test_payment_request_after_cancellation_ignored(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)
    await close_order(nats_client, SUBJECT_CANCELLED, order_id, user_id)
    await request_payment(nats_client, order_id, user_id, 300)
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 2))

    assert consumer.applied == 2
    assert (await get_wallet(payments, user_id)).balance_cents == 1000
    assert await count_rows(payments_service, store.payments) == 0
    assert await outbox_rows(payments_service) == 0


async def test_payment_request_zero_amount_declined(
    payments: PaymentStub, nats_client: NATS, payment_events: JetStreamContext.PushSubscription
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)

    await request_payment(nats_client, order_id, user_id, 0)
    received, _ = await next_event(payment_events)

    assert received.subject == "tidings.payments.payment.declined"
    assert (await get_wallet(payments, user_id)).balance_cents == 1000


# OrderRejected and OrderCancelled


@pytest.mark.parametrize("subject", [SUBJECT_REJECTED, SUBJECT_CANCELLED])
async def test_closed_order_refunds_capture(
    payments: PaymentStub,
    payments_service: Service,
    nats_client: NATS,
    payment_events: JetStreamContext.PushSubscription,
    subject: str,
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)
    await request_payment(nats_client, order_id, user_id, 300)
    captured, _ = await next_event(payment_events)

    await close_order(nats_client, subject, order_id, user_id)
    received, event = await next_event(payment_events)

    assert captured.subject == "tidings.payments.payment.captured"
    assert received.subject == "tidings.payments.payment.refunded"
    assert (received.headers or {})["ce-subject"] == order_id
    assert isinstance(event, payment_events_pb2.PaymentRefunded)
    assert event.payment.state == State.PAYMENT_STATE_REFUNDED
    assert event.payment.amount_cents == 300
    assert (await get_payment(payments, order_id)).state == State.PAYMENT_STATE_REFUNDED
    wallet = await get_wallet(payments, user_id)
    assert wallet.balance_cents == 1000
    assert wallet.topped_up_cents == 1000
    topped_up, balances_and_captured = await money_totals(payments_service)
    assert topped_up == balances_and_captured


async def test_repeated_cancellation_refunds_once(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 1000)
    await request_payment(nats_client, order_id, user_id, 300)
    await close_order(nats_client, SUBJECT_CANCELLED, order_id, user_id)
    await close_order(nats_client, SUBJECT_CANCELLED, order_id, user_id)
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 3))

    assert (await get_wallet(payments, user_id)).balance_cents == 1000
    assert await outbox_rows(payments_service) == 2


async def test_rejection_after_decline_refunds_nothing(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    user_id, order_id = new_id(), new_id()
    await top_up(payments, user_id, 100)
    await request_payment(nats_client, order_id, user_id, 300)
    await close_order(nats_client, SUBJECT_REJECTED, order_id, user_id)
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 2))

    assert (await get_payment(payments, order_id)).state == State.PAYMENT_STATE_DECLINED
    assert (await get_wallet(payments, user_id)).balance_cents == 100
    assert await outbox_rows(payments_service) == 1


async def test_rejection_before_payment_closes_order(
    payments: PaymentStub, payments_service: Service, nats_client: NATS
) -> None:
    order_id = new_id()
    await close_order(nats_client, SUBJECT_REJECTED, order_id, new_id())
    consumer = consumer_of(payments_service)

    await wait_for(lambda: settled(consumer, 1))

    assert await count_rows(payments_service, store.closed_orders) == 1
    assert await outbox_rows(payments_service) == 0


# Many orders against one wallet


async def test_concurrent_payment_requests_never_overdraw(
    payments: PaymentStub,
    payments_service: Service,
    nats_client: NATS,
    payment_events: JetStreamContext.PushSubscription,
) -> None:
    user_id = new_id()
    await top_up(payments, user_id, 1000)
    order_ids = [new_id() for _ in range(30)]

    await asyncio.gather(
        *(request_payment(nats_client, order_id, user_id, 100) for order_id in order_ids)
    )
    events = [await next_event(payment_events) for _ in order_ids]

    subjects = [received.subject for received, _ in events]
    assert subjects.count("tidings.payments.payment.captured") == 10
    assert subjects.count("tidings.payments.payment.declined") == 20
    declined_balances = [
        event.balance_cents for _, event in events
        if isinstance(event, payment_events_pb2.PaymentDeclined)
    ]
    assert min(declined_balances) >= 0
    paid_orders = {
        event.payment.order_id for _, event in events
        if isinstance(event, payment_events_pb2.PaymentCaptured | payment_events_pb2.PaymentDeclined)
    }
    assert paid_orders == set(order_ids)
    assert (await get_wallet(payments, user_id)).balance_cents == 0
    topped_up, balances_and_captured = await money_totals(payments_service)
    assert topped_up == 1000
    assert balances_and_captured == 1000
