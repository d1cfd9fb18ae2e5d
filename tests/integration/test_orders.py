"""OrderService and its saga state machine, with inventory and payments played by the test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.message import Message
from nats.aio.client import Client as NATS

from services.orders.main import SPEC as ORDERS
from services.runtime.cli.embedded_nats import free_port
from services.runtime.clients import traced_channel
from services.runtime.config import Settings
from services.runtime.events import cloudevent_headers
from services.runtime.service import Service
from tests.helpers import field_violations, running_service, wait_for
from tidings.inventory.v1 import inventory_events_pb2, product_pb2
from tidings.orders.v1 import order_events_pb2, order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_events_pb2, payment_pb2
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

OrderStub = order_service_pb2_grpc.OrderServiceStub
PRODUCT = "11111111-1111-4111-8111-111111111111"


@pytest.fixture
def order_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"orders_port": free_port(), "saga_timeout": 30.0})


@pytest.fixture
async def orders_service(order_settings: Settings, users_service: Service) -> AsyncIterator[Service]:
    async with running_service(ORDERS, order_settings) as service:
        yield service


@pytest.fixture
async def orders(orders_service: Service, order_settings: Settings) -> AsyncIterator[OrderStub]:
    async with traced_channel(order_settings.address_of("orders")) as channel:
        yield OrderStub(channel)


@pytest.fixture
async def user_id(users: user_service_pb2_grpc.UserServiceStub) -> str:
    response = await users.CreateUser(
        user_service_pb2.CreateUserRequest(user=user_pb2.User(email="ada@example.com", display_name="Ada"))
    )
    return response.user.id


def place_request(user_id: str, *lines: tuple[str, int], request_id: str = ""):
    return order_service_pb2.PlaceOrderRequest(
        user_id=user_id,
        line_items=[order_pb2.LineItem(product_id=p, quantity=q) for p, q in lines],
        request_id=request_id,
    )


async def reply(nats_client: NATS, subject: str, message: Message, order_id: str) -> None:
    """Publish a saga reply the way inventory or payments would."""
    headers = cloudevent_headers(
        event_id=str(uuid.uuid4()), source="/tests", event_type=message.DESCRIPTOR.full_name,
        time=datetime.now(UTC), subject=order_id,
    )
    await nats_client.jetstream().publish(subject, message.SerializeToString(), headers=headers)


async def stock_reserved(nats_client: NATS, order_id: str, total: int) -> None:
    reservation = product_pb2.Reservation(
        order_id=order_id, total_cents=total, state=product_pb2.RESERVATION_STATE_RESERVED
    )
    await reply(nats_client, "tidings.inventory.stock.reserved",
                inventory_events_pb2.StockReserved(reservation=reservation), order_id)


async def payment_reply(nats_client: NATS, order_id: str, captured: bool) -> None:
    payment = payment_pb2.Payment(order_id=order_id, amount_cents=500)
    if captured:
        await reply(nats_client, "tidings.payments.payment.captured",
                    payment_events_pb2.PaymentCaptured(payment=payment), order_id)
    else:
        await reply(nats_client, "tidings.payments.payment.declined",
                    payment_events_pb2.PaymentDeclined(payment=payment, balance_cents=20), order_id)


async def state_of(orders: OrderStub, order_id: str, state: int) -> order_pb2.Order | None:
    order = (await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))).order
    return order if order.state == state else None


async def test_place_order_starts_pending(orders: OrderStub, user_id: str, nats_client: NATS) -> None:
    subscription = await nats_client.jetstream().subscribe("tidings.orders.>", ordered_consumer=True)

    response = await orders.PlaceOrder(place_request(user_id, (PRODUCT, 2)))
    message = await subscription.next_msg(timeout=10)

    assert response.order.state == order_pb2.ORDER_STATE_PENDING
    assert message.subject == "tidings.orders.order.placed"
    assert order_events_pb2.OrderPlaced.FromString(message.data).order.id == response.order.id


async def test_saga_confirms_after_payment(orders: OrderStub, user_id: str, nats_client: NATS) -> None:
    subscription = await nats_client.jetstream().subscribe(
        "tidings.orders.payment.requested", ordered_consumer=True
    )
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 2)))).order

    await stock_reserved(nats_client, placed.id, 500)
    request = order_events_pb2.PaymentRequested.FromString((await subscription.next_msg(timeout=10)).data)
    await payment_reply(nats_client, placed.id, captured=True)
    confirmed = await wait_for(lambda: state_of(orders, placed.id, order_pb2.ORDER_STATE_CONFIRMED))

    assert request.amount_cents == 500
    assert request.user_id == user_id
    assert confirmed.total_cents == 500


async def test_saga_rejects_on_stock(orders: OrderStub, user_id: str, nats_client: NATS) -> None:
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 2)))).order

    await reply(nats_client, "tidings.inventory.stock.rejected", inventory_events_pb2.StockRejected(
        order_id=placed.id, reason=inventory_events_pb2.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK,
        detail="product has 1 unit available, 2 requested",
    ), placed.id)
    rejected = await wait_for(lambda: state_of(orders, placed.id, order_pb2.ORDER_STATE_REJECTED))

    assert rejected.rejection_reason == order_pb2.REJECTION_REASON_OUT_OF_STOCK
    assert "1 unit available" in rejected.status_detail


async def test_saga_rejects_on_declined_payment(
    orders: OrderStub, user_id: str, nats_client: NATS
) -> None:
    subscription = await nats_client.jetstream().subscribe(
        "tidings.orders.order.rejected", ordered_consumer=True
    )
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 2)))).order

    await stock_reserved(nats_client, placed.id, 500)
    await wait_for(lambda: state_of(orders, placed.id, order_pb2.ORDER_STATE_AWAITING_PAYMENT))
    await payment_reply(nats_client, placed.id, captured=False)
    event = order_events_pb2.OrderRejected.FromString((await subscription.next_msg(timeout=10)).data)

    assert event.order.rejection_reason == order_pb2.REJECTION_REASON_INSUFFICIENT_FUNDS


async def test_zero_total_confirms_without_payment(
    orders: OrderStub, user_id: str, nats_client: NATS
) -> None:
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 1)))).order

    await stock_reserved(nats_client, placed.id, 0)

    assert await wait_for(lambda: state_of(orders, placed.id, order_pb2.ORDER_STATE_CONFIRMED))


async def test_late_reply_after_timeout_ignored(
    settings: Settings, users_service: Service, user_id: str, nats_client: NATS
) -> None:
    fast = settings.model_copy(update={"orders_port": free_port(), "saga_timeout": 0.3})
    async with (
        running_service(ORDERS, fast),
        traced_channel(fast.address_of("orders")) as channel,
    ):
        stub = OrderStub(channel)
        placed = (await stub.PlaceOrder(place_request(user_id, (PRODUCT, 1)))).order

        rejected = await wait_for(lambda: state_of(stub, placed.id, order_pb2.ORDER_STATE_REJECTED))
        await stock_reserved(nats_client, placed.id, 500)
        await payment_reply(nats_client, placed.id, captured=True)
        await wait_for(lambda: _replies_consumed(nats_client, 2))
        final = (await stub.GetOrder(order_service_pb2.GetOrderRequest(id=placed.id))).order

    assert rejected.rejection_reason == order_pb2.REJECTION_REASON_TIMEOUT
    assert final.state == order_pb2.ORDER_STATE_REJECTED


async def _replies_consumed(nats_client: NATS, expected: int) -> bool:
    js = nats_client.jetstream()
    acked = 0
    for stream, durable in (("INVENTORY", "orders-inventory"), ("PAYMENTS", "orders-payments")):
        info = await js.consumer_info(stream, durable)
        acked += info.ack_floor.stream_seq if info.ack_floor else 0
    return acked >= expected


async def test_cancel_pending_order(orders: OrderStub, user_id: str, nats_client: NATS) -> None:
    subscription = await nats_client.jetstream().subscribe(
        "tidings.orders.order.cancelled", ordered_consumer=True
    )
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 1)))).order

    cancelled = await orders.CancelOrder(order_service_pb2.CancelOrderRequest(id=placed.id))
    again = await orders.CancelOrder(order_service_pb2.CancelOrderRequest(id=placed.id))
    event = await subscription.next_msg(timeout=10)

    assert cancelled.order.state == order_pb2.ORDER_STATE_CANCELLED
    assert again.order.state == order_pb2.ORDER_STATE_CANCELLED
    assert order_events_pb2.OrderCancelled.FromString(event.data).order.id == placed.id


async def test_cancel_rejected_order_fails(orders: OrderStub, user_id: str, nats_client: NATS) -> None:
    placed = (await orders.PlaceOrder(place_request(user_id, (PRODUCT, 1)))).order
    await reply(nats_client, "tidings.inventory.stock.rejected", inventory_events_pb2.StockRejected(
        order_id=placed.id, reason=inventory_events_pb2.STOCK_REJECTION_REASON_UNKNOWN_PRODUCT,
    ), placed.id)
    await wait_for(lambda: state_of(orders, placed.id, order_pb2.ORDER_STATE_REJECTED))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await orders.CancelOrder(order_service_pb2.CancelOrderRequest(id=placed.id))

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_place_order_retry_creates_one(orders: OrderStub, user_id: str) -> None:
    first = await orders.PlaceOrder(place_request(user_id, (PRODUCT, 1), request_id="order-1"))

    second = await orders.PlaceOrder(place_request(user_id, (PRODUCT, 1), request_id="order-1"))
    listed = await orders.ListOrders(order_service_pb2.ListOrdersRequest(user_id=user_id))

    assert second.order.id == first.order.id
    assert len(listed.orders) == 1


async def test_place_order_unknown_user_not_found(orders: OrderStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await orders.PlaceOrder(place_request(str(uuid.uuid4()), (PRODUCT, 1)))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_place_order_users_down_unavailable(settings: Settings) -> None:
    isolated = settings.model_copy(update={"orders_port": free_port(), "users_port": free_port()})
    async with (
        running_service(ORDERS, isolated),
        traced_channel(isolated.address_of("orders")) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await OrderStub(channel).PlaceOrder(place_request(str(uuid.uuid4()), (PRODUCT, 1)))

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        ([], "line_items"),
        ([("not-a-uuid", 1)], "line_items[0].product_id"),
        ([(PRODUCT, 0)], "line_items[0].quantity"),
        ([(PRODUCT, 1001)], "line_items[0].quantity"),
        ([(PRODUCT, 1), (PRODUCT, 2)], "line_items[1].product_id"),
        ([(str(uuid.uuid4()), 1) for _ in range(51)], "line_items"),
    ],
)
async def test_place_order_bad_input_rejected(
    orders: OrderStub, user_id: str, lines: list[tuple[str, int]], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await orders.PlaceOrder(place_request(user_id, *lines))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    listed = await orders.ListOrders(order_service_pb2.ListOrdersRequest(user_id=user_id))
    assert list(listed.orders) == []


class _RecordingUsers(user_service_pb2_grpc.UserServiceServicer):
    """A users service that records the deadline left on each GetUser call."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    async def GetUser(self, request, context):  # type: ignore[no-untyped-def]
        self.remaining.append(context.time_remaining())
        return user_service_pb2.GetUserResponse(user=user_pb2.User(id=request.id))


async def test_place_order_propagates_deadline(settings: Settings) -> None:
    recorder = _RecordingUsers()
    fake_users = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(recorder, fake_users)
    users_port = fake_users.add_insecure_port("127.0.0.1:0")
    await fake_users.start()
    isolated = settings.model_copy(
        update={"orders_port": free_port(), "users_port": users_port, "call_timeout": 30.0}
    )
    try:
        async with (
            running_service(ORDERS, isolated),
            traced_channel(isolated.address_of("orders")) as channel,
        ):
            await OrderStub(channel).PlaceOrder(
                place_request(str(uuid.uuid4()), (PRODUCT, 1)), timeout=10.0
            )
    finally:
        await fake_users.stop(None)

    assert recorder.remaining[0] is not None
    # gRPC core may round a timeout up when it encodes it (timeout_encoding.h), so
    # the 10 s deadline arrived as 10.099 s once. Without propagation it would be 30 s.
    assert recorder.remaining[0] <= 11.0
