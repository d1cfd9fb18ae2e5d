"""The order saga under concurrent load with cancellations: stock and money invariants hold.

Runs users, inventory, payments, orders and notifications as real processes
against a real nats-server and prints the counts it checked.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.cli.supervisor import wait_until_serving
from tests.e2e.processes import (
    ChildProcess,
    clean_environment,
    service_command,
    start_process,
    stop_process,
)
from tests.helpers import wait_for
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc, product_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_pb2, payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

pytestmark = pytest.mark.e2e

SERVICES = ("users", "inventory", "payments", "orders", "notifications")
USERS = 12
PRODUCTS = 3
STOCK = 60
TOP_UP = 1_500
ORDERS = 240
CONCURRENCY = 48
CANCEL_SHARE = 0.15
RETRY_SHARE = 0.1
TERMINAL_BOUND = 90.0
TERMINAL = (order_pb2.ORDER_STATE_CONFIRMED, order_pb2.ORDER_STATE_REJECTED,
            order_pb2.ORDER_STATE_CANCELLED)


@dataclass
class System:
    """Channels to the running services."""

    users: user_service_pb2_grpc.UserServiceStub
    inventory: inventory_service_pb2_grpc.InventoryServiceStub
    payments: payment_service_pb2_grpc.PaymentServiceStub
    orders: order_service_pb2_grpc.OrderServiceStub
    children: list[ChildProcess] = field(default_factory=list)


@pytest.fixture
async def system(tmp_path: Path, nats_server: EmbeddedNats) -> AsyncIterator[System]:
    ports = {name: free_port() for name in SERVICES}
    environment = clean_environment({
        "NATS_URL": nats_server.url,
        "TIDINGS_DATA_DIR": str(tmp_path / "data"),
        "TIDINGS_LOG_LEVEL": "WARNING",
        "TIDINGS_SAGA_TIMEOUT": "60",
        "OTEL_TRACES_EXPORTER": "none",
        **{f"TIDINGS_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    })
    children = [
        start_process(name, service_command(name), environment, tmp_path / "logs") for name in SERVICES
    ]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ports[name]}") for name in SERVICES]
    try:
        for name in SERVICES:
            await wait_until_serving(f"127.0.0.1:{ports[name]}", timeout=30)
        users, inventory, payments, orders, _ = channels
        yield System(
            user_service_pb2_grpc.UserServiceStub(users),
            inventory_service_pb2_grpc.InventoryServiceStub(inventory),
            payment_service_pb2_grpc.PaymentServiceStub(payments),
            order_service_pb2_grpc.OrderServiceStub(orders),
            children,
        )
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            stop_process(child)


@dataclass
class Load:
    """What the load generator did, for the final checks and the printed report."""

    placed: dict[str, str] = field(default_factory=dict)  # request_id -> order id
    retried: Counter[str] = field(default_factory=Counter)
    cancel_calls: int = 0
    cancel_rejected: int = 0
    samples: int = 0
    violations: list[str] = field(default_factory=list)


async def _setup(system: System) -> tuple[list[str], dict[str, product_pb2.Product]]:
    user_ids = []
    for index in range(USERS):
        response = await system.users.CreateUser(user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email=f"buyer{index}@example.com", display_name=f"Buyer {index}")
        ))
        user_ids.append(response.user.id)
        await system.payments.TopUp(payment_service_pb2.TopUpRequest(
            user_id=response.user.id, amount_cents=TOP_UP, request_id=f"topup-{index}"
        ))
    products = {}
    for index in range(PRODUCTS):
        response = await system.inventory.CreateProduct(inventory_service_pb2.CreateProductRequest(
            product=product_pb2.Product(name=f"Item {index}", price_cents=100 * (index + 1), stock=STOCK)
        ))
        products[response.product.id] = response.product
    return user_ids, products


async def _place_one(
    system: System, load: Load, rng: random.Random, user_ids: list[str], product_ids: list[str],
    limit: asyncio.Semaphore,
) -> None:
    chosen = rng.sample(product_ids, rng.randint(1, 2))
    request = order_service_pb2.PlaceOrderRequest(
        user_id=rng.choice(user_ids),
        line_items=[order_pb2.LineItem(product_id=p, quantity=rng.randint(1, 3)) for p in chosen],
        request_id=str(uuid.uuid4()),
    )
    attempts = 2 if rng.random() < RETRY_SHARE else 1
    async with limit:
        responses = await asyncio.gather(*(system.orders.PlaceOrder(request, timeout=30)
                                           for _ in range(attempts)))
    order_ids = {response.order.id for response in responses}
    if len(order_ids) != 1:
        load.violations.append(f"request {request.request_id} created orders {sorted(order_ids)}")
    load.placed[request.request_id] = responses[0].order.id
    if attempts > 1:
        load.retried[request.request_id] += 1

    if rng.random() < CANCEL_SHARE:
        # Cancellations land at random points of the saga.
        await asyncio.sleep(rng.uniform(0, 0.3))
        load.cancel_calls += 1
        try:
            await system.orders.CancelOrder(
                order_service_pb2.CancelOrderRequest(id=responses[0].order.id), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            load.cancel_rejected += 1


async def _sample_stock(system: System, load: Load, product_ids: list[str], done: asyncio.Event) -> None:
    """Check 0 <= reserved <= stock for every product while the load runs."""
    while not done.is_set():
        for product_id in product_ids:
            product = (await system.inventory.GetProduct(
                inventory_service_pb2.GetProductRequest(id=product_id)
            )).product
            load.samples += 1
            if not 0 <= product.reserved <= product.stock:
                load.violations.append(
                    f"product {product_id}: reserved {product.reserved}, stock {product.stock}"
                )
        await asyncio.sleep(0.05)


async def _all_terminal(system: System, order_ids: list[str]) -> list[order_pb2.Order] | None:
    found = []
    for order_id in order_ids:
        order = (await system.orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))).order
        if order.state not in TERMINAL:
            return None
        found.append(order)
    return found


async def _reservation(system: System, order_id: str) -> product_pb2.Reservation | None:
    try:
        return (await system.inventory.GetReservation(
            inventory_service_pb2.GetReservationRequest(order_id=order_id)
        )).reservation
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _payment(system: System, order_id: str) -> payment_pb2.Payment | None:
    try:
        return (await system.payments.GetPayment(
            payment_service_pb2.GetPaymentRequest(order_id=order_id)
        )).payment
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def _disagreements(system: System, orders: list[order_pb2.Order]) -> list[str]:
    """List every terminal order whose reservation or payment does not match its state."""
    problems = []
    for order in orders:
        reservation = await _reservation(system, order.id)
        payment = await _payment(system, order.id)
        reservation_state = reservation.state if reservation else None
        payment_state = payment.state if payment else None
        if order.state == order_pb2.ORDER_STATE_CONFIRMED:
            agrees = (reservation_state == product_pb2.RESERVATION_STATE_COMMITTED
                      and payment_state == payment_pb2.PAYMENT_STATE_CAPTURED
                      and payment is not None and payment.amount_cents == order.total_cents)
        else:
            agrees = (reservation_state in (None, product_pb2.RESERVATION_STATE_RELEASED)
                      and payment_state in (None, payment_pb2.PAYMENT_STATE_DECLINED,
                                            payment_pb2.PAYMENT_STATE_REFUNDED))
        if not agrees:
            problems.append(
                f"order {order.id} {order_pb2.OrderState.Name(order.state)}: reservation "
                f"{reservation_state}, payment {payment_state}"
            )
    return problems


async def _settled(system: System, orders: list[order_pb2.Order]) -> list[str] | None:
    problems = await _disagreements(system, orders)
    return None if problems else ["settled"]


async def test_saga_invariants_under_load(system: System) -> None:
    rng = random.Random(20261204)
    user_ids, products = await _setup(system)
    product_ids = list(products)
    load = Load()
    done = asyncio.Event()
    sampler = asyncio.create_task(_sample_stock(system, load, product_ids, done))
    limit = asyncio.Semaphore(CONCURRENCY)
    loop = asyncio.get_running_loop()

    started = loop.time()
    await asyncio.gather(*(
        _place_one(system, load, rng, user_ids, product_ids, limit) for _ in range(ORDERS)
    ))
    order_ids = list(load.placed.values())
    orders = await wait_for(lambda: _all_terminal(system, order_ids), timeout=TERMINAL_BOUND, interval=0.2)
    terminal_after = loop.time() - started
    await wait_for(lambda: _settled(system, orders), timeout=30, interval=0.2)
    done.set()
    await sampler

    states = Counter(order_pb2.OrderState.Name(order.state) for order in orders)
    reasons = Counter(order_pb2.RejectionReason.Name(order.rejection_reason) for order in orders
                      if order.state == order_pb2.ORDER_STATE_REJECTED)
    confirmed_units: Counter[str] = Counter()
    captured_by_user: Counter[str] = Counter()
    for order in orders:
        if order.state == order_pb2.ORDER_STATE_CONFIRMED:
            for line in order.line_items:
                confirmed_units[line.product_id] += line.quantity
            captured_by_user[order.user_id] += order.total_cents
    final_products = {
        product_id: (await system.inventory.GetProduct(
            inventory_service_pb2.GetProductRequest(id=product_id))).product
        for product_id in product_ids
    }
    wallets = {
        user_id: (await system.payments.GetWallet(
            payment_service_pb2.GetWalletRequest(user_id=user_id))).wallet
        for user_id in user_ids
    }
    print(
        f"\nsaga invariants: {len(order_ids)} orders ({sum(load.retried.values())} retried with the "
        f"same request_id), {load.cancel_calls} cancel calls ({load.cancel_rejected} refused), "
        f"states {dict(states)}, "
        f"rejections {dict(reasons)}, all terminal after {terminal_after:.1f}s, "
        f"{load.samples} stock samples, {len(products)} products, {len(wallets)} wallets"
    )

    assert load.violations == []
    assert len(set(order_ids)) == len(order_ids)
    assert terminal_after < TERMINAL_BOUND
    for product_id, product in final_products.items():
        assert product.reserved == 0, f"product {product_id} still has {product.reserved} reserved"
        assert product.stock == STOCK - confirmed_units[product_id], f"stock of {product_id}"
    for user_id, wallet in wallets.items():
        assert wallet.balance_cents >= 0, f"wallet of {user_id} is negative"
        assert wallet.topped_up_cents == wallet.balance_cents + captured_by_user[user_id], (
            f"money of {user_id} not conserved: topped up {wallet.topped_up_cents}, balance "
            f"{wallet.balance_cents}, captured {captured_by_user[user_id]}"
        )
    assert states["ORDER_STATE_CONFIRMED"] > 0
    assert reasons["REJECTION_REASON_OUT_OF_STOCK"] + reasons["REJECTION_REASON_INSUFFICIENT_FUNDS"] > 0
