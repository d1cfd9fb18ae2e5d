"""The Tidings main path: CreateUser on the users service until the notification is stored."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.phases import CALL_TIMEOUT, Load, wait_for_result
from bench.processes import Child, ProcessSet, child_environment, cpu_seconds, free_ports
from bench.results import PhaseResult
from bench.stats import CallStats, drive_calls, summarize_ms
from services.runtime.launch import service_arguments
from services.runtime.streams import USERS
from tidings.notifications.v1 import (
    notification_pb2,
    notification_service_pb2,
    notification_service_pb2_grpc,
)
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

# Durable consumer name of the notifications service (services/notifications/main.py).
NOTIFICATIONS_DURABLE = "notifications-users"

# Milliseconds between span exports: the SDK default, as a deployment runs.
# A 100 ms delay lowered CreateUser throughput by about a third against the
# default in one comparison on this machine, because each export has a fixed cost.
BSP_SCHEDULE_DELAY_MS = 5000


@dataclass(frozen=True)
class ServiceAddresses:
    """Loopback addresses of the two services of one run."""

    users: str
    notifications: str


def service_environment(
    nats_url: str,
    data_dir: Path,
    addresses: Mapping[str, str],
    otlp_port: int | None,
    monitor_url: str | None = None,
    sampled: float | None = None,
) -> dict[str, str]:
    """Return the environment of the service processes of one run.

    addresses maps each service name, such as ``users``, to its loopback
    ``host:port``, which every process gets as TIDINGS_<NAME>_PORT. With
    otlp_port, spans go to the OTLP/gRPC receiver on that port. Without it, the
    OpenTelemetry SDK is disabled. With sampled, that share of the traces is
    recorded; otherwise every trace is.
    """
    variables = {
        "NATS_URL": nats_url,
        "TIDINGS_DATA_DIR": str(data_dir),
        "TIDINGS_LOG_LEVEL": "WARNING",
        # As `tidings up` does, so that the services run with the identity check on.
        "TIDINGS_IDENTITY_SECRET": secrets.token_urlsafe(32),
    }
    if monitor_url is not None:
        # Lets the start-up check confirm the server syncs every write.
        variables["TIDINGS_NATS_MONITOR_URL"] = monitor_url
    for service, address in addresses.items():
        variables[f"TIDINGS_{service.upper()}_PORT"] = address.rsplit(":", 1)[1]
    if otlp_port is None:
        variables["OTEL_SDK_DISABLED"] = "true"
    else:
        variables.update({
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": str(BSP_SCHEDULE_DELAY_MS),
        })
        if sampled is not None:
            variables.update({
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(sampled),
            })
    return child_environment(variables)


async def start_otlp_receiver(processes: ProcessSet, result_path: Path) -> tuple[Child, int]:
    """Start the span-counting OTLP/gRPC receiver on a free loopback port and return it and the port.

    The receiver writes its span counts to result_path when it stops.
    """
    [port] = free_ports(1)
    receiver = await processes.start_python(
        "OTLP receiver",
        ["-m", "bench.servers", "otlp", "--port", str(port), "--result", str(result_path)],
        child_environment({}),
    )
    await receiver.wait_until_serving(f"127.0.0.1:{port}")
    return receiver, port


async def measure_tidings(
    result: PhaseResult,
    processes: ProcessSet,
    load: Load,
    work_dir: Path,
    *,
    tracing: bool,
    users_module: str = "services.users.main",
    variant: str = "Tidings",
    sampled: float | None = None,
) -> None:
    """Run a users service and the notifications service with their own nats-server and measure them.

    users_module selects the users process: the real service, or the
    dual-write baseline in bench.dual_write that publishes inline. With
    tracing and sampled, the services record that share of the traces.
    """
    label = f"{variant}, tracing on" if tracing else f"{variant}, tracing off"
    if tracing and sampled is not None:
        label += f", {sampled:.0%} sampled"
    _, _, round_number = result.key.partition("#")
    if round_number:
        # Rounds of one phase get their own process names, data and result files.
        label += f", round {round_number}"
    nats_server = await processes.start_nats(f"nats-server ({label})")
    suffix = f"{variant.lower().replace(' ', '-')}-{'on' if tracing else 'off'}"
    if tracing and sampled is not None:
        suffix += "-sampled"
    if round_number:
        suffix += f"-{round_number}"

    receiver: Child | None = None
    receiver_result = work_dir / f"otlp-{suffix}.json"
    otlp_port: int | None = None
    if tracing:
        receiver, otlp_port = await start_otlp_receiver(processes, receiver_result)

    users_port, notifications_port = free_ports(2)
    addresses = ServiceAddresses(f"127.0.0.1:{users_port}", f"127.0.0.1:{notifications_port}")
    data_dir = work_dir / f"data-{suffix}"
    environment = service_environment(
        nats_server.url, data_dir,
        {"users": addresses.users, "notifications": addresses.notifications}, otlp_port,
        nats_server.server.monitor_url, sampled,
    )
    users = await processes.start_python(f"users ({label})", service_arguments(users_module), environment)
    notifications = await processes.start_python(
        f"notifications ({label})", service_arguments("services.notifications.main"), environment
    )
    await asyncio.gather(
        users.wait_until_serving(addresses.users),
        notifications.wait_until_serving(addresses.notifications),
    )

    await _drive_and_collect(result, load, addresses, nats_server.url, users, notifications)

    # The services flush their last spans on SIGTERM, so the receiver stops after them.
    for service in (users, notifications):
        await processes.stop(service)
        result.notes += service_problems(service)
    if receiver is not None:
        await processes.stop(receiver)
        counts = await wait_for_result(receiver, receiver_result, timeout=5.0)
        result.spans = {str(name): int(count) for name, count in counts["spans"].items()}
        if sampled is None:
            _check_span_counts(result, load)
    await processes.stop(nats_server)


async def _drive_and_collect(
    result: PhaseResult,
    load: Load,
    addresses: ServiceAddresses,
    nats_url: str,
    users: Child,
    notifications: Child,
) -> None:
    connection = await nats.connect(nats_url, name="bench-progress", connect_timeout=5)
    try:
        js = connection.jetstream()
        async with (
            grpc.aio.insecure_channel(addresses.users) as users_channel,
            grpc.aio.insecure_channel(addresses.notifications) as notifications_channel,
        ):
            users_stub = user_service_pb2_grpc.UserServiceStub(users_channel)
            user_ids = await _create_users(result, load, users_stub, js, users, notifications)
            stub = notification_service_pb2_grpc.NotificationServiceStub(notifications_channel)
            listed = await _list_notifications(stub, user_ids[load.warmup_calls:], load)
        stored_ns = await _stream_times(js, load.warmup_calls + load.calls, load.timeout_for(load.calls))
    finally:
        await connection.close()

    assert result.calls is not None
    _summarize(result, result.calls, listed, stored_ns)


async def _create_users(
    result: PhaseResult,
    load: Load,
    stub: user_service_pb2_grpc.UserServiceStub,
    js: JetStreamContext,
    users: Child,
    notifications: Child,
) -> list[str | None]:
    """Create warm-up users, wait for their notifications, create the measured users and wait again.

    Also records the services' CPU time per measured call, from the first
    measured call until the last measured event was processed.

    Returns the user id of each call by index, warm-up calls first, and None for a failed call.
    """
    services = {"users": users, "notifications": notifications}
    cpu_at_start: dict[str, float | None] = {}
    total = load.warmup_calls + load.calls
    user_ids: list[str | None] = [None] * total
    run = secrets.token_hex(4)

    async def create_user(index: int) -> object:
        request = user_service_pb2.CreateUserRequest(
            user=user_pb2.User(
                email=f"bench-{run}-{index}@example.com", display_name=f"Bench User {index}"
            ),
            request_id=f"bench-{run}-{index}",
        )
        response = await stub.CreateUser(request, timeout=CALL_TIMEOUT)
        user_ids[index] = response.user.id
        return response

    async def drain_warmup() -> None:
        await _wait_until_consumed(js, load.warmup_calls, load.timeout_for(load.warmup_calls),
                                   notifications)
        cpu_at_start.update({name: cpu_seconds(child.pid) for name, child in services.items()})

    result.calls = await load.run(
        create_user, measured_offset=load.warmup_calls, after_warmup=drain_warmup
    )
    created = load.warmup_calls + result.calls.succeeded
    await _wait_until_consumed(js, created, load.timeout_for(created), notifications)

    for name, child in services.items():
        before, after = cpu_at_start.get(name), cpu_seconds(child.pid)
        if before is not None and after is not None and result.calls.succeeded:
            result.cpu_ms_per_call[name] = (after - before) * 1000 / result.calls.succeeded
    return user_ids


async def _wait_until_consumed(
    js: JetStreamContext, events: int, timeout: float, notifications: Child
) -> None:
    """Wait until the notifications consumer acknowledged the first events of the USERS stream.

    The consumer acknowledges an event after the transaction that stored its
    notification committed, so every one of these notifications then exists.
    """
    deadline = time.monotonic() + timeout
    acknowledged = 0
    while time.monotonic() < deadline:
        info = await js.consumer_info(USERS.name, NOTIFICATIONS_DURABLE)
        acknowledged = info.ack_floor.stream_seq if info.ack_floor else 0
        if acknowledged >= events and not info.num_ack_pending:
            return
        if notifications.process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    raise RuntimeError(
        f"the notifications consumer acknowledged {acknowledged} of {events} user events "
        f"within {timeout:.0f}s: {notifications.describe_failure()}"
    )


async def _list_notifications(
    stub: notification_service_pb2_grpc.NotificationServiceStub,
    user_ids: list[str | None],
    load: Load,
) -> list[list[notification_pb2.Notification] | None]:
    """Return the notifications of each user by index, or None where the user was not created."""
    listed: list[list[notification_pb2.Notification] | None] = [None] * len(user_ids)

    async def list_for_user(index: int) -> object:
        user_id = user_ids[index]
        if user_id is None:
            return None
        request = notification_service_pb2.ListNotificationsRequest(user_id=user_id)
        response = await stub.ListNotifications(request, timeout=CALL_TIMEOUT)
        listed[index] = list(response.notifications)
        return response

    stats = await drive_calls(
        list_for_user, count=len(user_ids), concurrency=load.concurrency,
        timeout=load.timeout_for(len(user_ids)),
    )
    if stats.errors:
        raise RuntimeError(
            f"{stats.errors} ListNotifications calls failed. First failure: {stats.first_error}"
        )
    return listed


async def _stream_times(js: JetStreamContext, events: int, timeout: float) -> dict[str, int]:
    """Return when JetStream stored each user event, in ns since the epoch, by user id (ce-subject).

    Reads the USERS stream through an ephemeral pull consumer. The stream
    timestamp of a message is the nats-server's clock when it stored it.
    """
    # The harness never acknowledges, so the consumer requires no acks. Otherwise nats-server's
    # default max_ack_pending of 1000 would stop deliveries after 1000 messages.
    subscription = await js.pull_subscribe(
        "tidings.users.>", stream=USERS.name,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    stored_ns: dict[str, int] = {}
    read = 0
    try:
        async with asyncio.timeout(timeout):
            while read < events:
                for message in await subscription.fetch(256, timeout=5.0):
                    read += 1
                    user_id = (message.headers or {}).get("ce-subject", "")
                    stored_ns[user_id] = int(message.metadata.timestamp.timestamp() * 1e9)
    except TimeoutError as exc:
        raise RuntimeError(
            f"reading the USERS stream timed out after {read} of {events} events: {exc!r}"
        ) from exc
    finally:
        await subscription.unsubscribe()
    return stored_ns


def _summarize(
    result: PhaseResult,
    calls: CallStats,
    listed: list[list[notification_pb2.Notification] | None],
    stored_ns: dict[str, int],
) -> None:
    """Compute the event latencies and the pipeline throughput from the stored notifications."""
    event_ms: list[float] = []
    stored_ms: list[float] = []
    relay_ms: list[float] = []
    consumer_ms: list[float] = []
    last_stored_ns = 0
    wrong_count = 0
    for index, notifications in enumerate(listed):
        if notifications is None:
            continue
        if len(notifications) != 1:
            wrong_count += 1
            continue
        notification = notifications[0]
        created_ns = notification.create_time.ToNanoseconds()
        event_ns = notification.event_time.ToNanoseconds()
        event_ms.append((created_ns - event_ns) / 1e6)
        stored_ms.append((created_ns - calls.start_wall_ns[index]) / 1e6)
        last_stored_ns = max(last_stored_ns, created_ns)
        in_stream_ns = stored_ns.get(notification.user_id)
        if in_stream_ns is not None:
            relay_ms.append((in_stream_ns - event_ns) / 1e6)
            consumer_ms.append((created_ns - in_stream_ns) / 1e6)
    if wrong_count:
        raise RuntimeError(f"{wrong_count} created users have no notification or more than one")

    result.event_latency = summarize_ms(event_ms)
    result.start_to_stored = summarize_ms(stored_ms)
    result.event_stages = [
        ("event_time → stored in the USERS stream (commit, outbox relay)", summarize_ms(relay_ms)),
        ("stored in the stream → notification create_time (consumer)", summarize_ms(consumer_ms)),
    ]
    if last_stored_ns:
        result.pipeline_per_s = len(stored_ms) / ((last_stored_ns - min(calls.start_wall_ns)) / 1e9)


def service_problems(service: Child) -> list[str]:
    """Return notes on a nonzero exit code and on the WARNING and ERROR lines in a service's log."""
    notes = []
    if service.process.returncode != 0:
        notes.append(f"{service.name} exited with code {service.process.returncode} after SIGTERM")
    try:
        lines = service.log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [*notes, f"cannot read the log of {service.name}: {exc}"]
    problems = [line for line in lines if '"level": "WARNING"' in line or '"level": "ERROR"' in line]
    if problems:
        notes.append(
            f"{service.name} logged {len(problems)} warnings or errors. First: {problems[0][:300]}"
        )
    return notes


def _check_span_counts(result: PhaseResult, load: Load) -> None:
    """Note when the receiver got fewer spans than the calls must have produced."""
    assert result.spans is not None
    created = load.warmup_calls + (result.calls.succeeded if result.calls else 0)
    # The users service makes a server span per CreateUser and a producer span per event.
    # The notifications service makes a consumer span per event and a server span per ListNotifications.
    minimum = {"users": 2 * created, "notifications": created + load.calls}
    for service, expected in minimum.items():
        received = result.spans.get(service, 0)
        if received < expected:
            result.notes.append(
                f"the OTLP receiver got {received} spans from {service}, fewer than the "
                f"{expected} the calls produced, so the SDK dropped some"
            )
