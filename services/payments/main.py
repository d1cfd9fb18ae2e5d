"""Entry point of the payments service process (``python -m services.payments.main``)."""

from __future__ import annotations

from collections.abc import Sequence

from services.payments import store
from services.payments.handlers import PaymentHandlers
from services.payments.servicer import PaymentServicer
from services.runtime.consumer import ConsumerSpec
from services.runtime.service import Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import ORDERS, PAYMENTS
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc

ORDER_SUBJECTS = (
    "tidings.orders.payment.requested",
    "tidings.orders.order.rejected",
    "tidings.orders.order.cancelled",
)


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind PaymentService to the runtime."""
    name = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name
    return [
        (payment_service_pb2_grpc.add_PaymentServiceServicer_to_server, PaymentServicer(runtime), name)
    ]


def consumers(runtime: Runtime) -> Sequence[ConsumerSpec]:
    """Read payment requests, rejections and cancellations from the ORDERS stream."""
    return [
        ConsumerSpec(
            durable="payments-orders",
            stream=ORDERS.name,
            subjects=ORDER_SUBJECTS,
            handlers=PaymentHandlers(runtime).by_event_type(),
        )
    ]


SPEC = ServiceSpec(
    name="payments",
    metadata=store.metadata,
    servicers=servicers,
    streams=(PAYMENTS, ORDERS),
    consumers=consumers,
)


def main() -> None:
    """Run the payments service until SIGTERM or SIGINT."""
    run(SPEC)


if __name__ == "__main__":
    main()
