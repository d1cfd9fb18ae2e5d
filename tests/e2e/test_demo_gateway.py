"""`tidings demo --via-gateway`: the demo scenario over HTTP/JSON through the gateway.

The system test starts `tidings up` on free ports with its data in tmp_path
and runs the demo as a separate process. Both export spans to an OTLP
receiver of the test, which checks each printed trace id against them. The
gateway runs with a rate limit of 2 requests per second and route, so the
demo meets 429 responses and has to wait and retry. The other tests need no
running system.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from google.protobuf.message import Message
from multidict import MultiDict

from gateway.transcode import build_request
from services.runtime.cli.demo_http import (
    CREATE_PRODUCT,
    CREATE_USER,
    GET_ORDER,
    LIST_NOTIFICATIONS,
    PLACE_ORDER,
    TOKEN_SUBJECT,
    TOP_UP,
    UPDATE_USER,
    demo_routes,
    http_request_of,
)
from services.runtime.cli.embedded_nats import free_port
from tests.e2e.otlp_receiver import CollectedSpan, OtlpTraceReceiver, serve_otlp_receiver
from tests.e2e.processes import (
    REPO_ROOT,
    ChildProcess,
    clean_environment,
    start_process,
    stop_pid,
    stop_process,
    wait_until,
)
from tidings.inventory.v1 import inventory_service_pb2, product_pb2
from tidings.notifications.v1 import notification_service_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2
from tidings.payments.v1 import payment_service_pb2
from tidings.users.v1 import user_pb2, user_service_pb2

READY_TIMEOUT = 45.0
# Seconds the whole demo may run. It waits at most DEMO_WAIT seconds per user and per order.
DEMO_TIMEOUT = 120.0
DEMO_WAIT = 20.0
SPAN_TIMEOUT = 15.0
DEMO_USERS = 2
RATE_LIMIT_PER_SECOND = 2

TRACE_LINE = re.compile(r"^\[trace ([0-9a-f]{32})\] (.+)$", re.MULTILINE)
STARTED_LINE = re.compile(r"^started ([\w-]+) \(pid (\d+)\)", re.MULTILINE)
ZERO_TRACE_ID = "0" * 32


@dataclass
class GatewaySystem:
    """`tidings up` with the gateway, after it printed "tidings is ready"."""

    supervisor: ChildProcess
    environment: dict[str, str]
    gateway_url: str


def _tidings_command(*arguments: str) -> list[str]:
    # The console script installed next to this interpreter is what users run.
    script = Path(sys.executable).parent / "tidings"
    if not script.exists():
        found = shutil.which("tidings")
        if found is None:
            pytest.fail(f"tidings console script not found next to {sys.executable} or on PATH; "
                        "install the project with `pip install -e .`")
        script = Path(found)
    return [str(script), *arguments]


def _run_demo(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `tidings demo` with arguments to its end, or kill it after DEMO_TIMEOUT seconds."""
    return subprocess.run(
        _tidings_command("demo", *arguments),
        env=environment,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpTraceReceiver]:
    """An OTLP/gRPC trace receiver on a free loopback port, served from its own threads."""
    with serve_otlp_receiver() as receiver:
        yield receiver


@pytest.fixture
def gateway_system(tmp_path: Path, otlp_receiver: OtlpTraceReceiver) -> Iterator[GatewaySystem]:
    """`tidings up` with data in tmp_path, free ports for every process and spans sent to otlp_receiver."""
    gateway_port = free_port()
    environment = clean_environment({
        "TIDINGS_DATA_DIR": str(tmp_path / "data"),
        "TIDINGS_USERS_PORT": str(free_port()),
        "TIDINGS_ORDERS_PORT": str(free_port()),
        "TIDINGS_INVENTORY_PORT": str(free_port()),
        "TIDINGS_PAYMENTS_PORT": str(free_port()),
        "TIDINGS_NOTIFICATIONS_PORT": str(free_port()),
        "TIDINGS_GATEWAY_PORT": str(gateway_port),
        "TIDINGS_GATEWAY_RATE_LIMIT_PER_SECOND": str(RATE_LIMIT_PER_SECOND),
        "TIDINGS_GATEWAY_RATE_LIMIT_BURST": "1",
        "TIDINGS_EMBEDDED_NATS_PORT": str(free_port()),
        "TIDINGS_SHUTDOWN_GRACE": "5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    supervisor = start_process("tidings-up", _tidings_command("up"), environment, tmp_path / "logs")
    try:
        wait_until(
            lambda: "tidings is ready" in supervisor.stdout() or supervisor.process.poll() is not None,
            timeout=READY_TIMEOUT,
        )
        assert supervisor.process.poll() is None, (
            f"tidings up exited with code {supervisor.process.returncode} during start\n"
            + supervisor.log_tail()
        )
        assert "tidings is ready" in supervisor.stdout(), (
            f"tidings up printed no 'tidings is ready' within {READY_TIMEOUT}s\n" + supervisor.log_tail()
        )
        yield GatewaySystem(supervisor, environment, f"http://127.0.0.1:{gateway_port}")
    finally:
        stop_process(supervisor)
        # Processes the supervisor started and could not stop, nats-server included.
        for name, pid in STARTED_LINE.findall(supervisor.stdout()):
            marker = "nats-server" if name == "nats-server" else f"{name}.main"
            stop_pid(int(pid), marker)


def _lines_with(trace_lines: list[tuple[str, str]], text: str) -> list[tuple[str, str]]:
    return [(trace_id, line) for trace_id, line in trace_lines if text in line]


def _span_tree_text(spans: list[CollectedSpan]) -> str:
    return "\n".join(span.describe() for span in spans)


def _gateway_spans_exported(
    receiver: OtlpTraceReceiver, trace_ids: list[str], route: str
) -> dict[str, CollectedSpan] | None:
    """Return the gateway SERVER span of route per trace id, or None while one is missing."""
    found = {}
    for trace_id in trace_ids:
        spans = [
            span for span in receiver.spans_of_trace(trace_id)
            if (span.service, span.kind, span.name) == ("gateway", "SERVER", route)
        ]
        if not spans:
            return None
        found[trace_id] = spans[0]
    return found


@pytest.mark.e2e
def test_demo_via_gateway(gateway_system: GatewaySystem, otlp_receiver: OtlpTraceReceiver) -> None:
    result = _run_demo(
        gateway_system.environment, "--via-gateway", "--users", str(DEMO_USERS), "--timeout", str(DEMO_WAIT)
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, (
        f"tidings demo --via-gateway exited with code {result.returncode}\n{output}\n"
        + gateway_system.supervisor.log_tail()
    )
    path_line = f"demo path: HTTP/JSON through the gateway at {gateway_system.gateway_url}\n"
    assert path_line in result.stdout, output
    assert "demo finished" in result.stdout, output

    trace_lines = TRACE_LINE.findall(result.stdout)
    zero_ids = [line for trace_id, line in trace_lines if trace_id == ZERO_TRACE_ID]
    assert not zero_ids, f"lines with an invalid trace id: {zero_ids}\n{output}"

    # Users: one CreateUser line each, and the welcome notification in the same trace.
    created = _lines_with(trace_lines, "CreateUser -> user ")
    notified = _lines_with(trace_lines, "notification for ")
    assert len(created) == DEMO_USERS, f"expected {DEMO_USERS} CreateUser lines\n{output}"
    created_trace_ids = [trace_id for trace_id, _ in created]
    assert len(set(created_trace_ids)) == DEMO_USERS, f"CreateUser lines share a trace\n{output}"
    assert len(notified) == DEMO_USERS, f"expected {DEMO_USERS} notification lines\n{output}"
    assert [trace_id for trace_id, _ in notified] == created_trace_ids, (
        f"each notification line must name the trace of its user's CreateUser\n{output}"
    )
    assert len(_lines_with(trace_lines, "UpdateUser -> ")) == 1, f"expected one UpdateUser line\n{output}"
    assert len(_lines_with(trace_lines, "topped up")) == 1, f"expected one product and wallet line\n{output}"

    # Orders: each final state in the trace of its PlaceOrder call.
    placed = _lines_with(trace_lines, "PlaceOrder (")
    assert len(placed) == 3, f"expected 3 PlaceOrder lines\n{output}"
    outcomes = {
        "is ORDER_STATE_CONFIRMED": "confirmed order",
        "REJECTION_REASON_OUT_OF_STOCK": "order rejected for stock",
        "REJECTION_REASON_INSUFFICIENT_FUNDS": "order rejected for funds",
    }
    placed_trace_ids = [trace_id for trace_id, _ in placed]
    for text, outcome in outcomes.items():
        lines = _lines_with(trace_lines, text)
        assert len(lines) == 1, f"expected one line for the {outcome}\n{output}"
        assert lines[0][0] in placed_trace_ids, (
            f"the {outcome} line names trace {lines[0][0]}, which no PlaceOrder line names\n{output}"
        )

    # Two CreateUser calls in a row exceed the rate limit, so the gateway rejected one at least once.
    supervisor = gateway_system.supervisor
    gateway_log = supervisor.stdout() + supervisor.stderr_path.read_text(errors="replace")
    rate_limited = [
        line for line in gateway_log.splitlines()
        if '"status": 429' in line and f'"subject": "{TOKEN_SUBJECT}"' in line
    ]
    assert rate_limited, f"the gateway logged no 429 response to the demo\n{supervisor.log_tail()}"

    # The printed trace ids are the traces in which the gateway served the HTTP requests.
    for trace_ids, route in (
        (created_trace_ids, "POST /v1/users"),
        (placed_trace_ids, "POST /v1/orders"),
    ):
        server_spans = wait_until(
            lambda trace_ids=trace_ids, route=route: _gateway_spans_exported(otlp_receiver, trace_ids, route),
            timeout=SPAN_TIMEOUT,
        )
        assert server_spans is not None, (
            f"the OTLP receiver has no gateway SERVER span {route!r} for every one of the traces "
            f"{trace_ids} within {SPAN_TIMEOUT}s\n{output}"
        )
        for trace_id, server in server_spans.items():
            spans = otlp_receiver.spans_of_trace(trace_id)
            by_id = {span.span_id: span for span in spans}
            tree = _span_tree_text(spans)
            client = by_id.get(server.parent_span_id or "")
            assert client is not None, f"the gateway span's parent was not exported:\n{tree}"
            assert (client.service, client.kind, client.name) == ("tidings-demo", "CLIENT", route), (
                f"the gateway span's parent is not the demo's HTTP CLIENT span:\n{tree}"
            )
            step = by_id.get(client.parent_span_id or "")
            assert step is not None, f"the demo CLIENT span's parent was not exported:\n{tree}"
            assert step.service == "tidings-demo", f"the demo CLIENT span's parent is not the demo's:\n{tree}"
            assert step.parent_span_id is None, f"the trace does not start at the demo step:\n{tree}"


def test_demo_without_secret(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    environment = clean_environment({
        "TIDINGS_DATA_DIR": str(data_dir),
        "TIDINGS_GATEWAY_PORT": str(free_port()),
        "OTEL_TRACES_EXPORTER": "none",
    })

    result = _run_demo(environment, "--via-gateway")

    assert result.returncode == 2, f"exit code {result.returncode}; stderr:\n{result.stderr}"
    assert "no HS256 secret found" in result.stderr, result.stderr
    assert "run `tidings up` first" in result.stderr, result.stderr
    assert "TIDINGS_GATEWAY_JWT_HS256_SECRET" in result.stderr, result.stderr
    assert f"{data_dir}/secrets/jwt" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "[trace " not in result.stdout, result.stdout


def test_demo_gateway_unreachable(tmp_path: Path) -> None:
    port = free_port()
    environment = clean_environment({
        "TIDINGS_DATA_DIR": str(tmp_path / "data"),
        "TIDINGS_GATEWAY_JWT_HS256_SECRET": "demo-test-secret-" + "0" * 32,
        "OTEL_TRACES_EXPORTER": "none",
    })

    result = _run_demo(environment, "--gateway-url", f"http://127.0.0.1:{port}")

    assert result.returncode == 1, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert f"demo path: HTTP/JSON through the gateway at http://127.0.0.1:{port}" in result.stdout
    assert f"cannot connect to the gateway at http://127.0.0.1:{port}" in result.stdout, result.stdout
    assert "start it with `tidings up`" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def _demo_requests() -> list[tuple[str, Message]]:
    user_id = str(uuid.uuid4())
    update = user_service_pb2.UpdateUserRequest(user=user_pb2.User(id=user_id, display_name="Ada (renamed)"))
    update.update_mask.paths.append("display_name")
    return [
        (CREATE_USER, user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email="ada@example.com", display_name="Ada Lovelace"), request_id="demo-1"
        )),
        (UPDATE_USER, update),
        (LIST_NOTIFICATIONS, notification_service_pb2.ListNotificationsRequest(user_id=user_id)),
        (CREATE_PRODUCT, inventory_service_pb2.CreateProductRequest(
            product=product_pb2.Product(name="Demo lamp", price_cents=2_000, stock=10)
        )),
        (TOP_UP, payment_service_pb2.TopUpRequest(user_id=user_id, amount_cents=5_000, request_id="top-1")),
        (PLACE_ORDER, order_service_pb2.PlaceOrderRequest(
            user_id=user_id,
            line_items=[order_pb2.LineItem(product_id=str(uuid.uuid4()), quantity=3)],
            request_id="order-1",
        )),
        (GET_ORDER, order_service_pb2.GetOrderRequest(id=str(uuid.uuid4()))),
    ]


DEMO_REQUESTS = _demo_requests()


@pytest.mark.parametrize(
    ("method", "request_message"),
    DEMO_REQUESTS,
    ids=[method.rsplit("/", 1)[1] for method, _ in DEMO_REQUESTS],
)
def test_http_request_round_trip(method: str, request_message: Message) -> None:
    """The gateway's transcoder rebuilds each demo request from the HTTP request the demo sends."""
    route = demo_routes()[method]

    http_request = http_request_of(route, request_message)

    assert http_request.method == route.http_method
    pieces = re.split(r"\{[^}]*\}", route.template)
    match = re.fullmatch("([^/:]+)".join(re.escape(piece) for piece in pieces), http_request.path)
    assert match is not None, f"path {http_request.path!r} does not fit the template {route.template!r}"
    path_values = {f"p{index}": unquote(value) for index, value in enumerate(match.groups())}
    # The body goes through JSON text, as on the wire.
    body = json.loads(json.dumps(http_request.body)) if route.body else None
    rebuilt = build_request(route, path_values, MultiDict(http_request.query), body)
    assert rebuilt == request_message, f"sent {http_request}, the gateway built {rebuilt}"


@pytest.mark.e2e
def test_up_ready_banner_names_token_command(gateway_system: GatewaySystem) -> None:
    banner = gateway_system.supervisor.stdout().split("tidings is ready:", 1)[1]

    assert "`tidings token` for a gateway bearer token" in banner
