"""The PlaceOrder path: orders placed on the orders service until the saga made each CONFIRMED or REJECTED."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.phases import CALL_TIMEOUT, Load, wait_for_result
from bench.processes import Child, NatsChild, ProcessSet, cpu_seconds, free_ports
from bench.results import PhaseResult
from bench.stats import CallStats, drive_calls, summarize_ms
from bench.tidings_path import service_environment, service_problems, start_otlp_receiver
from services.inventory.handlers import SUBJECT_RESERVED
from services.orders.transitions import (
    SUBJECT_CONFIRMED,
    SUBJECT_PAYMENT_REQUESTED,
    SUBJECT_PLACED,
    SUBJECT_REJECTED,
)
from services.payments.handlers import SUBJECT_CAPTURED
from services.runtime.launch import service_arguments
from services.runtime.streams import INVENTORY, ORDERS, PAYMENTS, USERS
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc, product_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

# Started in this order. Orders calls users (GetUser) in PlaceOrder.
SERVICES = ("users", "inventory", "payments", "orders", "notifications")

# Durable consumers of the five services (their ConsumerSpecs in services/*/main.py) as
# (stream, durable). The pipeline is idle when none of them has a pending event.
DURABLES = (
    (ORDERS.name, "inventory-orders"),
    (ORDERS.name, "payments-orders"),
    (ORDERS.name, "notifications-orders"),
    (INVENTORY.name, "orders-inventory"),
    (PAYMENTS.name, "orders-payments"),
    (USERS.name, "notifications-users"),
)

# The workload. Every order has LINES_PER_ORDER lines of 1 unit at PRICE_CENTS each.
# Buyers' wallets and the stock cover far more orders than a run places, so these
# orders are CONFIRMED. Every DECLINED_EVERY-th order (index % DECLINED_EVERY ==
# DECLINED_EVERY - 1) is placed by a user whose wallet holds 1 cent: inventory
# reserves the stock, payments declines, orders rejects with INSUFFICIENT_FUNDS
# and inventory releases the reservation.
BUYERS = 64
SHORT_WALLET_USERS = 8
PRODUCTS = 16
LINES_PER_ORDER = 2
PRICE_CENTS = 250
STOCK_UNITS = 1_000_000
BUYER_TOP_UP_CENTS = 100_000_000
SHORT_WALLET_CENTS = 1
DECLINED_EVERY = 10

# ListOrders returns at most this many orders per page.
LIST_PAGE_SIZE = 1000

POLL_INTERVAL = 0.1

CONFIRMED = "CONFIRMED"
INSUFFICIENT_FUNDS = "REJECTED (INSUFFICIENT_FUNDS)"


def expects_decline(index: int) -> bool:
    """Return whether order index is placed by a user whose wallet cannot pay for it."""
    return index % DECLINED_EVERY == DECLINED_EVERY - 1


def outcome_of(order: order_pb2.Order) -> str:
    """Return an order's state name, with the rejection reason for a rejected order."""
    state = order_pb2.OrderState.Name(order.state).removeprefix("ORDER_STATE_")
    if order.state != order_pb2.ORDER_STATE_REJECTED:
        return state
    reason = order_pb2.RejectionReason.Name(order.rejection_reason).removeprefix("REJECTION_REASON_")
    return f"{state} ({reason})"


@dataclass(frozen=True)
class Workload:
    """The users and products that the PlaceOrder calls of one run use."""

    buyers: list[str]
    short_wallet_users: list[str]
    products: list[str]
    run: str

    def request(self, index: int) -> order_service_pb2.PlaceOrderRequest:
        """Return the PlaceOrder request of call index, with a request_id unique to this run."""
        if expects_decline(index):
            user_id = self.short_wallet_users[(index // DECLINED_EVERY) % len(self.short_wallet_users)]
        else:
            user_id = self.buyers[index % len(self.buyers)]
        line_items = [
            order_pb2.LineItem(product_id=self.products[(index + line) % len(self.products)], quantity=1)
            for line in range(LINES_PER_ORDER)
        ]
        return order_service_pb2.PlaceOrderRequest(
            user_id=user_id, line_items=line_items, request_id=f"bench-order-{self.run}-{index}"
        )

    @property
    def users(self) -> list[str]:
        """Every user of the workload."""
        return [*self.buyers, *self.short_wallet_users]


@dataclass(frozen=True)
class SagaStubs:
    """Clients of the services that the phase calls."""

    users: user_service_pb2_grpc.UserServiceStub
    inventory: inventory_service_pb2_grpc.InventoryServiceStub
    payments: payment_service_pb2_grpc.PaymentServiceStub
    orders: order_service_pb2_grpc.OrderServiceStub


async def measure_place_order(
    result: PhaseResult, processes: ProcessSet, load: Load, work_dir: Path, *, tracing: bool
) -> None:
    """Run the five services with their own nats-server and measure orders through the saga."""
    label = "tracing on" if tracing else "tracing off"
    tag = "on" if tracing else "off"
    nats_server = await processes.start_nats(f"nats-server (PlaceOrder, {label})")

    receiver: Child | None = None
    receiver_result = work_dir / f"otlp-saga-{tag}.json"
    otlp_port: int | None = None
    if tracing:
        receiver, otlp_port = await start_otlp_receiver(processes, receiver_result)

    ports = free_ports(len(SERVICES))
    addresses = {service: f"127.0.0.1:{port}" for service, port in zip(SERVICES, ports, strict=True)}
    data_dir = work_dir / f"data-saga-{tag}"
    environment = service_environment(
        nats_server.url, data_dir, addresses, otlp_port, nats_server.server.monitor_url
    )
    children: dict[str, Child] = {}
    for service in SERVICES:
        children[service] = await processes.start_python(
            f"{service} (PlaceOrder, {label})", service_arguments(f"services.{service}.main"), environment
        )
    await asyncio.gather(
        *(children[service].wait_until_serving(addresses[service]) for service in SERVICES)
    )

    await _drive_and_collect(result, load, addresses, nats_server, children)

    # The services flush their last spans on SIGTERM, so the receiver stops after them.
    for child in children.values():
        await processes.stop(child)
        result.notes += service_problems(child)
    if receiver is not None:
        await processes.stop(receiver)
        counts = await wait_for_result(receiver, receiver_result, timeout=5.0)
        result.spans = {str(name): int(count) for name, count in counts["spans"].items()}
        _check_span_counts(result, load)
    await processes.stop(nats_server)


async def _drive_and_collect(
    result: PhaseResult,
    load: Load,
    addresses: Mapping[str, str],
    nats_server: NatsChild,
    children: Mapping[str, Child],
) -> None:
    connection = await nats.connect(nats_server.url, name="bench-saga-progress", connect_timeout=5)
    try:
        js = connection.jetstream()
        async with (
            grpc.aio.insecure_channel(addresses["users"]) as users_channel,
            grpc.aio.insecure_channel(addresses["inventory"]) as inventory_channel,
            grpc.aio.insecure_channel(addresses["payments"]) as payments_channel,
            grpc.aio.insecure_channel(addresses["orders"]) as orders_channel,
        ):
            stubs = SagaStubs(
                users=user_service_pb2_grpc.UserServiceStub(users_channel),
                inventory=inventory_service_pb2_grpc.InventoryServiceStub(inventory_channel),
                payments=payment_service_pb2_grpc.PaymentServiceStub(payments_channel),
                orders=order_service_pb2_grpc.OrderServiceStub(orders_channel),
            )
            workload = await _prepare(stubs, load)
            order_ids = await _place_orders(result, load, stubs.orders, workload, js, children)
            orders = await _list_orders(stubs.orders, workload.users, load)
        store_times = await _store_times(js, load.timeout_for(load.warmup_calls + load.calls))
    finally:
        await connection.close()

    assert result.calls is not None
    _summarize(result, result.calls, order_ids[load.warmup_calls:], orders, store_times, load.warmup_calls)


async def _prepare(stubs: SagaStubs, load: Load) -> Workload:
    """Create the users, top up their wallets and create the products."""
    run = secrets.token_hex(4)
    user_count = BUYERS + SHORT_WALLET_USERS
    user_ids: list[str] = [""] * user_count
    product_ids: list[str] = [""] * PRODUCTS

    async def create_user(index: int) -> object:
        request = user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email=f"buyer-{run}-{index}@example.com", display_name=f"Buyer {index}"),
            request_id=f"bench-buyer-{run}-{index}",
        )
        user_ids[index] = (await stubs.users.CreateUser(request, timeout=CALL_TIMEOUT)).user.id
        amount = BUYER_TOP_UP_CENTS if index < BUYERS else SHORT_WALLET_CENTS
        top_up = payment_service_pb2.TopUpRequest(
            user_id=user_ids[index], amount_cents=amount, request_id=f"bench-top-up-{run}-{index}"
        )
        return await stubs.payments.TopUp(top_up, timeout=CALL_TIMEOUT)

    async def create_product(index: int) -> object:
        request = inventory_service_pb2.CreateProductRequest(
            product=product_pb2.Product(
                name=f"Bench product {run}-{index}", price_cents=PRICE_CENTS, stock=STOCK_UNITS
            ),
            request_id=f"bench-product-{run}-{index}",
        )
        product_ids[index] = (await stubs.inventory.CreateProduct(request, timeout=CALL_TIMEOUT)).product.id
        return product_ids[index]

    for name, call, count in (("CreateUser and TopUp", create_user, user_count),
                              ("CreateProduct", create_product, PRODUCTS)):
        stats = await drive_calls(call, count=count, concurrency=load.concurrency,
                                  timeout=load.timeout_for(count))
        if stats.errors:
            raise RuntimeError(f"{stats.errors} of {count} {name} calls of the set-up failed. "
                               f"First failure: {stats.first_error}")
    return Workload(user_ids[:BUYERS], user_ids[BUYERS:], product_ids, run)


async def _place_orders(
    result: PhaseResult,
    load: Load,
    stub: order_service_pb2_grpc.OrderServiceStub,
    workload: Workload,
    js: JetStreamContext,
    children: Mapping[str, Child],
) -> list[str | None]:
    """Place the warm-up orders, wait until the pipeline is idle, place the measured orders and wait again.

    Also records each service's CPU time per measured order, from the first
    measured call until the pipeline was idle after the last measured order.

    Returns the order id of each call by index, warm-up calls first, and None for a failed call.
    """
    cpu_at_start: dict[str, float | None] = {}
    total = load.warmup_calls + load.calls
    order_ids: list[str | None] = [None] * total

    async def place_order(index: int) -> object:
        response = await stub.PlaceOrder(workload.request(index), timeout=CALL_TIMEOUT)
        order_ids[index] = response.order.id
        return response

    async def drain_warmup() -> None:
        await _wait_until_terminal(js, load.warmup_calls, load.timeout_for(load.warmup_calls), children)
        await _wait_until_idle(js, load.timeout_for(load.warmup_calls), children)
        cpu_at_start.update({name: cpu_seconds(child.pid) for name, child in children.items()})

    result.calls = await load.run(place_order, measured_offset=load.warmup_calls, after_warmup=drain_warmup)
    placed = load.warmup_calls + result.calls.succeeded
    await _wait_until_terminal(js, placed, load.timeout_for(placed), children)
    await _wait_until_idle(js, load.timeout_for(placed), children)

    for name, child in children.items():
        before, after = cpu_at_start.get(name), cpu_seconds(child.pid)
        if before is not None and after is not None and result.calls.succeeded:
            result.cpu_ms_per_call[name] = (after - before) * 1000 / result.calls.succeeded
    return order_ids


def _raise_if_exited(children: Mapping[str, Child], waiting_for: str) -> None:
    for child in children.values():
        if child.process.returncode is not None:
            raise RuntimeError(f"{child.name} exited while the harness waited for {waiting_for}: "
                               f"{child.describe_failure()}")


async def _terminal_events(js: JetStreamContext) -> int:
    """Return the number of OrderConfirmed and OrderRejected events in the ORDERS stream."""
    info = await js.stream_info(ORDERS.name, subjects_filter="tidings.orders.order.>")
    counts = info.state.subjects or {}
    return counts.get(SUBJECT_CONFIRMED, 0) + counts.get(SUBJECT_REJECTED, 0)


async def _wait_until_terminal(
    js: JetStreamContext, orders: int, timeout: float, children: Mapping[str, Child]
) -> None:
    """Wait until the ORDERS stream contains a terminal event (confirmed or rejected) for orders orders.

    The orders service writes that event in the transaction that makes an
    order terminal, and the relay publishes it after the commit, so every one
    of these orders is then terminal in the orders database. Polling the
    stream's per-subject counts reads no order.
    """
    deadline = time.monotonic() + timeout
    terminal = 0
    while time.monotonic() < deadline:
        terminal = await _terminal_events(js)
        if terminal >= orders:
            return
        _raise_if_exited(children, "terminal orders")
        await asyncio.sleep(POLL_INTERVAL)
    raise RuntimeError(
        f"timed out after {timeout:.0f}s waiting for terminal orders: the ORDERS stream contains "
        f"terminal events for {terminal} of {orders} orders"
    )


async def _wait_until_idle(js: JetStreamContext, timeout: float, children: Mapping[str, Child]) -> None:
    """Wait until no durable consumer has a pending or unacknowledged event for two polls in a row.

    The streams' message counts must also be unchanged between the two polls,
    so that an event a relay published in between is not missed.
    """
    deadline = time.monotonic() + timeout
    previous_total: int | None = None
    busy: list[str] = []
    while time.monotonic() < deadline:
        busy = []
        for stream, durable in DURABLES:
            info = await js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                busy.append(f"{durable}: {info.num_pending} pending, {info.num_ack_pending} unacknowledged")
        total = 0
        for stream in {stream for stream, _ in DURABLES}:
            total += (await js.stream_info(stream)).state.messages
        if not busy and total == previous_total:
            return
        previous_total = None if busy else total
        _raise_if_exited(children, "an idle pipeline")
        await asyncio.sleep(POLL_INTERVAL)
    raise RuntimeError(
        f"timed out after {timeout:.0f}s waiting for idle consumers: {'; '.join(busy) or 'new events'}"
    )


async def _list_orders(
    stub: order_service_pb2_grpc.OrderServiceStub, user_ids: Sequence[str], load: Load
) -> dict[str, order_pb2.Order]:
    """Return every order of the users, by order id, read with ListOrders after the run."""
    found: dict[str, order_pb2.Order] = {}

    async def list_for_user(index: int) -> object:
        page_token = ""
        # A user has at most every order of the run, so this many pages contain them all.
        for _ in range((load.warmup_calls + load.calls) // LIST_PAGE_SIZE + 2):
            request = order_service_pb2.ListOrdersRequest(
                user_id=user_ids[index], page_size=LIST_PAGE_SIZE, page_token=page_token
            )
            response = await stub.ListOrders(request, timeout=CALL_TIMEOUT)
            found.update((order.id, order) for order in response.orders)
            page_token = response.next_page_token
            if not page_token:
                return None
        raise RuntimeError(f"ListOrders of user {user_ids[index]} returned more pages than orders placed")

    stats = await drive_calls(list_for_user, count=len(user_ids), concurrency=load.concurrency,
                              timeout=load.timeout_for(len(user_ids)))
    if stats.errors:
        raise RuntimeError(f"{stats.errors} ListOrders calls failed. First failure: {stats.first_error}")
    return found


# The success path of an order, as (stream, subject) of each event it waits for in turn.
SAGA_STEPS = (
    (ORDERS.name, SUBJECT_PLACED),
    (INVENTORY.name, SUBJECT_RESERVED),
    (ORDERS.name, SUBJECT_PAYMENT_REQUESTED),
    (PAYMENTS.name, SUBJECT_CAPTURED),
)


async def _store_times(js: JetStreamContext, timeout: float) -> dict[str, dict[str, int]]:
    """Return when JetStream stored each event of SAGA_STEPS, in ns since the epoch.

    The result maps each subject to {order id (ce-subject): time}. Every
    service writes the order id as the aggregate id of its saga events.
    """
    times: dict[str, dict[str, int]] = {}
    try:
        async with asyncio.timeout(timeout):
            for stream, subject in SAGA_STEPS:
                times[subject] = await _read_subject(js, stream, subject)
    except TimeoutError:
        raise RuntimeError(
            f"timed out after {timeout:.0f}s reading the saga events back from the streams. "
            f"Subjects read: {', '.join(times) or 'none'}"
        ) from None
    return times


async def _read_subject(js: JetStreamContext, stream: str, subject: str) -> dict[str, int]:
    info = await js.stream_info(stream, subjects_filter=subject)
    expected = (info.state.subjects or {}).get(subject, 0)
    # The harness never acknowledges, so the consumer requires no acks. Otherwise nats-server's
    # default max_ack_pending of 1000 would stop deliveries after 1000 messages.
    subscription = await js.pull_subscribe(
        subject, stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    stored_ns: dict[str, int] = {}
    read = 0
    try:
        while read < expected:
            for message in await subscription.fetch(256, timeout=5.0):
                read += 1
                order_id = (message.headers or {}).get("ce-subject", "")
                stored_ns[order_id] = int(message.metadata.timestamp.timestamp() * 1e9)
    finally:
        await subscription.unsubscribe()
    return stored_ns


def _summarize(
    result: PhaseResult,
    calls: CallStats,
    measured_order_ids: list[str | None],
    orders: Mapping[str, order_pb2.Order],
    store_times: Mapping[str, Mapping[str, int]],
    warmup_calls: int,
) -> None:
    """Compute the time to a terminal state, its stages, the outcomes and the orders per second."""
    terminal_ms: list[float] = []
    start_ms: list[float] = []
    stage_ms: list[list[float]] = [[] for _ in range(len(SAGA_STEPS) + 1)]
    outcomes: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    missing = 0
    last_terminal_ns = 0
    for index, order_id in enumerate(measured_order_ids):
        if order_id is None:
            continue
        order = orders.get(order_id)
        if order is None:
            missing += 1
            continue
        outcome = outcome_of(order)
        outcomes[outcome] += 1
        expected = INSUFFICIENT_FUNDS if expects_decline(warmup_calls + index) else CONFIRMED
        if outcome != expected:
            unexpected[f"{outcome} where {expected} was expected"] += 1
        if order.state not in (order_pb2.ORDER_STATE_CONFIRMED, order_pb2.ORDER_STATE_REJECTED):
            continue

        created_ns = order.create_time.ToNanoseconds()
        terminal_ns = order.update_time.ToNanoseconds()
        terminal_ms.append((terminal_ns - created_ns) / 1e6)
        start_ms.append((terminal_ns - calls.start_wall_ns[index]) / 1e6)
        last_terminal_ns = max(last_terminal_ns, terminal_ns)
        if order.state == order_pb2.ORDER_STATE_CONFIRMED:
            _add_stages(stage_ms, order_id, created_ns, terminal_ns, store_times)

    if missing:
        raise RuntimeError(f"ListOrders returned no order for {missing} measured PlaceOrder calls")
    result.outcomes = dict(outcomes.most_common())
    result.notes += [f"{count} measured orders ended {what}" for what, count in unexpected.items()]
    result.terminal_latency = summarize_ms(terminal_ms)
    result.start_to_terminal = summarize_ms(start_ms)
    labels = [
        "create_time → OrderPlaced stored (commit, orders relay)",
        "→ StockReserved stored (inventory consumer, reservation, relay)",
        "→ PaymentRequested stored (orders consumer, transition, relay)",
        "→ PaymentCaptured stored (payments consumer, withdrawal, relay)",
        "→ update_time, CONFIRMED (orders consumer, transition)",
    ]
    result.event_stages = [
        (label, summarize_ms(values)) for label, values in zip(labels, stage_ms, strict=True)
    ]
    if last_terminal_ns:
        result.pipeline_per_s = len(terminal_ms) / ((last_terminal_ns - min(calls.start_wall_ns)) / 1e9)


def _add_stages(
    stage_ms: list[list[float]],
    order_id: str,
    created_ns: int,
    terminal_ns: int,
    store_times: Mapping[str, Mapping[str, int]],
) -> None:
    """Append the stages of one confirmed order, unless a stream lacks one of its events."""
    points = [created_ns]
    for _, subject in SAGA_STEPS:
        stored = store_times.get(subject, {}).get(order_id)
        if stored is None:
            return
        points.append(stored)
    points.append(terminal_ns)
    for stage, (start, end) in enumerate(itertools.pairwise(points)):
        stage_ms[stage].append((end - start) / 1e6)


def _check_span_counts(result: PhaseResult, load: Load) -> None:
    """Note when the receiver got fewer spans than the orders must have produced."""
    assert result.spans is not None
    placed = load.warmup_calls + (result.calls.succeeded if result.calls else 0)
    # Every order makes at least these spans. Orders: a PlaceOrder server span and an OrderPlaced
    # producer span. Users: a GetUser server span. Inventory: an OrderPlaced consumer span.
    # Payments: a PaymentRequested consumer span. Notifications: a consumer span of the terminal event.
    minimum = {"orders": 2 * placed, "users": placed, "inventory": placed, "payments": placed,
               "notifications": placed}
    for service, expected in minimum.items():
        received = result.spans.get(service, 0)
        if received < expected:
            result.notes.append(
                f"the OTLP receiver got {received} spans from {service}, fewer than the "
                f"{expected} the orders produced, so the SDK dropped some"
            )
