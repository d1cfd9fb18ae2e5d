"""gRPC PaymentService: top-ups, wallets and the payment of each order."""

from __future__ import annotations

import logging

import grpc

from services.payments import store
from services.runtime.idempotency import retry_once_on_conflict
from services.runtime.service import Runtime
from services.runtime.validation import Violations, check_id, check_request_id
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc

logger = logging.getLogger(__name__)

MIN_TOP_UP_CENTS = 1
MAX_TOP_UP_CENTS = 100_000_000


class PaymentServicer(payment_service_pb2_grpc.PaymentServiceServicer):
    """Implements tidings.payments.v1.PaymentService."""

    def __init__(self, runtime: Runtime) -> None:
        self._database = runtime.database
        self._request_log = runtime.request_log

    async def TopUp(
        self, request: payment_service_pb2.TopUpRequest, context: grpc.aio.ServicerContext
    ) -> payment_service_pb2.TopUpResponse:
        violations = Violations()
        user_id = check_id(violations, "user_id", request.user_id)
        _check_top_up_amount(violations, "amount_cents", request.amount_cents)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        return await retry_once_on_conflict(lambda: self._top_up(request, user_id))

    async def _top_up(
        self, request: payment_service_pb2.TopUpRequest, user_id: str
    ) -> payment_service_pb2.TopUpResponse:
        async with self._database.transaction() as tx:
            replayed = await self._request_log.replay(
                tx, "TopUp", request, payment_service_pb2.TopUpResponse
            )
            if replayed is not None:
                return replayed
            row = await store.top_up(tx, user_id, request.amount_cents)
            response = payment_service_pb2.TopUpResponse(wallet=store.to_wallet_message(row))
            await self._request_log.record(tx, "TopUp", request, response)
        logger.info(
            "wallet topped up",
            extra={"user_id": user_id, "amount_cents": request.amount_cents,
                   "balance_cents": row.balance_cents},
        )
        return response

    async def GetWallet(
        self, request: payment_service_pb2.GetWalletRequest, context: grpc.aio.ServicerContext
    ) -> payment_service_pb2.GetWalletResponse:
        violations = Violations()
        user_id = check_id(violations, "user_id", request.user_id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            row = await store.get_wallet(tx, user_id)
        return payment_service_pb2.GetWalletResponse(wallet=store.to_wallet_message(row))

    async def GetPayment(
        self, request: payment_service_pb2.GetPaymentRequest, context: grpc.aio.ServicerContext
    ) -> payment_service_pb2.GetPaymentResponse:
        violations = Violations()
        order_id = check_id(violations, "order_id", request.order_id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            row = await store.get_payment(tx, order_id)
        return payment_service_pb2.GetPaymentResponse(payment=store.to_payment_message(row))


def _check_top_up_amount(violations: Violations, field: str, value: int) -> None:
    if not MIN_TOP_UP_CENTS <= value <= MAX_TOP_UP_CENTS:
        violations.add(
            field, f"is {value}; send an amount from {MIN_TOP_UP_CENTS} to {MAX_TOP_UP_CENTS} cents"
        )
