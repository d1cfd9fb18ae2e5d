"""Entry point of the notifications service process (``python -m services.notifications.main``)."""

from __future__ import annotations

from collections.abc import Sequence

from services.notifications import store
from services.notifications.handlers import ORDER_HANDLERS, USER_HANDLERS
from services.notifications.servicer import NotificationServicer
from services.runtime.consumer import ConsumerSpec
from services.runtime.service import Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import ORDERS, USERS
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind NotificationService to the runtime."""
    descriptor = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"]
    return [
        (
            notification_service_pb2_grpc.add_NotificationServiceServicer_to_server,
            NotificationServicer(runtime),
            descriptor.full_name,
        )
    ]


def consumers(runtime: Runtime) -> Sequence[ConsumerSpec]:
    """Read user events and the outcome of orders."""
    return [
        ConsumerSpec(
            durable="notifications-users",
            stream=USERS.name,
            subjects=("tidings.users.>",),
            handlers=USER_HANDLERS,
        ),
        ConsumerSpec(
            durable="notifications-orders",
            stream=ORDERS.name,
            subjects=(
                "tidings.orders.order.confirmed",
                "tidings.orders.order.rejected",
                "tidings.orders.order.cancelled",
            ),
            handlers=ORDER_HANDLERS,
        ),
    ]


SPEC = ServiceSpec(
    name="notifications",
    metadata=store.metadata,
    servicers=servicers,
    streams=(USERS, ORDERS),
    consumers=consumers,
)


def main() -> None:
    """Run the notifications service until SIGTERM or SIGINT."""
    run(SPEC)


if __name__ == "__main__":
    main()
