"""Entry point of the inventory service process (``python -m services.inventory.main``)."""

from __future__ import annotations

from collections.abc import Sequence

from services.inventory import store
from services.inventory.handlers import OrderEventHandlers
from services.inventory.servicer import InventoryServicer
from services.runtime.consumer import ConsumerSpec
from services.runtime.service import Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import INVENTORY, ORDERS
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc

ORDER_SUBJECTS = (
    "tidings.orders.order.placed",
    "tidings.orders.order.confirmed",
    "tidings.orders.order.rejected",
    "tidings.orders.order.cancelled",
)


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind InventoryService to the runtime."""
    name = inventory_service_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name
    return [
        (
            inventory_service_pb2_grpc.add_InventoryServiceServicer_to_server,
            InventoryServicer(runtime),
            name,
        )
    ]


def consumers(runtime: Runtime) -> Sequence[ConsumerSpec]:
    """Read the order events that reserve, commit and release stock from the ORDERS stream."""
    return [
        ConsumerSpec(
            durable="inventory-orders",
            stream=ORDERS.name,
            subjects=ORDER_SUBJECTS,
            handlers=OrderEventHandlers(runtime).by_type(),
        )
    ]


SPEC = ServiceSpec(
    name="inventory",
    metadata=store.metadata,
    servicers=servicers,
    streams=(INVENTORY, ORDERS),
    consumers=consumers,
)


def main() -> None:
    """Run the inventory service until SIGTERM or SIGINT."""
    run(SPEC)


if __name__ == "__main__":
    main()
