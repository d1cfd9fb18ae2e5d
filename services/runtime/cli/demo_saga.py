"""The order part of `tidings demo`: orders that are confirmed, and rejected for stock or funds."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace

from tidings.inventory.v1 import inventory_service_pb2, product_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2
from tidings.payments.v1 import payment_service_pb2

if TYPE_CHECKING:
    # demo.py imports this module at run time, so the import goes only one way.
    from services.runtime.cli.demo import DemoClient

TERMINAL = (
    order_pb2.ORDER_STATE_CONFIRMED,
    order_pb2.ORDER_STATE_REJECTED,
    order_pb2.ORDER_STATE_CANCELLED,
)


@dataclass(frozen=True)
class Scenario:
    """One order the demo places and the outcome it expects."""

    title: str
    quantity: int
    expected: int


SCENARIOS = (
    Scenario("enough stock and money", 1, order_pb2.ORDER_STATE_CONFIRMED),
    Scenario("more than the stock", 50, order_pb2.ORDER_STATE_REJECTED),
    Scenario("more than the wallet", 3, order_pb2.ORDER_STATE_REJECTED),
)


async def run_order_demo(client: DemoClient, user_id: str, timeout: float) -> bool:
    """Place the demo orders for user_id; return whether each ended as expected."""
    tracer = trace.get_tracer("tidings.demo")
    with tracer.start_as_current_span("demo prepare products and wallet"):
        product = await _create_product(client)
        await client.top_up(
            payment_service_pb2.TopUpRequest(
                user_id=user_id, amount_cents=5_000, request_id=f"demo-topup-{secrets.token_hex(4)}"
            )
        )
        print(f"[trace {client.trace_id()}] product {product.id} {product.name!r} at "
              f"{product.price_cents} cents, stock {product.stock}; wallet of {user_id} topped up "
              "with 5000 cents")

    outcomes = [
        await _place(tracer, client, user_id, product.id, scenario, timeout)
        for scenario in SCENARIOS
    ]
    return all(outcomes)


async def _create_product(client: DemoClient) -> product_pb2.Product:
    request = inventory_service_pb2.CreateProductRequest(
        product=product_pb2.Product(
            name=f"Demo lamp {secrets.token_hex(2)}", price_cents=2_000, stock=10
        )
    )
    return (await client.create_product(request)).product


async def _place(
    tracer: trace.Tracer,
    client: DemoClient,
    user_id: str,
    product_id: str,
    scenario: Scenario,
    timeout: float,
) -> bool:
    with tracer.start_as_current_span(f"demo order: {scenario.title}"):
        request = order_service_pb2.PlaceOrderRequest(
            user_id=user_id,
            line_items=[order_pb2.LineItem(product_id=product_id, quantity=scenario.quantity)],
            request_id=f"demo-order-{secrets.token_hex(6)}",
        )
        placed = (await client.place_order(request)).order
        trace_id = client.trace_id()
    print(f"[trace {trace_id}] PlaceOrder ({scenario.title}: {scenario.quantity} units) -> "
          f"order {placed.id} {order_pb2.OrderState.Name(placed.state)}")

    final = await _wait_for_terminal(client, placed.id, timeout)
    state = order_pb2.OrderState.Name(final.state)
    detail = ""
    if final.state == order_pb2.ORDER_STATE_REJECTED:
        reason = order_pb2.RejectionReason.Name(final.rejection_reason)
        detail = f" ({reason}: {final.status_detail})"
    print(f"[trace {trace_id}] order {placed.id} is {state}{detail}, total {final.total_cents} cents")
    return final.state == scenario.expected


async def _wait_for_terminal(client: DemoClient, order_id: str, timeout: float) -> order_pb2.Order:
    request = order_service_pb2.GetOrderRequest(id=order_id)
    try:
        async with asyncio.timeout(timeout):
            while True:
                order = (await client.get_order(request)).order
                if order.state in TERMINAL:
                    return order
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise TimeoutError(
            f"order {order_id} did not reach a final state within {timeout}s; "
            "check the orders, inventory and payments logs"
        ) from None
