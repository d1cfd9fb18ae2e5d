"""gRPC InventoryService: validates requests, changes products and reads reservations."""

from __future__ import annotations

import logging
import uuid
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.inventory import store
from services.runtime.errors import NotFound
from services.runtime.idempotency import retry_once_on_conflict
from services.runtime.pagination import decode_page_token, encode_page_token
from services.runtime.service import Runtime
from services.runtime.validation import (
    Violations,
    check_id,
    check_page_size,
    check_range,
    check_request_id,
    check_text,
    check_update_mask,
)
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200
MAX_PRICE_CENTS = 100_000_000
MAX_STOCK = 1_000_000_000
UPDATABLE_FIELDS = ("name", "price_cents", "stock")

ResponseT = TypeVar("ResponseT", bound=Message)


class InventoryServicer(inventory_service_pb2_grpc.InventoryServiceServicer):
    """Implements tidings.inventory.v1.InventoryService."""

    def __init__(self, runtime: Runtime) -> None:
        self._database = runtime.database
        self._request_log = runtime.request_log

    async def CreateProduct(
        self,
        request: inventory_service_pb2.CreateProductRequest,
        context: grpc.aio.ServicerContext,
    ) -> inventory_service_pb2.CreateProductResponse:
        violations = Violations()
        name = check_text(violations, "product.name", request.product.name, max_length=MAX_NAME_LENGTH)
        check_range(violations, "product.price_cents", request.product.price_cents, 0, MAX_PRICE_CENTS)
        check_range(violations, "product.stock", request.product.stock, 0, MAX_STOCK)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        async def create() -> inventory_service_pb2.CreateProductResponse:
            async with self._database.transaction() as tx:
                replayed = await self._request_log.replay(
                    tx, "CreateProduct", request, inventory_service_pb2.CreateProductResponse
                )
                if replayed is not None:
                    return replayed
                row = await store.insert_product(
                    tx, str(uuid.uuid4()), name, request.product.price_cents, request.product.stock
                )
                response = inventory_service_pb2.CreateProductResponse(
                    product=store.product_to_message(row)
                )
                await self._request_log.record(tx, "CreateProduct", request, response)
            logger.info("product created",
                        extra={"product_id": row.id, "stock": row.stock, "price_cents": row.price_cents})
            return response

        return await retry_once_on_conflict(create)

    async def GetProduct(
        self, request: inventory_service_pb2.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> inventory_service_pb2.GetProductResponse:
        violations = Violations()
        product_id = check_id(violations, "id", request.id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            row = await store.get_product(tx, product_id)
        return inventory_service_pb2.GetProductResponse(product=store.product_to_message(row))

    async def ListProducts(
        self, request: inventory_service_pb2.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> inventory_service_pb2.ListProductsResponse:
        violations = Violations()
        page_size = check_page_size(violations, "page_size", request.page_size)
        after = decode_page_token(violations, "page_token", request.page_token)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            rows = await store.list_products(tx, after, page_size + 1)

        response = inventory_service_pb2.ListProductsResponse(
            products=[store.product_to_message(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = encode_page_token(rows[page_size - 1].seq)
        return response

    async def UpdateProduct(
        self,
        request: inventory_service_pb2.UpdateProductRequest,
        context: grpc.aio.ServicerContext,
    ) -> inventory_service_pb2.UpdateProductResponse:
        violations = Violations()
        product_id = check_id(violations, "product.id", request.product.id)
        requested = check_update_mask(violations, list(request.update_mask.paths), UPDATABLE_FIELDS)
        check_request_id(violations, "request_id", request.request_id)
        values: dict[str, Any] = {}
        if "name" in requested:
            values["name"] = check_text(
                violations, "product.name", request.product.name, max_length=MAX_NAME_LENGTH
            )
        if "price_cents" in requested:
            check_range(violations, "product.price_cents", request.product.price_cents, 0, MAX_PRICE_CENTS)
            values["price_cents"] = request.product.price_cents
        if "stock" in requested:
            check_range(violations, "product.stock", request.product.stock, 0, MAX_STOCK)
            values["stock"] = request.product.stock
        violations.raise_if_any()

        async def apply() -> inventory_service_pb2.UpdateProductResponse:
            async with self._database.transaction() as tx:
                replayed = await self._request_log.replay(
                    tx, "UpdateProduct", request, inventory_service_pb2.UpdateProductResponse
                )
                if replayed is not None:
                    return replayed
                current = await store.get_product(tx, product_id)
                changes = {k: v for k, v in values.items() if getattr(current, k) != v}
                row = await store.update_product(tx, product_id, changes) if changes else current
                response = inventory_service_pb2.UpdateProductResponse(
                    product=store.product_to_message(row)
                )
                await self._request_log.record(tx, "UpdateProduct", request, response)
            logger.info("product updated", extra={"product_id": product_id, "changed": sorted(changes)})
            return response

        return await retry_once_on_conflict(apply)

    async def GetReservation(
        self,
        request: inventory_service_pb2.GetReservationRequest,
        context: grpc.aio.ServicerContext,
    ) -> inventory_service_pb2.GetReservationResponse:
        violations = Violations()
        order_id = check_id(violations, "order_id", request.order_id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            found = await store.get_reservation(tx, order_id)
        if found is None:
            raise NotFound(
                f"order {order_id} has no reservation; it was never placed, not yet processed "
                "or its stock was rejected",
                reason="RESERVATION_NOT_FOUND",
                metadata={"order_id": order_id},
            )
        row, lines = found
        return inventory_service_pb2.GetReservationResponse(
            reservation=store.reservation_to_message(row, lines)
        )
