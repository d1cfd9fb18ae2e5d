"""The HTTP path: GetUser on the users service over grpc.aio, and GET /v1/users/{id} through the gateway."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import grpc

from bench.phases import CALL_TIMEOUT, Load, wait_for_result
from bench.processes import Child, NatsChild, ProcessSet, cpu_seconds, free_ports, peak_rss_kib
from bench.results import PhaseResult
from bench.tidings_path import service_environment, service_problems, start_otlp_receiver
from gateway.auth import mint_hs256_token
from services.runtime.launch import service_arguments
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

# Subject and scopes of the harness's bearer token. GET /v1/users/{id} requires users:read.
TOKEN_SUBJECT = "bench"
TOKEN_SCOPES = ("users:read",)

# Token bucket refill rate of the gateway's rate limit in these phases. The
# burst covers every request of a phase, so the limit never rejects one.
RATE_LIMIT_PER_SECOND = 1_000_000

# Key of the harness's own CPU time in PhaseResult.cpu_ms_per_call.
HARNESS = "harness"


async def measure_direct_get_user(
    result: PhaseResult, processes: ProcessSet, load: Load, work_dir: Path
) -> None:
    """Measure GetUser calls over grpc.aio on a users service process with tracing off."""
    label = "direct GetUser, tracing off"
    nats_server = await processes.start_nats(f"nats-server ({label})")
    [users_port] = free_ports(1)
    users_address = f"127.0.0.1:{users_port}"
    environment = _phase_environment(
        nats_server, work_dir / "data-get-user-grpc", {"users": users_address}, otlp_port=None
    )
    users = await processes.start_python(
        f"users ({label})", service_arguments("services.users.main"), environment
    )
    await users.wait_until_serving(users_address)

    async with grpc.aio.insecure_channel(users_address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        request = user_service_pb2.GetUserRequest(id=await _create_user(stub))

        async def get_user(_: int) -> object:
            return await stub.GetUser(request, timeout=CALL_TIMEOUT)

        await _run_load(result, load, get_user, {"users": users})

    await _stop_service(result, processes, "users", users)
    await processes.stop(nats_server)


async def measure_gateway_get_user(
    result: PhaseResult, processes: ProcessSet, load: Load, work_dir: Path, *, tracing: bool
) -> None:
    """Measure GET /v1/users/{id} through a gateway process in front of a users service process.

    With tracing, both processes export spans to an OTLP receiver that the
    harness starts, and result.spans gets the receiver's counts.
    """
    setting = "on" if tracing else "off"
    label = f"gateway path, tracing {setting}"
    nats_server = await processes.start_nats(f"nats-server ({label})")

    receiver: Child | None = None
    receiver_result = work_dir / f"otlp-gateway-{setting}.json"
    otlp_port: int | None = None
    if tracing:
        receiver, otlp_port = await start_otlp_receiver(processes, receiver_result)

    users_port, gateway_port = free_ports(2)
    users_address, gateway_address = f"127.0.0.1:{users_port}", f"127.0.0.1:{gateway_port}"
    environment = _phase_environment(
        nats_server, work_dir / f"data-gateway-{setting}",
        {"users": users_address, "gateway": gateway_address}, otlp_port,
    )
    jwt_secret = secrets.token_urlsafe(32)
    # The burst covers the untimed request that checks the response body, the warm-up and the measured calls.
    requests = 1 + load.warmup_calls + load.calls
    gateway_environment = {
        **environment,
        "TIDINGS_GATEWAY_JWT_HS256_SECRET": jwt_secret,
        "TIDINGS_GATEWAY_RATE_LIMIT_PER_SECOND": str(RATE_LIMIT_PER_SECOND),
        "TIDINGS_GATEWAY_RATE_LIMIT_BURST": str(requests),
    }
    users = await processes.start_python(
        f"users ({label})", service_arguments("services.users.main"), environment
    )
    gateway = await processes.start_python(f"gateway ({label})", ["-m", "gateway.main"], gateway_environment)
    await users.wait_until_serving(users_address)
    await gateway.wait_until_http_ok(f"http://{gateway_address}/healthz")

    async with grpc.aio.insecure_channel(users_address) as channel:
        user_id = await _create_user(user_service_pb2_grpc.UserServiceStub(channel))
    await _drive_gateway(
        result, load, gateway_address, user_id, jwt_secret, {"users": users, "gateway": gateway}
    )

    # The processes flush their last spans on SIGTERM, so the receiver stops after them.
    await _stop_service(result, processes, "gateway", gateway)
    await _stop_service(result, processes, "users", users)
    if receiver is not None:
        await processes.stop(receiver)
        counts = await wait_for_result(receiver, receiver_result, timeout=5.0)
        result.spans = {str(name): int(count) for name, count in counts["spans"].items()}
        _check_span_counts(result, requests)
    await processes.stop(nats_server)


def _phase_environment(
    nats_server: NatsChild, data_dir: Path, addresses: Mapping[str, str], otlp_port: int | None
) -> dict[str, str]:
    """Return the environment of a phase's users and gateway processes.

    service_environment gives each run a new identity secret, so the direct
    phase's users process runs with the same settings as the one behind the gateway.
    """
    return service_environment(
        nats_server.url, data_dir, addresses, otlp_port, nats_server.server.monitor_url
    )


async def _create_user(stub: user_service_pb2_grpc.UserServiceStub) -> str:
    """Create the one user that the GetUser calls read, and return its id."""
    run = secrets.token_hex(4)
    request = user_service_pb2.CreateUserRequest(
        user=user_pb2.User(email=f"bench-get-{run}@example.com", display_name="Bench Reader"),
        request_id=f"bench-get-{run}",
    )
    response = await stub.CreateUser(request, timeout=CALL_TIMEOUT)
    return response.user.id


async def _drive_gateway(
    result: PhaseResult,
    load: Load,
    gateway_address: str,
    user_id: str,
    jwt_secret: str,
    services: Mapping[str, Child],
) -> None:
    """Send the GET requests through one session with a connection per concurrent request."""
    token = mint_hs256_token(jwt_secret, TOKEN_SUBJECT, TOKEN_SCOPES)
    path = f"/v1/users/{user_id}"
    async with aiohttp.ClientSession(
        f"http://{gateway_address}",
        connector=aiohttp.TCPConnector(limit=load.concurrency),
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
    ) as session:
        await _check_user_body(session, path, user_id)

        async def get_user(_: int) -> object:
            async with session.get(path) as response:
                body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path} returned HTTP {response.status}: {body[:300]!r}")
            return body

        await _run_load(result, load, get_user, services)


async def _check_user_body(session: aiohttp.ClientSession, path: str, user_id: str) -> None:
    """Check, untimed, that GET path returns 200 and the user's JSON, and raise RuntimeError otherwise."""
    async with session.get(path) as response:
        body = await response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} returned HTTP {response.status}: {body[:300]!r}")
    returned = json.loads(body).get("user", {}).get("id")
    if returned != user_id:
        raise RuntimeError(f"GET {path} returned user id {returned!r}, expected {user_id!r}")


async def _run_load(
    result: PhaseResult,
    load: Load,
    call: Callable[[int], Awaitable[object]],
    services: Mapping[str, Child],
) -> None:
    """Run the warm-up and measured calls, and record CPU ms per measured call of each process.

    The CPU time runs from the end of the warm-up until the last measured call
    returned, for each service and for the harness process itself.
    """
    pids: dict[str, int | str] = {name: child.pid for name, child in services.items()}
    pids[HARNESS] = "self"
    cpu_at_start: dict[str, float | None] = {}

    async def mark_start() -> None:
        cpu_at_start.update({name: cpu_seconds(pid) for name, pid in pids.items()})

    result.calls = await load.run(call, after_warmup=mark_start)
    for name, pid in pids.items():
        before, after = cpu_at_start.get(name), cpu_seconds(pid)
        if before is not None and after is not None and result.calls.succeeded:
            result.cpu_ms_per_call[name] = (after - before) * 1000 / result.calls.succeeded


async def _stop_service(result: PhaseResult, processes: ProcessSet, name: str, service: Child) -> None:
    """Record a service's peak RSS, stop it and note its exit code and logged warnings."""
    peak = peak_rss_kib(service.pid)
    if peak is not None:
        result.peak_rss_kib[name] = peak
    await processes.stop(service)
    result.notes += service_problems(service)


def _check_span_counts(result: PhaseResult, requests: int) -> None:
    """Note when the receiver got fewer spans than the requests must have produced."""
    assert result.spans is not None
    # The gateway makes a server span per request and a client span per GetUser call.
    # The users service makes a server span per GetUser call, plus the spans of CreateUser.
    sent = requests - (result.calls.errors if result.calls else 0)
    minimum = {"gateway": 2 * sent, "users": sent}
    for service, expected in minimum.items():
        received = result.spans.get(service, 0)
        if received < expected:
            result.notes.append(
                f"the OTLP receiver got {received} spans from {service}, fewer than the "
                f"{expected} the requests produced, so the SDK dropped some"
            )
