"""Wrapped gRPC method handlers kept per method, for server interceptors that wrap every call.

A grpc.aio interceptor runs for each call and returns the handler to use.
Building a new wrapped handler each time costs an allocation and a few
closures per call. This cache returns the handler built for the method
before, as long as the handler below it is the same object.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

Wrap = Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]


class WrappedHandlers:
    """Wrapped handlers by full method name, each with the handler it wraps."""

    def __init__(self, wrap: Wrap) -> None:
        """Keep the handlers that wrap(handler, full_method) builds."""
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Return handler wrapped, built again when an interceptor further in returned a new handler."""
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full_method)
        self._wrapped[full_method] = (handler, wrapped)
        return wrapped
