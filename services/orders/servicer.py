"""gRPC OrderService: places orders after checking the user, lists and cancels them."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta

import grpc

from observability.propagation import inject_context
from services.orders import store
from services.orders.saga import CANCELLED, IllegalTransition, Trigger
from services.orders.transitions import OrderSaga
from services.runtime.clients import client_credentials, outgoing_timeout, traced_channel
from services.runtime.errors import FailedPrecondition, NotFound, Unavailable
from services.runtime.pagination import decode_page_token, encode_page_token
from services.runtime.service import Runtime
from services.runtime.validation import (
    Violations,
    check_id,
    check_page_size,
    check_request_id,
)
from tidings.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tidings.users.v1 import user_service_pb2, user_service_pb2_grpc

logger = logging.getLogger(__name__)

MAX_LINES = 50
MAX_QUANTITY = 1000


class OrderServicer(order_service_pb2_grpc.OrderServiceServicer):
    """Implements tidings.orders.v1.OrderService."""

    def __init__(self, runtime: Runtime, saga: OrderSaga) -> None:
        self._database = runtime.database
        self._request_log = runtime.request_log
        self._saga = saga
        self._settings = runtime.settings
        self._users_address = runtime.settings.address_of("users")
        channel = traced_channel(self._users_address, client_credentials(runtime.settings))
        self._users = user_service_pb2_grpc.UserServiceStub(channel)
        runtime.on_stop(lambda: channel.close())

    async def PlaceOrder(
        self, request: order_service_pb2.PlaceOrderRequest, context: grpc.aio.ServicerContext
    ) -> order_service_pb2.PlaceOrderResponse:
        violations = Violations()
        user_id = check_id(violations, "user_id", request.user_id)
        lines = _check_lines(violations, request)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            replayed = await self._request_log.replay(
                tx, "PlaceOrder", request, order_service_pb2.PlaceOrderResponse
            )
        if replayed is not None:
            return replayed

        await self._check_user(user_id, context)

        trace_headers: dict[str, str] = {}
        inject_context(trace_headers)
        deadline = datetime.now(UTC) + timedelta(seconds=self._settings.saga_timeout)
        async with self._database.transaction() as tx:
            # A concurrent retry with the same request id may have won the race.
            replayed = await self._request_log.replay(
                tx, "PlaceOrder", request, order_service_pb2.PlaceOrderResponse
            )
            if replayed is not None:
                return replayed
            order = await store.insert_order(
                tx, str(uuid.uuid4()), user_id, lines, deadline, json.dumps(trace_headers)
            )
            await self._saga.place(tx, order)
            response = order_service_pb2.PlaceOrderResponse(order=order)
            await self._request_log.record(tx, "PlaceOrder", request, response)
        logger.info("order placed", extra={"order_id": order.id, "user_id": user_id})
        return response

    async def _check_user(self, user_id: str, context: grpc.aio.ServicerContext) -> None:
        """Confirm the user exists with a call to the users service, within the caller's deadline."""
        try:
            await self._users.GetUser(
                user_service_pb2.GetUserRequest(id=user_id),
                timeout=outgoing_timeout(context, self._settings.call_timeout),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"user {user_id} not found; create the user before placing orders",
                    reason="USER_NOT_FOUND",
                    metadata={"user_id": user_id},
                ) from exc
            logger.warning(
                "users service call failed",
                extra={"user_id": user_id, "code": exc.code().name, "address": self._users_address},
            )
            raise Unavailable(
                f"cannot check user {user_id}: the users service returned {exc.code().name}; "
                "retry with backoff",
                reason="USERS_UNAVAILABLE",
                metadata={"user_id": user_id, "upstream_code": exc.code().name},
            ) from exc

    async def GetOrder(
        self, request: order_service_pb2.GetOrderRequest, context: grpc.aio.ServicerContext
    ) -> order_service_pb2.GetOrderResponse:
        violations = Violations()
        order_id = check_id(violations, "id", request.id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            order = await store.get_order(tx, order_id)
        return order_service_pb2.GetOrderResponse(order=order)

    async def ListOrders(
        self, request: order_service_pb2.ListOrdersRequest, context: grpc.aio.ServicerContext
    ) -> order_service_pb2.ListOrdersResponse:
        violations = Violations()
        user_id = check_id(violations, "user_id", request.user_id)
        page_size = check_page_size(violations, "page_size", request.page_size)
        filters = {"user_id": user_id}
        after = decode_page_token(violations, "page_token", request.page_token, filters)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            rows = await store.list_orders(tx, user_id, after, page_size + 1)
            orders = await store.messages_for(tx, rows[:page_size])

        response = order_service_pb2.ListOrdersResponse(orders=orders)
        if len(rows) > page_size:
            response.next_page_token = encode_page_token(rows[page_size - 1].seq, filters)
        return response

    async def CancelOrder(
        self, request: order_service_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> order_service_pb2.CancelOrderResponse:
        violations = Violations()
        order_id = check_id(violations, "id", request.id)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            replayed = await self._request_log.replay(
                tx, "CancelOrder", request, order_service_pb2.CancelOrderResponse
            )
            if replayed is not None:
                return replayed
            current = await store.get_order(tx, order_id)
            if current.state == CANCELLED:
                return order_service_pb2.CancelOrderResponse(order=current)
            try:
                order = await self._saga.apply(
                    tx, order_id, Trigger.CANCEL, status_detail="cancelled by the client"
                )
            except IllegalTransition as exc:
                raise FailedPrecondition(
                    f"order {order_id} is {exc.metadata.get('state', 'closed')} and cannot be "
                    "cancelled; only pending, awaiting-payment and confirmed orders can",
                    reason="ORDER_NOT_CANCELLABLE",
                    metadata={"order_id": order_id},
                ) from exc
            response = order_service_pb2.CancelOrderResponse(order=order)
            await self._request_log.record(tx, "CancelOrder", request, response)
        logger.info("order cancelled", extra={"order_id": order_id})
        return response


def _check_lines(
    violations: Violations, request: order_service_pb2.PlaceOrderRequest
) -> list[tuple[str, int]]:
    if not request.line_items:
        violations.add("line_items", "is required; send at least one product and quantity")
    if len(request.line_items) > MAX_LINES:
        violations.add("line_items", f"has {len(request.line_items)} lines; the maximum is {MAX_LINES}")

    lines: list[tuple[str, int]] = []
    seen: set[str] = set()
    for index, line in enumerate(request.line_items[:MAX_LINES]):
        field = f"line_items[{index}]"
        product_id = check_id(violations, f"{field}.product_id", line.product_id)
        if not 1 <= line.quantity <= MAX_QUANTITY:
            violations.add(
                f"{field}.quantity", f"is {line.quantity}; send 1 to {MAX_QUANTITY} units"
            )
        if product_id in seen:
            violations.add(
                f"{field}.product_id", f"repeats product {product_id}; add up its quantities in one line"
            )
        seen.add(product_id)
        lines.append((product_id, line.quantity))
    return lines
