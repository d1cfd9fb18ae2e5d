"""InventoryService and its order-event consumer against a real nats-server and SQLite."""

from __future__ import annotations

import types
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import Table, func, select

from services.inventory import store
from services.inventory.main import SPEC as INVENTORY
from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from services.runtime.events import cloudevent_headers
from services.runtime.service import Service
from tests.helpers import error_reason, field_violations, running_service, wait_for
from tidings.inventory.v1 import (
    inventory_events_pb2,
    inventory_service_pb2,
    inventory_service_pb2_grpc,
    product_pb2,
)
from tidings.orders.v1 import order_events_pb2, order_pb2

InventoryStub = inventory_service_pb2_grpc.InventoryServiceStub
Reason = inventory_events_pb2.StockRejectionReason
State = product_pb2.ReservationState

EVENT_TYPES: dict[str, type[Message]] = {
    "tidings.inventory.stock.reserved": inventory_events_pb2.StockReserved,
    "tidings.inventory.stock.rejected": inventory_events_pb2.StockRejected,
    "tidings.inventory.stock.released": inventory_events_pb2.StockReleased,
}


@pytest.fixture
def inventory_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"inventory_port": free_port()})


@pytest.fixture
async def inventory_service(inventory_settings: Settings) -> AsyncIterator[Service]:
    async with running_service(INVENTORY, inventory_settings) as service:
        yield service


@pytest.fixture
async def inventory(
    inventory_service: Service, inventory_settings: Settings
) -> AsyncIterator[InventoryStub]:
    async with grpc.aio.insecure_channel(inventory_settings.address_of("inventory")) as channel:
        yield InventoryStub(channel)


@pytest.fixture
async def inventory_events(
    inventory_service: Service, nats_client: NATS
) -> JetStreamContext.PushSubscription:
    """Every event the inventory service publishes, in stream order."""
    return await nats_client.jetstream().subscribe("tidings.inventory.>", ordered_consumer=True)


# --- helpers -------------------------------------------------------------------------------------


async def create_product(
    stub: InventoryStub, name: str = "Widget", price_cents: int = 250, stock: int = 10
) -> product_pb2.Product:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name=name, price_cents=price_cents, stock=stock)
    )
    return (await stub.CreateProduct(request)).product


async def get_product(stub: InventoryStub, product_id: str) -> product_pb2.Product:
    return (await stub.GetProduct(inventory_service_pb2.GetProductRequest(id=product_id))).product


async def get_reservation(stub: InventoryStub, order_id: str) -> product_pb2.Reservation:
    request = inventory_service_pb2.GetReservationRequest(order_id=order_id)
    return (await stub.GetReservation(request)).reservation


async def count_rows(service: Service, table: Table) -> int:
    async with service.runtime.database.transaction() as tx:
        return int((await tx.execute(select(func.count()).select_from(table))).scalar_one())


def new_order(order_id: str, lines: Sequence[tuple[str, int]]) -> order_pb2.Order:
    return order_pb2.Order(
        id=order_id,
        user_id=str(uuid.uuid4()),
        line_items=[order_pb2.LineItem(product_id=p, quantity=q) for p, q in lines],
        state=order_pb2.ORDER_STATE_PENDING,
    )


async def publish_order_event(
    nats_client: NATS,
    subject: str,
    event: Message,
    order_id: str,
    *,
    event_id: str | None = None,
    msg_id: str | None = None,
) -> None:
    """Publish an order event the way the orders service's relay does."""
    headers = cloudevent_headers(
        event_id=event_id or str(uuid.uuid4()),
        source="/tests",
        event_type=event.DESCRIPTOR.full_name,
        time=datetime.now(UTC),
        subject=order_id,
    )
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    await nats_client.jetstream().publish(subject, event.SerializeToString(), headers=headers)


async def place_order(
    nats_client: NATS, order_id: str, lines: Sequence[tuple[str, int]], **kwargs: Any
) -> None:
    event = order_events_pb2.OrderPlaced(order=new_order(order_id, lines))
    await publish_order_event(nats_client, "tidings.orders.order.placed", event, order_id, **kwargs)


async def confirm_order(nats_client: NATS, order_id: str) -> None:
    event = order_events_pb2.OrderConfirmed(order=order_pb2.Order(id=order_id))
    await publish_order_event(nats_client, "tidings.orders.order.confirmed", event, order_id)


async def reject_order(nats_client: NATS, order_id: str) -> None:
    event = order_events_pb2.OrderRejected(order=order_pb2.Order(id=order_id))
    await publish_order_event(nats_client, "tidings.orders.order.rejected", event, order_id)


async def cancel_order(nats_client: NATS, order_id: str) -> None:
    event = order_events_pb2.OrderCancelled(order=order_pb2.Order(id=order_id))
    await publish_order_event(nats_client, "tidings.orders.order.cancelled", event, order_id)


async def next_event(subscription: JetStreamContext.PushSubscription) -> tuple[Msg, Any]:
    """Wait up to 10 s for the next inventory event and return the message and decoded body."""
    message = await subscription.next_msg(timeout=10)
    return message, EVENT_TYPES[message.subject].FromString(message.data)


async def reservation_state(stub: InventoryStub, order_id: str, state: int) -> bool:
    return (await get_reservation(stub, order_id)).state == state


# --- CreateProduct -------------------------------------------------------------------------------


async def test_create_product_returns_product(inventory: InventoryStub) -> None:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="  Teapot  ", price_cents=1999, stock=7, reserved=5)
    )

    product = (await inventory.CreateProduct(request)).product

    assert len(product.id) == 36
    assert product.name == "Teapot"
    assert product.price_cents == 1999
    assert product.stock == 7
    assert product.reserved == 0
    assert product.create_time == product.update_time


async def test_create_product_boundary_values_accepted(inventory: InventoryStub) -> None:
    largest = await create_product(inventory, "x" * 200, 100_000_000, 1_000_000_000)
    smallest = await create_product(inventory, "y", 0, 0)

    assert largest.price_cents == 100_000_000
    assert largest.stock == 1_000_000_000
    assert smallest.price_cents == 0
    assert smallest.stock == 0


@pytest.mark.parametrize(
    ("name", "price_cents", "stock", "request_id", "field"),
    [
        ("", 100, 1, "", "product.name"),
        ("   ", 100, 1, "", "product.name"),
        ("x" * 201, 100, 1, "", "product.name"),
        ("Tea\x00pot", 100, 1, "", "product.name"),
        ("Teapot", -1, 1, "", "product.price_cents"),
        ("Teapot", 100_000_001, 1, "", "product.price_cents"),
        ("Teapot", 100, -1, "", "product.stock"),
        ("Teapot", 100, 1_000_000_001, "", "product.stock"),
        ("Teapot", 100, 1, "r" * 129, "request_id"),
        ("Teapot", 100, 1, "has space", "request_id"),
    ],
)
async def test_create_product_bad_input_rejected(
    inventory: InventoryStub, inventory_service: Service,
    name: str, price_cents: int, stock: int, request_id: str, field: str,
) -> None:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name=name, price_cents=price_cents, stock=stock),
        request_id=request_id,
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.CreateProduct(request)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert await count_rows(inventory_service, store.products) == 0
    assert await count_rows(inventory_service, inventory_service.runtime.request_log.table) == 0


async def test_create_product_reports_every_bad_field(inventory: InventoryStub) -> None:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="", price_cents=-5, stock=-5)
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.CreateProduct(request)

    assert set(field_violations(raised.value)) == {"product.name", "product.price_cents", "product.stock"}


async def test_create_product_retry_returns_first(
    inventory: InventoryStub, inventory_service: Service
) -> None:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="Teapot", price_cents=100, stock=3), request_id="create-1"
    )
    first = await inventory.CreateProduct(request)

    second = await inventory.CreateProduct(request)

    assert second.product == first.product
    assert await count_rows(inventory_service, store.products) == 1


async def test_create_product_reused_request_id_fails(inventory: InventoryStub) -> None:
    first = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="Teapot"), request_id="same-key"
    )
    other = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="Kettle"), request_id="same-key"
    )
    await inventory.CreateProduct(first)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.CreateProduct(other)

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(raised.value) == "REQUEST_ID_REUSED"


# --- GetProduct and ListProducts -----------------------------------------------------------------


async def test_get_product_returns_created(inventory: InventoryStub) -> None:
    created = await create_product(inventory)

    fetched = await get_product(inventory, created.id)

    assert fetched == created


async def test_get_product_unknown_id_not_found(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_product(inventory, str(uuid.uuid4()))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(raised.value) == "PRODUCT_NOT_FOUND"


async def test_get_product_malformed_id_invalid(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_product(inventory, "42")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in field_violations(raised.value)


async def test_list_products_pages_through_all(inventory: InventoryStub) -> None:
    for index in range(5):
        await create_product(inventory, f"Product {index}")

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await inventory.ListProducts(
            inventory_service_pb2.ListProductsRequest(page_size=2, page_token=token)
        )
        seen.extend(product.name for product in page.products)
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert seen == [f"Product {index}" for index in range(5)]
    assert pages == 3


async def test_list_products_negative_page_size_invalid(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.ListProducts(inventory_service_pb2.ListProductsRequest(page_size=-1))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in field_violations(raised.value)


async def test_list_products_garbage_token_invalid(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.ListProducts(inventory_service_pb2.ListProductsRequest(page_token="garbage!"))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(raised.value)


# --- UpdateProduct -------------------------------------------------------------------------------


def update_request(
    product: product_pb2.Product, paths: Sequence[str], request_id: str = ""
) -> inventory_service_pb2.UpdateProductRequest:
    request = inventory_service_pb2.UpdateProductRequest(product=product, request_id=request_id)
    request.update_mask.paths.extend(paths)
    return request


async def test_update_product_changes_masked_fields(inventory: InventoryStub) -> None:
    created = await create_product(inventory, "Teapot", 100, 5)
    changes = product_pb2.Product(id=created.id, name="Big teapot", price_cents=150, stock=99)

    updated = (await inventory.UpdateProduct(update_request(changes, ["name", "price_cents"]))).product

    assert updated.name == "Big teapot"
    assert updated.price_cents == 150
    assert updated.stock == 5
    assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()
    assert await get_product(inventory, created.id) == updated


async def test_update_product_sets_stock(inventory: InventoryStub) -> None:
    created = await create_product(inventory, stock=5)

    updated = (
        await inventory.UpdateProduct(
            update_request(product_pb2.Product(id=created.id, stock=0), ["stock"])
        )
    ).product

    assert updated.stock == 0


async def test_update_product_retry_returns_first(inventory: InventoryStub) -> None:
    created = await create_product(inventory, stock=5)
    request = update_request(product_pb2.Product(id=created.id, stock=8), ["stock"], "update-1")
    first = await inventory.UpdateProduct(request)
    await inventory.UpdateProduct(
        update_request(product_pb2.Product(id=created.id, stock=2), ["stock"])
    )

    second = await inventory.UpdateProduct(request)

    assert second == first
    assert (await get_product(inventory, created.id)).stock == 2


@pytest.mark.parametrize(
    ("paths", "changes", "field"),
    [
        ([], {}, "update_mask"),
        (["reserved"], {"reserved": 1}, "update_mask"),
        (["name"], {"name": ""}, "product.name"),
        (["name"], {"name": "x" * 201}, "product.name"),
        (["price_cents"], {"price_cents": -1}, "product.price_cents"),
        (["price_cents"], {"price_cents": 100_000_001}, "product.price_cents"),
        (["stock"], {"stock": -1}, "product.stock"),
        (["stock"], {"stock": 1_000_000_001}, "product.stock"),
        (["stock"], {"stock": 1, "id": "42"}, "product.id"),
        (["stock"], {"stock": 1, "id": ""}, "product.id"),
    ],
)
async def test_update_product_bad_input_rejected(
    inventory: InventoryStub, paths: list[str], changes: dict[str, Any], field: str
) -> None:
    created = await create_product(inventory, "Teapot", 100, 5)
    product = product_pb2.Product(id=created.id)
    for name, value in changes.items():
        setattr(product, name, value)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.UpdateProduct(update_request(product, paths))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert await get_product(inventory, created.id) == created


async def test_update_product_unknown_id_not_found(inventory: InventoryStub) -> None:
    request = update_request(product_pb2.Product(id=str(uuid.uuid4()), stock=1), ["stock"])

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.UpdateProduct(request)

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_update_stock_below_reserved_fails(inventory: InventoryStub, nats_client: NATS) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    await place_order(nats_client, order_id, [(product.id, 4)])
    await wait_for(lambda: _reserved_is(inventory, product.id, 4))
    request = update_request(
        product_pb2.Product(id=product.id, name="Renamed", stock=3), ["name", "stock"]
    )

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await inventory.UpdateProduct(request)

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(raised.value) == "STOCK_BELOW_RESERVED"
    unchanged = await get_product(inventory, product.id)
    assert unchanged.stock == 10
    assert unchanged.name == product.name


async def test_update_stock_to_reserved_allowed(inventory: InventoryStub, nats_client: NATS) -> None:
    product = await create_product(inventory, stock=10)
    await place_order(nats_client, str(uuid.uuid4()), [(product.id, 4)])
    await wait_for(lambda: _reserved_is(inventory, product.id, 4))

    updated = (
        await inventory.UpdateProduct(
            update_request(product_pb2.Product(id=product.id, stock=4), ["stock"])
        )
    ).product

    assert updated.stock == 4
    assert updated.reserved == 4


async def _reserved_is(stub: InventoryStub, product_id: str, reserved: int) -> bool:
    return (await get_product(stub, product_id)).reserved == reserved


# --- GetReservation ------------------------------------------------------------------------------


async def test_get_reservation_unknown_order_not_found(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_reservation(inventory, str(uuid.uuid4()))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(raised.value) == "RESERVATION_NOT_FOUND"


async def test_get_reservation_malformed_id_invalid(inventory: InventoryStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_reservation(inventory, "order-1")

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order_id" in field_violations(raised.value)


# --- OrderPlaced ---------------------------------------------------------------------------------


async def test_order_placed_reserves_all_lines(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    teapot = await create_product(inventory, "Teapot", 1500, 5)
    cup = await create_product(inventory, "Cup", 300, 20)
    order_id = str(uuid.uuid4())

    await place_order(nats_client, order_id, [(teapot.id, 1), (cup.id, 6)])
    message, event = await next_event(inventory_events)

    headers = message.headers or {}
    assert message.subject == "tidings.inventory.stock.reserved"
    assert headers["ce-type"] == "tidings.inventory.v1.StockReserved"
    assert headers["ce-subject"] == order_id
    assert event.reservation.order_id == order_id
    assert event.reservation.state == State.RESERVATION_STATE_RESERVED
    assert event.reservation.total_cents == 1 * 1500 + 6 * 300
    assert {(line.product_id, line.quantity, line.unit_price_cents) for line in event.reservation.lines} == {
        (teapot.id, 1, 1500),
        (cup.id, 6, 300),
    }
    assert (await get_product(inventory, teapot.id)).reserved == 1
    assert (await get_product(inventory, cup.id)).reserved == 6
    assert await get_reservation(inventory, order_id) == event.reservation


async def test_insufficient_stock_reserves_nothing(
    inventory: InventoryStub,
    inventory_service: Service,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
) -> None:
    plenty = await create_product(inventory, "Plenty", 100, 50)
    scarce = await create_product(inventory, "Scarce", 100, 1)
    order_id = str(uuid.uuid4())

    await place_order(nats_client, order_id, [(plenty.id, 2), (scarce.id, 3)])
    message, event = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.rejected"
    assert event.order_id == order_id
    assert event.reason == Reason.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK
    assert event.detail == f"product {scarce.id}: requested 3, available 1"
    assert (await get_product(inventory, plenty.id)).reserved == 0
    assert (await get_product(inventory, scarce.id)).reserved == 0
    assert await count_rows(inventory_service, store.reservations) == 0


async def test_repeated_product_lines_added_up(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    product = await create_product(inventory, stock=5)

    await place_order(nats_client, str(uuid.uuid4()), [(product.id, 3), (product.id, 3)])
    _, event = await next_event(inventory_events)

    assert event.reason == Reason.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK
    assert event.detail == f"product {product.id}: requested 6, available 5"
    assert (await get_product(inventory, product.id)).reserved == 0


async def test_unknown_product_rejected(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    known = await create_product(inventory, stock=5)
    missing_id = str(uuid.uuid4())
    order_id = str(uuid.uuid4())

    await place_order(nats_client, order_id, [(known.id, 1), (missing_id, 1)])
    message, event = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.rejected"
    assert event.reason == Reason.STOCK_REJECTION_REASON_UNKNOWN_PRODUCT
    assert missing_id in event.detail
    assert (await get_product(inventory, known.id)).reserved == 0


async def test_stale_check_undoes_partial_reservation(
    inventory: InventoryStub,
    inventory_service: Service,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = sorted(
        [await create_product(inventory, "A", 100, 5), await create_product(inventory, "B", 100, 5)],
        key=lambda product: product.id,
    )
    # Lines are reserved in product id order. The second product has one
    # unit, but the availability check reads 100, as if another consumer took
    # the units right after the check. So the first line gets reserved and
    # must be undone when the second line fails.
    await inventory.UpdateProduct(update_request(product_pb2.Product(id=second.id, stock=1), ["stock"]))
    real_lookup = store.products_by_id

    async def stale_lookup(tx: Any, product_ids: Any) -> dict[str, Any]:
        rows = await real_lookup(tx, product_ids)
        return {
            product_id: types.SimpleNamespace(**{**row._mapping, "stock": 100})
            if product_id == second.id else row
            for product_id, row in rows.items()
        }

    monkeypatch.setattr(store, "products_by_id", stale_lookup)
    order_id = str(uuid.uuid4())

    await place_order(nats_client, order_id, [(first.id, 2), (second.id, 2)])
    _, event = await next_event(inventory_events)

    assert event.reason == Reason.STOCK_REJECTION_REASON_INSUFFICIENT_STOCK
    assert event.detail == f"product {second.id}: requested 2, available 1"
    assert (await get_product(inventory, first.id)).reserved == 0
    assert (await get_product(inventory, second.id)).reserved == 0
    assert await count_rows(inventory_service, store.reservations) == 0


async def test_order_without_lines_ignored(
    inventory: InventoryStub, inventory_service: Service, nats_client: NATS
) -> None:
    product = await create_product(inventory, stock=5)
    consumer = inventory_service.consumers[0]

    await place_order(nats_client, str(uuid.uuid4()), [])
    await place_order(nats_client, str(uuid.uuid4()), [(product.id, 0)])
    await wait_for(lambda: _settled(consumer, 2))

    assert await count_rows(inventory_service, inventory_service.runtime.outbox.table) == 0
    assert (await get_product(inventory, product.id)).reserved == 0


async def _settled(consumer: Any, total: int) -> bool:
    return consumer.applied + consumer.duplicates >= total


# --- OrderConfirmed, OrderRejected, OrderCancelled -----------------------------------------------


async def test_order_confirmed_commits_stock(
    inventory: InventoryStub,
    inventory_service: Service,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    await place_order(nats_client, order_id, [(product.id, 3)])
    await next_event(inventory_events)

    await confirm_order(nats_client, order_id)
    await wait_for(lambda: reservation_state(inventory, order_id, State.RESERVATION_STATE_COMMITTED))

    committed = await get_product(inventory, product.id)
    assert committed.stock == 7
    assert committed.reserved == 0
    assert await count_rows(inventory_service, inventory_service.runtime.outbox.table) == 1


async def test_order_rejected_releases_stock(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    await place_order(nats_client, order_id, [(product.id, 3)])
    await next_event(inventory_events)

    await reject_order(nats_client, order_id)
    message, event = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.released"
    assert (message.headers or {})["ce-subject"] == order_id
    assert event.reservation.state == State.RESERVATION_STATE_RELEASED
    assert [(line.product_id, line.quantity) for line in event.reservation.lines] == [(product.id, 3)]
    released = await get_product(inventory, product.id)
    assert released.stock == 10
    assert released.reserved == 0
    assert (await get_reservation(inventory, order_id)).state == State.RESERVATION_STATE_RELEASED


async def test_order_cancelled_releases_stock(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    await place_order(nats_client, order_id, [(product.id, 3)])
    await next_event(inventory_events)

    await cancel_order(nats_client, order_id)
    message, _ = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.released"
    assert (await get_product(inventory, product.id)).reserved == 0


async def test_cancel_after_confirm_restocks(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    await place_order(nats_client, order_id, [(product.id, 3)])
    await next_event(inventory_events)
    await confirm_order(nats_client, order_id)
    await wait_for(lambda: reservation_state(inventory, order_id, State.RESERVATION_STATE_COMMITTED))
    assert (await get_product(inventory, product.id)).stock == 7

    await cancel_order(nats_client, order_id)
    message, event = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.released"
    assert event.reservation.state == State.RESERVATION_STATE_RELEASED
    restocked = await get_product(inventory, product.id)
    assert restocked.stock == 10
    assert restocked.reserved == 0


async def test_reject_after_cancel_releases_nothing(
    inventory: InventoryStub,
    inventory_service: Service,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    consumer = inventory_service.consumers[0]
    await place_order(nats_client, order_id, [(product.id, 3)])
    await next_event(inventory_events)
    await cancel_order(nats_client, order_id)
    await next_event(inventory_events)

    await reject_order(nats_client, order_id)
    await wait_for(lambda: _settled(consumer, 3))

    released = await get_product(inventory, product.id)
    assert released.stock == 10
    assert released.reserved == 0
    assert await count_rows(inventory_service, inventory_service.runtime.outbox.table) == 2


async def test_placed_after_rejected_is_closed(
    inventory: InventoryStub,
    inventory_service: Service,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    consumer = inventory_service.consumers[0]
    await reject_order(nats_client, order_id)
    await wait_for(lambda: _settled(consumer, 1))

    await place_order(nats_client, order_id, [(product.id, 3)])
    message, event = await next_event(inventory_events)

    assert message.subject == "tidings.inventory.stock.rejected"
    assert event.reason == Reason.STOCK_REJECTION_REASON_ORDER_CLOSED
    assert (await get_product(inventory, product.id)).reserved == 0
    assert await count_rows(inventory_service, store.reservations) == 0


# --- delivery --------------------------------------------------------------------------------------


async def test_redelivered_order_placed_reserves_once(
    inventory: InventoryStub, inventory_service: Service, nats_client: NATS
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    event_id = str(uuid.uuid4())
    consumer = inventory_service.consumers[0]
    # A second copy under another Nats-Msg-Id passes JetStream's duplicate
    # check, as a republish after the duplicate window would.
    await place_order(nats_client, order_id, [(product.id, 2)], event_id=event_id)
    await place_order(nats_client, order_id, [(product.id, 2)], event_id=event_id, msg_id=str(uuid.uuid4()))

    await wait_for(lambda: _settled(consumer, 2))

    assert consumer.duplicates == 1
    assert (await get_product(inventory, product.id)).reserved == 2
    assert await count_rows(inventory_service, inventory_service.runtime.outbox.table) == 1


async def test_placed_again_under_new_id_ignored(
    inventory: InventoryStub, inventory_service: Service, nats_client: NATS
) -> None:
    product = await create_product(inventory, stock=10)
    order_id = str(uuid.uuid4())
    consumer = inventory_service.consumers[0]

    await place_order(nats_client, order_id, [(product.id, 2)])
    await place_order(nats_client, order_id, [(product.id, 2)])
    await wait_for(lambda: _settled(consumer, 2))

    assert consumer.applied == 2
    assert (await get_product(inventory, product.id)).reserved == 2
    assert await count_rows(inventory_service, inventory_service.runtime.outbox.table) == 1


async def collect_outcomes(
    stub: InventoryStub,
    subscription: JetStreamContext.PushSubscription,
    product_id: str,
    count: int,
) -> tuple[dict[str, int], list[product_pb2.Product]]:
    """Read count inventory events and return the count per subject and the product after each one."""
    subjects: dict[str, int] = {}
    snapshots: list[product_pb2.Product] = []
    for _ in range(count):
        message, _ = await next_event(subscription)
        subjects[message.subject] = subjects.get(message.subject, 0) + 1
        snapshots.append(await get_product(stub, product_id))
    return subjects, snapshots


async def test_concurrent_orders_never_oversell(
    inventory: InventoryStub, nats_client: NATS, inventory_events: JetStreamContext.PushSubscription
) -> None:
    product = await create_product(inventory, stock=10)

    for _ in range(50):
        await place_order(nats_client, str(uuid.uuid4()), [(product.id, 1)])
    subjects, snapshots = await collect_outcomes(inventory, inventory_events, product.id, 50)

    assert subjects["tidings.inventory.stock.reserved"] == 10
    assert subjects["tidings.inventory.stock.rejected"] == 40
    assert max(snapshot.reserved for snapshot in snapshots) <= 10
    final = await get_product(inventory, product.id)
    assert final.reserved == 10
    assert final.stock == 10


async def test_two_replicas_never_oversell(
    inventory: InventoryStub,
    inventory_service: Service,
    inventory_settings: Settings,
    nats_client: NATS,
    inventory_events: JetStreamContext.PushSubscription,
) -> None:
    product = await create_product(inventory, stock=10)
    # A second replica on the same SQLite file shares the durable consumer,
    # so the two compete for the events and for the database.
    replica_settings = inventory_settings.model_copy(update={"inventory_port": free_port()})

    async with running_service(INVENTORY, replica_settings) as replica:
        for _ in range(50):
            await place_order(nats_client, str(uuid.uuid4()), [(product.id, 1)])
        subjects, snapshots = await collect_outcomes(inventory, inventory_events, product.id, 50)
        applied_by_replica = replica.consumers[0].applied

    assert subjects["tidings.inventory.stock.reserved"] == 10
    assert subjects["tidings.inventory.stock.rejected"] == 40
    assert max(snapshot.reserved for snapshot in snapshots) <= 10
    assert applied_by_replica + inventory_service.consumers[0].applied == 50
    assert (await get_product(inventory, product.id)).reserved == 10
