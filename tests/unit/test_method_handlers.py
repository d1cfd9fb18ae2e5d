"""Unit tests of observability/method_handlers.py: wrapped handlers kept per method."""

from __future__ import annotations

from typing import Any

import grpc

from observability.method_handlers import WrappedHandlers


async def _behavior(request: Any, context: Any) -> Any:
    return request


def _wrapped_handlers() -> tuple[WrappedHandlers, list[str]]:
    built: list[str] = []

    def wrap(handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        built.append(full_method)
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary)

    return WrappedHandlers(wrap), built


def test_wrapped_handlers_reuse_for_same_handler() -> None:
    handlers, _ = _wrapped_handlers()
    inner = grpc.unary_unary_rpc_method_handler(_behavior)

    assert handlers.get("/a.B/C", inner) is handlers.get("/a.B/C", inner)


def test_wrapped_handlers_rebuild_for_new_handler() -> None:
    handlers, built = _wrapped_handlers()

    handlers.get("/a.B/C", grpc.unary_unary_rpc_method_handler(_behavior))
    handlers.get("/a.B/C", grpc.unary_unary_rpc_method_handler(_behavior))

    assert built == ["/a.B/C", "/a.B/C"]
