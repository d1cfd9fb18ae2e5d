"""The services on PostgreSQL: the same code as on SQLite, chosen by TIDINGS_DATABASE_URL.

Each test gets one new PostgreSQL database per service (the `postgres_url`
fixture) and is skipped with the reason when no PostgreSQL server accepts a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import grpc
import pytest
from nats.aio.client import Client as NATS

from services.inventory.main import SPEC as INVENTORY
from services.notifications.main import SPEC as NOTIFICATIONS
from services.orders.main import SPEC as ORDERS
from services.payments.main import SPEC as PAYMENTS
from services.runtime.config import Settings
from services.users.main import SPEC as USERS
from tests.helpers import running_service, wait_for
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc, product_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

TERMINAL = (order_pb2.ORDER_STATE_CONFIRMED, order_pb2.ORDER_STATE_REJECTED)


@pytest.fixture
def pg_settings(settings: Settings, postgres_url: str) -> Settings:
    return settings.model_copy(update={"database_url": postgres_url})


@pytest.fixture
async def system(pg_settings: Settings) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    async with AsyncExitStack() as stack:
        for spec in (USERS, INVENTORY, PAYMENTS, ORDERS, NOTIFICATIONS):
            await stack.enter_async_context(running_service(spec, pg_settings))
        channels = {}
        for name in ("users", "inventory", "payments", "orders"):
            channels[name] = await stack.enter_async_context(
                grpc.aio.insecure_channel(pg_settings.address_of(name))
            )
        yield channels


async def _user(channels: dict[str, grpc.aio.Channel], email: str, cents: int) -> str:
    users = user_service_pb2_grpc.UserServiceStub(channels["users"])
    created = await users.CreateUser(
        user_service_pb2.CreateUserRequest(user=user_pb2.User(email=email, display_name="Buyer"))
    )
    payments = payment_service_pb2_grpc.PaymentServiceStub(channels["payments"])
    await payments.TopUp(payment_service_pb2.TopUpRequest(user_id=created.user.id, amount_cents=cents))
    return created.user.id


async def _product(channels: dict[str, grpc.aio.Channel], stock: int) -> str:
    inventory = inventory_service_pb2_grpc.InventoryServiceStub(channels["inventory"])
    created = await inventory.CreateProduct(inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="Lamp", price_cents=100, stock=stock)
    ))
    return created.product.id


async def _final_orders(orders: order_service_pb2_grpc.OrderServiceStub, ids: list[str]):
    found = []
    for order_id in ids:
        order = (await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))).order
        if order.state not in TERMINAL:
            return None
        found.append(order)
    return found


async def test_users_on_postgres_publish_once(pg_settings: Settings, nats_client: NATS) -> None:
    async with (
        running_service(USERS, pg_settings),
        grpc.aio.insecure_channel(pg_settings.address_of("users")) as channel,
    ):
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        request = user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email="ada@example.com", display_name="Ada"), request_id="pg-1"
        )
        first, second = await asyncio.gather(stub.CreateUser(request), stub.CreateUser(request))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateUser(user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email="ADA@example.com", display_name="Other")
            ))
        await wait_for(lambda: _stream_has(nats_client, 1))

    assert first.user.id == second.user.id
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await nats_client.jetstream().stream_info("USERS")).state.messages == 1


async def _stream_has(nats_client: NATS, count: int) -> bool:
    return (await nats_client.jetstream().stream_info("USERS")).state.messages >= count


async def test_saga_on_postgres_keeps_stock_and_money(
    system: dict[str, grpc.aio.Channel],
) -> None:
    product_id = await _product(system, stock=10)
    buyers = [await _user(system, f"buyer{index}@example.com", 500) for index in range(6)]
    orders = order_service_pb2_grpc.OrderServiceStub(system["orders"])

    placed = await asyncio.gather(*(
        orders.PlaceOrder(order_service_pb2.PlaceOrderRequest(
            user_id=buyers[index % len(buyers)],
            line_items=[order_pb2.LineItem(product_id=product_id, quantity=1)],
        ))
        for index in range(30)
    ))
    final = await wait_for(lambda: _final_orders(orders, [p.order.id for p in placed]), timeout=60)
    confirmed = [order for order in final if order.state == order_pb2.ORDER_STATE_CONFIRMED]
    inventory = inventory_service_pb2_grpc.InventoryServiceStub(system["inventory"])
    product = await wait_for(lambda: _settled_product(inventory, product_id), timeout=30)
    payments = payment_service_pb2_grpc.PaymentServiceStub(system["payments"])
    wallets = [
        (await payments.GetWallet(payment_service_pb2.GetWalletRequest(user_id=user_id))).wallet
        for user_id in buyers
    ]

    assert len(confirmed) == 10
    assert product.stock == 0
    assert sum(wallet.balance_cents for wallet in wallets) == 6 * 500 - 10 * 100
    assert all(wallet.balance_cents >= 0 for wallet in wallets)


async def _settled_product(inventory: inventory_service_pb2_grpc.InventoryServiceStub, product_id: str):
    product = (await inventory.GetProduct(inventory_service_pb2.GetProductRequest(id=product_id))).product
    return product if product.reserved == 0 else None


async def test_two_relays_keep_aggregate_order(pg_settings: Settings, nats_client: NATS) -> None:
    import nats
    from sqlalchemy import MetaData

    from services.runtime.database import Database
    from services.runtime.events import Event
    from services.runtime.outbox import Outbox, outbox_table
    from services.runtime.relay import OutboxRelay
    from services.runtime.streams import USERS, ensure_stream
    from tidings.users.v1 import user_events_pb2

    metadata = MetaData()
    outbox = Outbox(outbox_table(metadata))
    database = Database(pg_settings.database_url_for("users"), metadata)
    await database.create_schema()
    await ensure_stream(nats_client.jetstream(), USERS, replicas=1, duplicate_window=120)
    aggregates = [f"user-{index}" for index in range(4)]
    for round_number in range(60):
        async with database.transaction() as tx:
            await outbox.add(tx, [
                Event("tidings.users.user.updated",
                      user_events_pb2.UserUpdated(user=user_pb2.User(id=aggregate, revision=round_number)),
                      aggregate)
                for aggregate in aggregates
            ])
    clients = [await nats.connect(pg_settings.nats_url) for _ in range(2)]
    relays = [
        OutboxRelay(database, outbox.table, client, source="/tests", batch_size=16,
                    poll_interval=0.05, publish_timeout=5.0)
        for client in clients
    ]
    runs = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        await wait_for(lambda: _all_published(relays, 240), timeout=30)
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*runs)
        for client in clients:
            await client.close()
        await database.close()

    subscription = await nats_client.jetstream().subscribe("tidings.users.>", ordered_consumer=True)
    revisions: dict[str, list[int]] = {aggregate: [] for aggregate in aggregates}
    for _ in range(240):
        message = await subscription.next_msg(timeout=5)
        event = user_events_pb2.UserUpdated.FromString(message.data)
        revisions[event.user.id].append(event.user.revision)

    assert sum(relay.published for relay in relays) == 240
    for aggregate, seen in revisions.items():
        assert seen == list(range(60)), f"events of {aggregate} out of order: {seen}"


async def _all_published(relays, expected: int) -> bool:
    return sum(relay.published for relay in relays) >= expected


async def test_relay_skips_aggregate_held_by_other(pg_settings: Settings, nats_client: NATS) -> None:
    import nats
    from sqlalchemy import MetaData, select

    from services.runtime.database import Database
    from services.runtime.events import Event
    from services.runtime.outbox import Outbox, outbox_table
    from services.runtime.relay import OutboxRelay
    from services.runtime.streams import USERS, ensure_stream
    from tidings.users.v1 import user_events_pb2

    metadata = MetaData()
    outbox = Outbox(outbox_table(metadata))
    table = outbox.table
    database = Database(pg_settings.database_url_for("users"), metadata)
    await database.create_schema()
    await ensure_stream(nats_client.jetstream(), USERS, replicas=1, duplicate_window=120)
    async with database.transaction() as tx:
        await outbox.add(tx, [
            Event("tidings.users.user.updated",
                  user_events_pb2.UserUpdated(user=user_pb2.User(id=aggregate, revision=revision)),
                  aggregate)
            for revision in range(3) for aggregate in ("held", "free")
        ])
    client = await nats.connect(pg_settings.nats_url)
    relay = OutboxRelay(database, table, client, source="/tests", batch_size=100,
                        poll_interval=0.05, publish_timeout=5.0)
    try:
        # Another relay is publishing the oldest event of "held" right now.
        async with database.transaction() as other:
            oldest = select(table.c.seq).where(table.c.aggregate_id == "held").order_by(table.c.seq).limit(1)
            await other.execute(select(table).where(table.c.seq.in_(oldest)).with_for_update())

            published = await relay.publish_pending()

        async with database.transaction() as tx:
            sent = (await tx.execute(
                select(table.c.aggregate_id).where(table.c.sent_at.is_not(None))
            )).scalars().all()
    finally:
        await client.close()
        await database.close()

    assert published == 3
    assert sorted(sent) == ["free", "free", "free"]
