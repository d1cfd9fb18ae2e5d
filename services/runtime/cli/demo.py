"""`tidings demo`: create users, wait for their notifications, then run the order saga demo.

The scenario calls the system through a DemoClient: GrpcDemoClient calls
each service's gRPC server, HttpDemoClient (demo_http.py) goes through the
gateway with `--via-gateway`.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, TypeVar

import grpc
from opentelemetry import trace

from observability.tracing import configure_tracing, shutdown_tracing
from services.runtime.cli.demo_http import (
    GatewayCallError,
    GatewayUnreachableError,
    check_gateway_url,
    default_gateway_url,
    mint_demo_token,
    open_http_client,
)
from services.runtime.cli.demo_saga import SCENARIOS, run_order_demo
from services.runtime.cli.token import local_jwt_secret
from services.runtime.clients import traced_channel
from services.runtime.config import Settings
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.orders.v1 import order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

CALL_TIMEOUT = 5.0

# Seconds added to the gateway token's lifetime for rate-limit waits and the
# calls outside the per-user and per-order steps.
TOKEN_MARGIN = 600.0

T = TypeVar("T")


class DemoClient(Protocol):
    """The calls of the demo scenario, each with a deadline of CALL_TIMEOUT seconds."""

    @property
    def path(self) -> str:
        """How the calls reach the services, for the first line the demo prints."""
        ...

    def trace_id(self) -> str:
        """Return the trace id of the last call as 32 hex digits. A call inside a span joins its trace."""
        ...

    async def create_user(
        self, request: user_service_pb2.CreateUserRequest
    ) -> user_service_pb2.CreateUserResponse: ...

    async def update_user(
        self, request: user_service_pb2.UpdateUserRequest
    ) -> user_service_pb2.UpdateUserResponse: ...

    async def list_notifications(
        self, request: notification_service_pb2.ListNotificationsRequest
    ) -> notification_service_pb2.ListNotificationsResponse: ...

    async def create_product(
        self, request: inventory_service_pb2.CreateProductRequest
    ) -> inventory_service_pb2.CreateProductResponse: ...

    async def top_up(
        self, request: payment_service_pb2.TopUpRequest
    ) -> payment_service_pb2.TopUpResponse: ...

    async def place_order(
        self, request: order_service_pb2.PlaceOrderRequest
    ) -> order_service_pb2.PlaceOrderResponse: ...

    async def get_order(
        self, request: order_service_pb2.GetOrderRequest
    ) -> order_service_pb2.GetOrderResponse: ...


class GrpcDemoClient:
    """DemoClient that calls each service's gRPC server over traced channels."""

    def __init__(
        self, settings: Settings, channels: dict[str, grpc.aio.Channel], call_timeout: float
    ) -> None:
        self._addresses = {name: settings.address_of(name) for name in channels}
        self._users = user_service_pb2_grpc.UserServiceStub(channels["users"])
        self._notifications = notification_service_pb2_grpc.NotificationServiceStub(channels["notifications"])
        self._inventory = inventory_service_pb2_grpc.InventoryServiceStub(channels["inventory"])
        self._payments = payment_service_pb2_grpc.PaymentServiceStub(channels["payments"])
        self._orders = order_service_pb2_grpc.OrderServiceStub(channels["orders"])
        self._timeout = call_timeout
        self._last_trace_id = format(0, "032x")

    @property
    def path(self) -> str:
        addresses = ", ".join(f"{name} at {address}" for name, address in self._addresses.items())
        return f"gRPC straight to the services ({addresses})"

    def trace_id(self) -> str:
        """Return the trace of the span that was current during the last call.

        The gRPC interceptor starts each call's CLIENT span inside that span.
        NOTE: a call made outside any span starts a trace of its own that this
        client cannot see, and then the value is 32 zeros.
        """
        return self._last_trace_id

    async def create_user(
        self, request: user_service_pb2.CreateUserRequest
    ) -> user_service_pb2.CreateUserResponse:
        return await self._record(self._users.CreateUser(request, timeout=self._timeout))

    async def update_user(
        self, request: user_service_pb2.UpdateUserRequest
    ) -> user_service_pb2.UpdateUserResponse:
        return await self._record(self._users.UpdateUser(request, timeout=self._timeout))

    async def list_notifications(
        self, request: notification_service_pb2.ListNotificationsRequest
    ) -> notification_service_pb2.ListNotificationsResponse:
        return await self._record(self._notifications.ListNotifications(request, timeout=self._timeout))

    async def create_product(
        self, request: inventory_service_pb2.CreateProductRequest
    ) -> inventory_service_pb2.CreateProductResponse:
        return await self._record(self._inventory.CreateProduct(request, timeout=self._timeout))

    async def top_up(
        self, request: payment_service_pb2.TopUpRequest
    ) -> payment_service_pb2.TopUpResponse:
        return await self._record(self._payments.TopUp(request, timeout=self._timeout))

    async def place_order(
        self, request: order_service_pb2.PlaceOrderRequest
    ) -> order_service_pb2.PlaceOrderResponse:
        return await self._record(self._orders.PlaceOrder(request, timeout=self._timeout))

    async def get_order(
        self, request: order_service_pb2.GetOrderRequest
    ) -> order_service_pb2.GetOrderResponse:
        return await self._record(self._orders.GetOrder(request, timeout=self._timeout))

    async def _record(self, call: Awaitable[T]) -> T:
        response = await call
        self._last_trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
        return response


@asynccontextmanager
async def open_grpc_client(settings: Settings, call_timeout: float) -> AsyncIterator[GrpcDemoClient]:
    """Open a GrpcDemoClient with one traced channel per service, closed when the block exits."""
    async with (
        traced_channel(settings.address_of("users")) as users,
        traced_channel(settings.address_of("notifications")) as notifications,
        traced_channel(settings.address_of("inventory")) as inventory,
        traced_channel(settings.address_of("payments")) as payments,
        traced_channel(settings.address_of("orders")) as orders,
    ):
        channels = {
            "users": users,
            "notifications": notifications,
            "inventory": inventory,
            "payments": payments,
            "orders": orders,
        }
        yield GrpcDemoClient(settings, channels, call_timeout)


async def run_demo(
    settings: Settings,
    *,
    users: int,
    timeout: float,
    via_gateway: bool = False,
    gateway_url: str | None = None,
) -> int:
    """Run the demo scenario over gRPC, or through the gateway when via_gateway is set.

    gateway_url defaults to default_gateway_url(settings). Returns 0 on
    success, 1 when the system is unreachable, fails a call or is slow, and 2
    when the gateway URL is invalid or no token can be signed.
    """
    if not via_gateway:
        client: AbstractAsyncContextManager[DemoClient] = open_grpc_client(settings, CALL_TIMEOUT)
        return await _run_scenario(client, users=users, timeout=timeout, trace_service="users")

    url = gateway_url or default_gateway_url(settings)
    problem = check_gateway_url(url)
    if problem is not None:
        print(f"tidings demo: invalid --gateway-url {url!r}: {problem}", file=sys.stderr)
        return 2
    token = _gateway_token(settings, users=users, timeout=timeout)
    if token is None:
        return 2
    client = open_http_client(url, token, CALL_TIMEOUT)
    return await _run_scenario(client, users=users, timeout=timeout, trace_service="gateway")


def _gateway_token(settings: Settings, *, users: int, timeout: float) -> str | None:
    """Sign a token for the gateway with the local HS256 secret, or print why not and return None."""
    secret = local_jwt_secret(settings)
    if secret is None:
        print(
            "tidings demo: no HS256 secret found to sign a gateway token; run `tidings up` first (it "
            f"creates {settings.data_dir}/secrets/jwt) or set TIDINGS_GATEWAY_JWT_HS256_SECRET",
            file=sys.stderr,
        )
        return None
    # Each user and each order makes one call (at most CALL_TIMEOUT seconds plus the
    # HTTP margin) and then waits at most timeout seconds.
    lifetime = (users + len(SCENARIOS)) * (timeout + 2 * CALL_TIMEOUT) + TOKEN_MARGIN
    try:
        return mint_demo_token(secret, lifetime)
    except ValueError as exc:
        print(f"tidings demo: cannot sign a gateway token: {exc}", file=sys.stderr)
        return None


async def _run_scenario(
    opened_client: AbstractAsyncContextManager[DemoClient], *, users: int, timeout: float, trace_service: str
) -> int:
    provider = configure_tracing("tidings-demo")
    tracer = trace.get_tracer("tidings.demo")
    try:
        async with opened_client as client:
            print(f"demo path: {client.path}")
            created = await _create_users(tracer, client, users)
            if created:
                await _rename_first(tracer, client, created[0])
            for user, trace_id in created:
                await _wait_for_notification(client, user, trace_id, timeout)
            if created and not await run_order_demo(client, created[0][0].id, timeout):
                print("demo failed: an order did not end as expected; see the lines above")
                return 1
    except grpc.aio.AioRpcError as exc:
        print(f"demo failed: {exc.code().name}: {exc.details()}")
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("is the system running? start it with `tidings up` (or `make up`)")
        return 1
    except GatewayCallError as exc:
        print(f"demo failed: {exc}")
        if isinstance(exc, GatewayUnreachableError):
            print("is the system running? start it with `tidings up` (or `make up`), or pass --gateway-url")
        elif exc.http_status == 401:
            print("the gateway rejected the token, which the demo signs with "
                  "TIDINGS_GATEWAY_JWT_HS256_SECRET or else <TIDINGS_DATA_DIR>/secrets/jwt; use the "
                  "TIDINGS_DATA_DIR of the running `tidings up`")
        return 1
    except TimeoutError as exc:
        print(f"demo failed: {exc}")
        return 1
    finally:
        shutdown_tracing(provider)
    print(f"demo finished; look the trace ids up in Jaeger (service {trace_service!r} or 'tidings-demo')")
    return 0


async def _create_users(
    tracer: trace.Tracer, client: DemoClient, count: int
) -> list[tuple[user_pb2.User, str]]:
    run = secrets.token_hex(3)
    names = ["Ada Lovelace", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Alan Kay"]
    created = []
    for index in range(count):
        name = names[index % len(names)]
        email = f"{name.split()[0].lower()}.{run}.{index}@example.com"
        with tracer.start_as_current_span("demo create user"):
            request = user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email=email, display_name=name),
                request_id=f"demo-{run}-{index}",
            )
            response = await client.create_user(request)
            trace_id = client.trace_id()
        print(f"[trace {trace_id}] CreateUser -> user {response.user.id} <{email}>")
        created.append((response.user, trace_id))
    return created


async def _rename_first(
    tracer: trace.Tracer,
    client: DemoClient,
    first: tuple[user_pb2.User, str],
) -> None:
    user, _ = first
    with tracer.start_as_current_span("demo rename user"):
        request = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, display_name=f"{user.display_name} (renamed)"),
        )
        request.update_mask.paths.append("display_name")
        response = await client.update_user(request)
        trace_id = client.trace_id()
    print(f"[trace {trace_id}] UpdateUser -> {user.id} is now {response.user.display_name!r} "
          f"(revision {response.user.revision})")


async def _wait_for_notification(
    client: DemoClient,
    user: user_pb2.User,
    trace_id: str,
    timeout: float,
) -> None:
    request = notification_service_pb2.ListNotificationsRequest(user_id=user.id)
    try:
        async with asyncio.timeout(timeout):
            while True:
                response = await client.list_notifications(request)
                if response.notifications:
                    break
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise TimeoutError(
            f"no notification for user {user.id} within {timeout}s; check the notifications log"
        ) from None
    # The first notification is the welcome message caused by CreateUser, so
    # it belongs to that call's trace; later ones come from other calls.
    welcome = response.notifications[0]
    print(f"[trace {trace_id}] notification for {user.id}: {welcome.title!r} "
          f"(event {welcome.source_event_id})")
