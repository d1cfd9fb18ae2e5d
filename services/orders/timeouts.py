"""Rejects orders whose saga step got no reply in time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime

from opentelemetry import trace

from observability.propagation import extract_context
from services.orders import store
from services.orders.saga import IllegalTransition, Trigger
from services.orders.transitions import OrderSaga
from services.runtime.database import Database
from tidings.orders.v1 import order_pb2

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_BATCH = 100


class TimeoutScanner:
    """Periodically rejects open orders past their deadline, which compensates their steps."""

    def __init__(self, database: Database, saga: OrderSaga, interval: float) -> None:
        self._database = database
        self._saga = saga
        self._interval = interval
        self.rejected = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Scan every interval seconds until stopping is set."""
        while not stopping.is_set():
            try:
                await self.scan()
            except Exception:
                logger.exception("saga timeout scan failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self._interval)

    async def scan(self) -> int:
        """Reject every overdue open order; return how many were rejected."""
        async with self._database.transaction() as tx:
            overdue = await store.overdue_orders(tx, datetime.now(UTC), _BATCH)

        rejected = 0
        for row in overdue:
            # The rejection continues the trace of PlaceOrder, so the whole
            # saga, timeout included, shows as one tree.
            parent = extract_context(json.loads(row.trace_headers))
            with tracer.start_as_current_span("order saga timeout", context=parent) as span:
                span.set_attribute("tidings.order_id", row.id)
                if await self._reject(row.id):
                    rejected += 1
        self.rejected += rejected
        return rejected

    async def _reject(self, order_id: str) -> bool:
        try:
            async with self._database.transaction() as tx:
                await self._saga.apply(
                    tx, order_id, Trigger.TIMEOUT,
                    rejection_reason=order_pb2.REJECTION_REASON_TIMEOUT,
                    status_detail="a saga step did not answer before the deadline",
                )
        except IllegalTransition:
            # A reply arrived between the scan and this transaction.
            return False
        logger.warning("order rejected after saga timeout", extra={"order_id": order_id})
        return True
