"""Each order saga is one trace: PlaceOrder, every event and every saga reply form a single span tree.

The five services run as processes against a nats-server of the test and
export spans by OTLP/gRPC to a receiver on a loopback port. The test opens
the root span and calls PlaceOrder through a traced channel, so the trace
starts in this process. Setup and polling calls go through plain channels,
which keeps them out of the measured trace.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.cli.supervisor import wait_until_serving
from services.runtime.clients import traced_channel
from tests.e2e.otlp_receiver import CollectedSpan, OtlpTraceReceiver, from_sdk_span, serve_otlp_receiver
from tests.e2e.processes import (
    ChildProcess,
    clean_environment,
    service_command,
    start_process,
    stop_process,
)
from tests.helpers import wait_for
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc, product_pb2
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_pb2, payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

pytestmark = pytest.mark.e2e

T = TypeVar("T")

SERVICES = ("users", "inventory", "payments", "orders", "notifications")
SERVING_TIMEOUT = 30.0
# Seconds for an order to reach its final state, and for its spans to reach the receiver.
SETTLE_TIMEOUT = 20.0
SPAN_TIMEOUT = 15.0
# TIDINGS_SAGA_TIMEOUT in seconds for the timeout test. The other tests run with the default of 30 seconds.
SHORT_SAGA_TIMEOUT = 2

PRICE_CENTS = 500
STOCK = 10

# Key that identifies a span of a trace: (service.name, kind, name).
SpanKey = tuple[str, str, str]

PLACE_ORDER = "/tidings.orders.v1.OrderService/PlaceOrder"
GET_USER = "/tidings.users.v1.UserService/GetUser"

ORDER_PLACED = "tidings.orders.order.placed"
PAYMENT_REQUESTED = "tidings.orders.payment.requested"
ORDER_CONFIRMED = "tidings.orders.order.confirmed"
ORDER_REJECTED = "tidings.orders.order.rejected"
STOCK_RESERVED = "tidings.inventory.stock.reserved"
STOCK_RELEASED = "tidings.inventory.stock.released"
PAYMENT_CAPTURED = "tidings.payments.payment.captured"
PAYMENT_DECLINED = "tidings.payments.payment.declined"
PAYMENT_REFUNDED = "tidings.payments.payment.refunded"


def publish(service: str, subject: str) -> SpanKey:
    return (service, "PRODUCER", f"publish {subject}")


def process(service: str, subject: str) -> SpanKey:
    return (service, "CONSUMER", f"process {subject}")


TEST_ROOT: SpanKey = ("test", "INTERNAL", "place order from test")
TEST_CLIENT: SpanKey = ("test", "CLIENT", PLACE_ORDER)
ORDERS_SERVER: SpanKey = ("orders", "SERVER", PLACE_ORDER)
ORDERS_GET_USER: SpanKey = ("orders", "CLIENT", GET_USER)
USERS_SERVER: SpanKey = ("users", "SERVER", GET_USER)
SAGA_TIMEOUT_SPAN: SpanKey = ("orders", "INTERNAL", "order saga timeout")

# (parent, child) pairs of the saga up to the payment request, shared by every outcome.
PLACEMENT_EDGES: list[tuple[SpanKey, SpanKey]] = [
    (TEST_ROOT, TEST_CLIENT),
    (TEST_CLIENT, ORDERS_SERVER),
    (ORDERS_SERVER, ORDERS_GET_USER),
    (ORDERS_GET_USER, USERS_SERVER),
    (ORDERS_SERVER, publish("orders", ORDER_PLACED)),
    (publish("orders", ORDER_PLACED), process("inventory", ORDER_PLACED)),
    (process("inventory", ORDER_PLACED), publish("inventory", STOCK_RESERVED)),
    (publish("inventory", STOCK_RESERVED), process("orders", STOCK_RESERVED)),
    (process("orders", STOCK_RESERVED), publish("orders", PAYMENT_REQUESTED)),
    (publish("orders", PAYMENT_REQUESTED), process("payments", PAYMENT_REQUESTED)),
]

CONFIRMED_EDGES = [
    *PLACEMENT_EDGES,
    (process("payments", PAYMENT_REQUESTED), publish("payments", PAYMENT_CAPTURED)),
    (publish("payments", PAYMENT_CAPTURED), process("orders", PAYMENT_CAPTURED)),
    (process("orders", PAYMENT_CAPTURED), publish("orders", ORDER_CONFIRMED)),
    (publish("orders", ORDER_CONFIRMED), process("inventory", ORDER_CONFIRMED)),
    (publish("orders", ORDER_CONFIRMED), process("notifications", ORDER_CONFIRMED)),
]

# What every service does with OrderRejected, whichever step rejected the order.
REJECTION_EDGES = [
    (publish("orders", ORDER_REJECTED), process("inventory", ORDER_REJECTED)),
    (process("inventory", ORDER_REJECTED), publish("inventory", STOCK_RELEASED)),
    (publish("orders", ORDER_REJECTED), process("payments", ORDER_REJECTED)),
    (publish("orders", ORDER_REJECTED), process("notifications", ORDER_REJECTED)),
]

DECLINED_EDGES = [
    *PLACEMENT_EDGES,
    (process("payments", PAYMENT_REQUESTED), publish("payments", PAYMENT_DECLINED)),
    (publish("payments", PAYMENT_DECLINED), process("orders", PAYMENT_DECLINED)),
    (process("orders", PAYMENT_DECLINED), publish("orders", ORDER_REJECTED)),
    *REJECTION_EDGES,
]

# Payments is down until the timeout rejects the order. On restart it reads
# PaymentRequested and then OrderRejected, so it captures the payment and then
# refunds it. Orders ignores the late PaymentCaptured.
TIMED_OUT_EDGES = [
    *PLACEMENT_EDGES,
    (ORDERS_SERVER, SAGA_TIMEOUT_SPAN),
    (SAGA_TIMEOUT_SPAN, publish("orders", ORDER_REJECTED)),
    *REJECTION_EDGES,
    (process("payments", PAYMENT_REQUESTED), publish("payments", PAYMENT_CAPTURED)),
    (publish("payments", PAYMENT_CAPTURED), process("orders", PAYMENT_CAPTURED)),
    (process("payments", ORDER_REJECTED), publish("payments", PAYMENT_REFUNDED)),
]


@dataclass
class SagaSystem:
    """The five service processes of one test, with plain (untraced) stubs to them."""

    environment: dict[str, str]
    ports: dict[str, int]
    log_dir: Path
    children: dict[str, ChildProcess] = field(default_factory=dict)
    # Every process ever started, including stopped ones, so teardown stops each by PID.
    started: list[ChildProcess] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.users = user_service_pb2_grpc.UserServiceStub(self._channel("users"))
        self.inventory = inventory_service_pb2_grpc.InventoryServiceStub(self._channel("inventory"))
        self.payments = payment_service_pb2_grpc.PaymentServiceStub(self._channel("payments"))
        self.orders = order_service_pb2_grpc.OrderServiceStub(self._channel("orders"))
        self.notifications = notification_service_pb2_grpc.NotificationServiceStub(
            self._channel("notifications")
        )

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def start(self, service: str) -> None:
        child = start_process(service, service_command(service), self.environment, self.log_dir)
        self.children[service] = child
        self.started.append(child)

    async def wait_serving(self, service: str) -> None:
        try:
            await wait_until_serving(self.address(service), timeout=SERVING_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"{service} did not report SERVING within {SERVING_TIMEOUT}s\n"
                        + self.children[service].log_tail())

    async def stop(self, service: str) -> None:
        """Stop a service process by PID: SIGTERM, then SIGKILL if it outlives processes.STOP_TIMEOUT."""
        await asyncio.to_thread(stop_process, self.children[service])

    def log_tails(self) -> str:
        return "\n".join(child.log_tail(2000) for child in self.children.values())

    def _channel(self, service: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address(service))
        self.channels.append(channel)
        return channel


@asynccontextmanager
async def _running_system(
    tmp_path: Path, nats_url: str, receiver_port: int, saga_timeout: float
) -> AsyncIterator[SagaSystem]:
    ports = {name: free_port() for name in SERVICES}
    environment = clean_environment({
        "NATS_URL": nats_url,
        "TIDINGS_DATA_DIR": str(tmp_path / "data"),
        "TIDINGS_SAGA_TIMEOUT": str(saga_timeout),
        "TIDINGS_SHUTDOWN_GRACE": "5",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **{f"TIDINGS_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    })
    system = SagaSystem(environment, ports, tmp_path / "logs")
    try:
        for name in SERVICES:
            system.start(name)
        await asyncio.gather(*(system.wait_serving(name) for name in SERVICES))
        yield system
    finally:
        for channel in system.channels:
            await channel.close()
        await asyncio.gather(*(asyncio.to_thread(stop_process, child) for child in system.started))


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpTraceReceiver]:
    """An OTLP/gRPC trace receiver on a free loopback port, served from its own threads."""
    with serve_otlp_receiver() as receiver:
        yield receiver


@pytest.fixture
async def saga_system(
    tmp_path: Path, nats_server: EmbeddedNats, otlp_receiver: OtlpTraceReceiver
) -> AsyncIterator[SagaSystem]:
    """The five services with the default saga timeout of 30 seconds."""
    async with _running_system(tmp_path, nats_server.url, otlp_receiver.port, 30) as system:
        yield system


@pytest.fixture
async def short_timeout_system(
    tmp_path: Path, nats_server: EmbeddedNats, otlp_receiver: OtlpTraceReceiver
) -> AsyncIterator[SagaSystem]:
    """The five services with a saga timeout of SHORT_SAGA_TIMEOUT seconds."""
    async with _running_system(tmp_path, nats_server.url, otlp_receiver.port, SHORT_SAGA_TIMEOUT) as system:
        yield system


async def _create_buyer(system: SagaSystem, top_up_cents: int) -> str:
    """Create a user with a wallet topped up by top_up_cents and return the user id."""
    response = await system.users.CreateUser(user_service_pb2.CreateUserRequest(
        user=user_pb2.User(email=f"buyer-{uuid.uuid4().hex[:8]}@example.com", display_name="Buyer")
    ), timeout=10)
    await system.payments.TopUp(payment_service_pb2.TopUpRequest(
        user_id=response.user.id, amount_cents=top_up_cents, request_id=str(uuid.uuid4())
    ), timeout=10)
    return response.user.id


async def _create_product(system: SagaSystem) -> str:
    response = await system.inventory.CreateProduct(inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(name="Teapot", price_cents=PRICE_CENTS, stock=STOCK)
    ), timeout=10)
    return response.product.id


async def _place_order_traced(system: SagaSystem, user_id: str, product_id: str) -> order_pb2.Order:
    """Call PlaceOrder through a traced channel, so the call is a CLIENT span of the current trace."""
    async with traced_channel(system.address("orders")) as channel:
        response = await order_service_pb2_grpc.OrderServiceStub(channel).PlaceOrder(
            order_service_pb2.PlaceOrderRequest(
                user_id=user_id,
                line_items=[order_pb2.LineItem(product_id=product_id, quantity=1)],
                request_id=str(uuid.uuid4()),
            ),
            timeout=10,
        )
    return response.order


async def _wait_or_fail(
    system: SagaSystem, probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = SETTLE_TIMEOUT
) -> T:
    try:
        return await wait_for(probe, timeout=timeout, interval=0.1)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{system.log_tails()}")


async def _wait_for_order_state(system: SagaSystem, order_id: str, state: int) -> order_pb2.Order:
    async def reached() -> order_pb2.Order | None:
        response = await system.orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=5)
        return response.order if response.order.state == state else None

    current = await system.orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id), timeout=5)
    return await _wait_or_fail(
        system, reached,
        f"order {order_id} to reach {order_pb2.OrderState.Name(state)} "
        f"(state at the start of the wait: {order_pb2.OrderState.Name(current.order.state)})",
    )


async def _wait_for_notification(system: SagaSystem, user_id: str, title: str) -> None:
    async def stored() -> bool:
        response = await system.notifications.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(user_id=user_id), timeout=5
        )
        return any(notification.title == title for notification in response.notifications)

    await _wait_or_fail(system, stored, f"notification {title!r} for user {user_id}")


async def _wait_for_no_reservation(system: SagaSystem, product_id: str) -> None:
    async def released() -> bool:
        response = await system.inventory.GetProduct(
            inventory_service_pb2.GetProductRequest(id=product_id), timeout=5
        )
        return response.product.reserved == 0

    await _wait_or_fail(system, released, f"reserved units of product {product_id} to return to 0")


def _key(span: CollectedSpan) -> SpanKey:
    return (span.service, span.kind, span.name)


def _listing(spans: list[CollectedSpan]) -> str:
    ordered = sorted(spans, key=lambda span: span.start_time_ns)
    return "\n".join(f"  {span.describe()}" for span in ordered)


def _orphans(spans: list[CollectedSpan]) -> list[CollectedSpan]:
    span_ids = {span.span_id for span in spans}
    return [span for span in spans if span.parent_span_id and span.parent_span_id not in span_ids]


async def _collect_trace(
    receiver: OtlpTraceReceiver, exporter: InMemorySpanExporter, trace_id: str,
    edges: list[tuple[SpanKey, SpanKey]],
) -> list[CollectedSpan]:
    """Wait until the trace contains every span of edges and the parent of each span, then return it.

    Each process exports on its own schedule, so a child span may reach the
    receiver before its parent. The wait ends only when the set is complete.
    """
    test_spans = [
        span for span in map(from_sdk_span, exporter.get_finished_spans()) if span.trace_id == trace_id
    ]
    expected = {key for edge in edges for key in edge}

    def trace_spans() -> list[CollectedSpan]:
        return test_spans + receiver.spans_of_trace(trace_id)

    async def complete() -> list[CollectedSpan] | None:
        spans = trace_spans()
        if expected <= {_key(span) for span in spans} and not _orphans(spans):
            return spans
        return None

    try:
        return await wait_for(complete, timeout=SPAN_TIMEOUT, interval=0.1)
    except TimeoutError:
        pass

    spans = trace_spans()
    missing = sorted(expected - {_key(span) for span in spans})
    # A missing span may have been exported in another trace, which shows where the context was lost.
    elsewhere = [
        span for span in receiver.all_spans() if span.trace_id != trace_id and _key(span) in missing
    ]
    elsewhere_listing = "\n".join(
        f"  {span.describe()} trace {span.trace_id}" for span in elsewhere
    ) or "  none"
    pytest.fail(
        f"trace {trace_id} was not complete within {SPAN_TIMEOUT}s.\n"
        f"Missing spans (service, kind, name): {missing}\n"
        f"Spans whose parent is not in the trace:\n{_listing(_orphans(spans)) or '  none'}\n"
        f"Spans with a missing (service, kind, name) in other traces:\n{elsewhere_listing}\n"
        f"Spans of the trace (service kind name span id parent id):\n{_listing(spans)}"
    )


def _assert_one_tree(spans: list[CollectedSpan], edges: list[tuple[SpanKey, SpanKey]]) -> None:
    """Check that spans form one tree rooted at the test's span with each edge a direct parent link."""
    listing = f"Spans of the trace (service kind name span id parent id):\n{_listing(spans)}"

    known_services = {"test", *SERVICES}
    for span in spans:
        assert span.service in known_services, (
            f"span {span.describe()} has service.name {span.service!r}, not one of "
            f"{sorted(known_services)}\n{listing}"
        )

    roots = [span for span in spans if span.parent_span_id is None]
    assert [_key(root) for root in roots] == [TEST_ROOT], (
        f"the trace must have one root, the test's span {TEST_ROOT}; roots: "
        f"{[root.describe() for root in roots]}\n{listing}"
    )
    orphans = _orphans(spans)
    assert not orphans, f"spans whose parent is not in the trace:\n{_listing(orphans)}\n{listing}"

    by_key: dict[SpanKey, CollectedSpan] = {}
    for key in dict.fromkeys(key for edge in edges for key in edge):
        matches = [span for span in spans if _key(span) == key]
        assert len(matches) == 1, f"expected one span {key} in the trace, found {len(matches)}\n{listing}"
        by_key[key] = matches[0]

    by_id = {span.span_id: span for span in spans}
    for parent_key, child_key in edges:
        parent, child = by_key[parent_key], by_key[child_key]
        actual_parent = by_id.get(child.parent_span_id or "")
        assert child.parent_span_id == parent.span_id, (
            f"{child_key} must be a child of {parent_key} (span {parent.span_id}), but its parent is "
            f"{actual_parent.describe() if actual_parent else child.parent_span_id}\n{listing}"
        )
        if child.kind == "CONSUMER":
            assert parent.span_id in child.linked_span_ids, (
                f"{child_key} must link to its producer {parent_key} (span {parent.span_id}); "
                f"links: {list(child.linked_span_ids)}\n{listing}"
            )


async def test_confirmed_order_is_one_trace(
    saga_system: SagaSystem, otlp_receiver: OtlpTraceReceiver, spans: InMemorySpanExporter
) -> None:
    system = saga_system
    user_id = await _create_buyer(system, top_up_cents=10 * PRICE_CENTS)
    product_id = await _create_product(system)

    with trace.get_tracer(__name__).start_as_current_span(TEST_ROOT[2]) as root:
        order = await _place_order_traced(system, user_id, product_id)
        confirmed = await _wait_for_order_state(system, order.id, order_pb2.ORDER_STATE_CONFIRMED)
        await _wait_for_notification(system, user_id, "Order confirmed")
    trace_id = format(root.get_span_context().trace_id, "032x")

    assert confirmed.total_cents == PRICE_CENTS, f"confirmed order: {confirmed}"
    trace_spans = await _collect_trace(otlp_receiver, spans, trace_id, CONFIRMED_EDGES)
    _assert_one_tree(trace_spans, CONFIRMED_EDGES)


async def test_declined_payment_is_one_trace(
    saga_system: SagaSystem, otlp_receiver: OtlpTraceReceiver, spans: InMemorySpanExporter
) -> None:
    system = saga_system
    user_id = await _create_buyer(system, top_up_cents=PRICE_CENTS - 1)
    product_id = await _create_product(system)

    with trace.get_tracer(__name__).start_as_current_span(TEST_ROOT[2]) as root:
        order = await _place_order_traced(system, user_id, product_id)
        rejected = await _wait_for_order_state(system, order.id, order_pb2.ORDER_STATE_REJECTED)
        await _wait_for_notification(system, user_id, "Order rejected")
        await _wait_for_no_reservation(system, product_id)
    trace_id = format(root.get_span_context().trace_id, "032x")

    assert rejected.rejection_reason == order_pb2.REJECTION_REASON_INSUFFICIENT_FUNDS, (
        f"rejected order: {rejected}"
    )
    trace_spans = await _collect_trace(otlp_receiver, spans, trace_id, DECLINED_EDGES)
    _assert_one_tree(trace_spans, DECLINED_EDGES)


async def test_timed_out_order_is_one_trace(
    short_timeout_system: SagaSystem, otlp_receiver: OtlpTraceReceiver, spans: InMemorySpanExporter
) -> None:
    system = short_timeout_system
    top_up = 10 * PRICE_CENTS
    user_id = await _create_buyer(system, top_up_cents=top_up)
    product_id = await _create_product(system)
    await system.stop("payments")

    with trace.get_tracer(__name__).start_as_current_span(TEST_ROOT[2]) as root:
        order = await _place_order_traced(system, user_id, product_id)
        rejected = await _wait_for_order_state(system, order.id, order_pb2.ORDER_STATE_REJECTED)
        await _wait_for_notification(system, user_id, "Order rejected")
    trace_id = format(root.get_span_context().trace_id, "032x")

    assert rejected.rejection_reason == order_pb2.REJECTION_REASON_TIMEOUT, f"rejected order: {rejected}"

    # Payments comes back and works through PaymentRequested and OrderRejected of the dead order.
    system.start("payments")
    await system.wait_serving("payments")

    async def refunded() -> bool:
        try:
            response = await system.payments.GetPayment(
                payment_service_pb2.GetPaymentRequest(order_id=order.id), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return response.payment.state == payment_pb2.PAYMENT_STATE_REFUNDED

    await _wait_or_fail(system, refunded, f"the payment of order {order.id} to be refunded")
    await _wait_for_no_reservation(system, product_id)
    wallet = (await system.payments.GetWallet(
        payment_service_pb2.GetWalletRequest(user_id=user_id), timeout=5
    )).wallet
    assert wallet.balance_cents == top_up, f"wallet after the refund: {wallet}"

    trace_spans = await _collect_trace(otlp_receiver, spans, trace_id, TIMED_OUT_EDGES)
    _assert_one_tree(trace_spans, TIMED_OUT_EDGES)
    timeout_span = next(span for span in trace_spans if _key(span) == SAGA_TIMEOUT_SPAN)
    assert timeout_span.attributes.get("tidings.order_id") == order.id, (
        f"attributes of {timeout_span.describe()}: {timeout_span.attributes}"
    )
