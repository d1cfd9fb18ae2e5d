"""Server interceptor that turns handler exceptions into gRPC statuses.

A ServiceError becomes its status code with a packed google.rpc.Status in the
``grpc-status-details-bin`` trailer (clients decode it with
``grpc_status.rpc_status.from_call``). Any other exception is logged with its
traceback and sent as INTERNAL with only the trace id, so no Python detail
reaches the client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace

from observability.method_handlers import WrappedHandlers
from services.runtime.errors import ServiceError

logger = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Map exceptions raised by unary handlers to statuses with google.rpc details."""

    def __init__(self) -> None:
        self._handlers = WrappedHandlers(_guarded)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler

        return self._handlers.get(handler_call_details.method, handler)


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """Return handler with its exceptions turned into statuses."""
    behavior = handler.unary_unary

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except ServiceError as exc:
            logger.info(
                "call rejected",
                extra={"rpc_method": method, "code": exc.code.name, "reason": exc.reason},
            )
            await context.abort(
                exc.code,
                exc.message,
                trailing_metadata=((STATUS_DETAILS_KEY, exc.to_status().SerializeToString()),),
            )
        except grpc.aio.AbortError:
            raise
        except Exception:
            trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
            logger.exception("call failed", extra={"rpc_method": method})
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error; quote trace id {trace_id}"
            )

    return grpc.unary_unary_rpc_method_handler(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
