"""`tidings demo`: create users, wait for their notifications, then run the order saga demo."""

from __future__ import annotations

import asyncio
import secrets

import grpc
from opentelemetry import trace

from observability.tracing import configure_tracing, shutdown_tracing
from services.runtime.cli.demo_saga import run_order_demo
from services.runtime.clients import traced_channel
from services.runtime.config import Settings
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

CALL_TIMEOUT = 5.0


def _trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


async def run_demo(settings: Settings, *, users: int, timeout: float) -> int:
    """Run the demo scenario; return 0 on success, 1 when the system is unreachable or slow."""
    provider = configure_tracing("tidings-demo")
    tracer = trace.get_tracer("tidings.demo")
    try:
        async with (
            traced_channel(settings.address_of("users")) as users_channel,
            traced_channel(settings.address_of("notifications")) as notifications_channel,
        ):
            user_stub = user_service_pb2_grpc.UserServiceStub(users_channel)
            notification_stub = notification_service_pb2_grpc.NotificationServiceStub(
                notifications_channel
            )
            created = await _create_users(tracer, user_stub, users)
            if created:
                await _rename_first(tracer, user_stub, created[0])
            for user, trace_id in created:
                await _wait_for_notification(notification_stub, user, trace_id, timeout)
            if created and not await run_order_demo(settings, created[0][0].id, timeout):
                print("demo failed: an order did not end as expected; see the lines above")
                return 1
    except grpc.aio.AioRpcError as exc:
        print(f"demo failed: {exc.code().name}: {exc.details()}")
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print("is the system running? start it with `tidings up` (or `make up`)")
        return 1
    except TimeoutError as exc:
        print(f"demo failed: {exc}")
        return 1
    finally:
        shutdown_tracing(provider)
    print("demo finished; look the trace ids up in Jaeger (service 'users' or 'tidings-demo')")
    return 0


async def _create_users(
    tracer: trace.Tracer, stub: user_service_pb2_grpc.UserServiceStub, count: int
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
            response = await stub.CreateUser(request, timeout=CALL_TIMEOUT)
            trace_id = _trace_id()
        print(f"[trace {trace_id}] CreateUser -> user {response.user.id} <{email}>")
        created.append((response.user, trace_id))
    return created


async def _rename_first(
    tracer: trace.Tracer,
    stub: user_service_pb2_grpc.UserServiceStub,
    first: tuple[user_pb2.User, str],
) -> None:
    user, _ = first
    with tracer.start_as_current_span("demo rename user"):
        request = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, display_name=f"{user.display_name} (renamed)"),
        )
        request.update_mask.paths.append("display_name")
        response = await stub.UpdateUser(request, timeout=CALL_TIMEOUT)
        trace_id = _trace_id()
    print(f"[trace {trace_id}] UpdateUser -> {user.id} is now {response.user.display_name!r} "
          f"(revision {response.user.revision})")


async def _wait_for_notification(
    stub: notification_service_pb2_grpc.NotificationServiceStub,
    user: user_pb2.User,
    trace_id: str,
    timeout: float,
) -> None:
    request = notification_service_pb2.ListNotificationsRequest(user_id=user.id)
    try:
        async with asyncio.timeout(timeout):
            while True:
                response = await stub.ListNotifications(request, timeout=CALL_TIMEOUT)
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
