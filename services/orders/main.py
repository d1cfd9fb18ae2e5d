"""Entry point of the orders service process (``python -m services.orders.main``)."""

from __future__ import annotations

from collections.abc import Sequence

from services.orders import store
from services.orders.handlers import SagaHandlers
from services.orders.servicer import OrderServicer
from services.orders.timeouts import TimeoutScanner
from services.orders.transitions import OrderSaga
from services.runtime.consumer import ConsumerSpec
from services.runtime.service import BackgroundTask, Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import INVENTORY, ORDERS, PAYMENTS
from tidings.orders.v1 import order_service_pb2, order_service_pb2_grpc


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind OrderService to the runtime."""
    name = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
    servicer = OrderServicer(runtime, OrderSaga(runtime.outbox))
    return [(order_service_pb2_grpc.add_OrderServiceServicer_to_server, servicer, name)]


def consumers(runtime: Runtime) -> Sequence[ConsumerSpec]:
    """Read the saga replies of inventory and payments."""
    handlers = SagaHandlers(OrderSaga(runtime.outbox)).by_type()
    return [
        ConsumerSpec(
            durable="orders-inventory",
            stream=INVENTORY.name,
            subjects=("tidings.inventory.stock.reserved", "tidings.inventory.stock.rejected"),
            handlers=handlers,
        ),
        ConsumerSpec(
            durable="orders-payments",
            stream=PAYMENTS.name,
            subjects=("tidings.payments.payment.captured", "tidings.payments.payment.declined"),
            handlers=handlers,
        ),
    ]


def tasks(runtime: Runtime) -> Sequence[BackgroundTask]:
    """Run the saga timeout scanner; it looks four times per timeout, at least once a second."""
    interval = min(1.0, runtime.settings.saga_timeout / 4)
    scanner = TimeoutScanner(runtime.database, OrderSaga(runtime.outbox), interval)
    return [scanner.run]


SPEC = ServiceSpec(
    name="orders",
    metadata=store.metadata,
    servicers=servicers,
    streams=(ORDERS, INVENTORY, PAYMENTS),
    consumers=consumers,
    tasks=tasks,
)


def main() -> None:
    """Run the orders service until SIGTERM or SIGINT."""
    run(SPEC)


if __name__ == "__main__":
    main()
