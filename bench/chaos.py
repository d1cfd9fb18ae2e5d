"""Chaos scenarios: steady load on the real services while a fault hits, then every promise is checked.

Each scenario starts a nats-server and the five services as processes on
loopback, then places orders and changes users at a steady pace. A third of
the way in it injects one fault. Afterwards it checks that every order
reached a final state, that stock and money add up, and that no event was
lost or applied twice. ``python -m bench.chaos --size N --output PAGE`` runs them all
and writes a results page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats

from services.runtime.cli.embedded_nats import (
    EmbeddedCluster,
    EmbeddedNats,
    child_command,
    child_process_options,
    free_port,
)
from services.runtime.cli.supervisor import wait_until_ready_or_exit, wait_until_serving
from services.runtime.launch import service_command
from tidings.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc, product_pb2
from tidings.orders.v1 import order_pb2, order_service_pb2, order_service_pb2_grpc
from tidings.payments.v1 import payment_service_pb2, payment_service_pb2_grpc
from tidings.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

SERVICES = ("users", "inventory", "payments", "orders", "notifications")
SCENARIOS = ("nats-kill", "service-kill", "consumer-pause", "replica-kill", "cluster-node-kill")
# Subjects each durable consumer applies. This mirrors the ConsumerSpecs in
# services/*/main.py and must change with them.
CONSUMED: dict[str, tuple[str, ...]] = {
    "notifications-users": ("tidings.users.user.created", "tidings.users.user.updated",
                            "tidings.users.user.deleted"),
    "notifications-orders": ("tidings.orders.order.confirmed", "tidings.orders.order.rejected",
                             "tidings.orders.order.cancelled"),
    "inventory-orders": ("tidings.orders.order.placed", "tidings.orders.order.confirmed",
                         "tidings.orders.order.rejected", "tidings.orders.order.cancelled"),
    "payments-orders": ("tidings.orders.payment.requested", "tidings.orders.order.rejected",
                        "tidings.orders.order.cancelled"),
    "orders-inventory": ("tidings.inventory.stock.reserved", "tidings.inventory.stock.rejected"),
    "orders-payments": ("tidings.payments.payment.captured", "tidings.payments.payment.declined"),
}
TERMINAL = (order_pb2.ORDER_STATE_CONFIRMED, order_pb2.ORDER_STATE_REJECTED,
            order_pb2.ORDER_STATE_CANCELLED)
ACK_WAIT = 2.0
CALL_ATTEMPTS = 20


@dataclass
class Report:
    """Counts and check results of one scenario."""

    scenario: str
    calls: int = 0
    failed_calls: int = 0
    retried_calls: int = 0
    orders: int = 0
    states: Counter[str] = field(default_factory=Counter)
    events_committed: int = 0
    events_delivered: int = 0
    events_applied: int = 0
    duplicates_dropped: int = 0
    dead_lettered: int = 0
    lost: int = 0
    stall_recoveries: int = 0
    applied_twice: int = 0
    recovery_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def reliability(self) -> float:
        """1 - failed/total over client calls; retried calls that succeeded count as successes."""
        return 1 - self.failed_calls / self.calls if self.calls else 1.0


class System:
    """The nats-server and service processes of one scenario."""

    def __init__(self, work_dir: Path, clustered: bool = False) -> None:
        self.work_dir = work_dir
        self.clustered = clustered
        self.nats: EmbeddedNats | EmbeddedCluster = (
            EmbeddedCluster(work_dir / "cluster", 3) if clustered else EmbeddedNats(work_dir / "nats")
        )
        self.ports = {name: free_port() for name in SERVICES}
        self.ports["notifications-replica"] = free_port()
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def environment(self, name: str) -> dict[str, str]:
        """Return the environment of a service process."""
        service = name.removesuffix("-replica")
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("TIDINGS_", "OTEL_")) and k != "NATS_URL"}
        return {
            **inherited,
            "NATS_URL": self.nats.url,
            "TIDINGS_DATA_DIR": str(self.work_dir / "data"),
            "TIDINGS_LOG_LEVEL": "INFO",
            "TIDINGS_CONSUMER_ACK_WAIT": str(ACK_WAIT),
            # Below the ack wait, as the start-up check requires.
            "TIDINGS_CONSUMER_HANDLER_TIMEOUT": str(ACK_WAIT / 2),
            "TIDINGS_NATS_MONITOR_URL": self.monitor_url,
            "TIDINGS_SAGA_TIMEOUT": "60",
            "TIDINGS_STREAM_REPLICAS": "3" if self.clustered else "1",
            "OTEL_TRACES_EXPORTER": "none",
            **{f"TIDINGS_{other.upper()}_PORT": str(port)
               for other, port in self.ports.items() if other in SERVICES},
            f"TIDINGS_{service.upper()}_PORT": str(self.ports[name]),
        }

    @property
    def monitor_url(self) -> str:
        """Monitoring URL of the (first) nats-server, where the start-up check reads /varz."""
        if isinstance(self.nats, EmbeddedCluster):
            return self.nats.nodes[0].monitor_url
        return self.nats.monitor_url

    def address(self, name: str) -> str:
        """Return the gRPC address of a service process."""
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self, name: str) -> None:
        """Start a service process (name may be ``notifications-replica``) and wait until SERVING."""
        service = name.removesuffix("-replica")
        log = (self.work_dir / f"{name}.log").open("ab")
        self.processes[name] = await asyncio.create_subprocess_exec(
            *child_command(service_command(f"services.{service}.main")), env=self.environment(name),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, **child_process_options(),
        )
        problem = await wait_until_ready_or_exit(
            wait_until_serving(self.address(name)), self.processes[name], timeout=30
        )
        if problem is not None:
            tail = (self.work_dir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} {problem}:\n{tail}")

    async def kill(self, name: str) -> None:
        """Kill a service process with SIGKILL, as a crash would."""
        process = self.processes.pop(name)
        process.kill()
        await process.wait()

    async def stop_all(self) -> None:
        """Stop every service with SIGTERM (SIGKILL after 20 s), then the nats-server."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.processes.clear()
        self.nats.stop()

    def log_count(self, text: str) -> int:
        """Count the log lines of every service that contain text."""
        return sum(path.read_text(errors="replace").count(text) for path in self.work_dir.glob("*.log"))


class Load:
    """Places orders and changes users at a steady pace, retrying calls as a careful client would."""

    def __init__(self, system: System, report: Report, rng: random.Random) -> None:
        self.system = system
        self.report = report
        self.rng = rng
        self.order_ids: list[str] = []
        self.user_ids: list[str] = []
        self.product_ids: list[str] = []
        self.updates = 0

    async def call(self, method, request, attempts: int = CALL_ATTEMPTS):
        """Call with retries on UNAVAILABLE and timeouts; requests carry a request_id where they take one."""
        self.report.calls += 1
        for attempt in range(attempts):
            try:
                return await method(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if attempt == 0:
                    self.report.retried_calls += 1
                await asyncio.sleep(min(0.1 * 2 ** attempt, 1.0))
        self.report.failed_calls += 1
        return None

    async def setup(self, channels: dict[str, grpc.aio.Channel], users: int, products: int) -> None:
        """Create users with wallets and products with stock."""
        user_stub = user_service_pb2_grpc.UserServiceStub(channels["users"])
        payments = payment_service_pb2_grpc.PaymentServiceStub(channels["payments"])
        inventory = inventory_service_pb2_grpc.InventoryServiceStub(channels["inventory"])
        for index in range(users):
            created = await user_stub.CreateUser(user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email=f"chaos{index}@example.com", display_name=f"Chaos {index}")
            ))
            self.user_ids.append(created.user.id)
            await payments.TopUp(payment_service_pb2.TopUpRequest(
                user_id=created.user.id, amount_cents=2_000, request_id=f"topup-{index}"
            ))
        for index in range(products):
            created_product = await inventory.CreateProduct(inventory_service_pb2.CreateProductRequest(
                product=product_pb2.Product(name=f"Part {index}", price_cents=100 + 50 * index, stock=40)
            ))
            self.product_ids.append(created_product.product.id)

    async def order(self, orders: order_service_pb2_grpc.OrderServiceStub) -> None:
        """Place one order (retried with its request_id); cancel some."""
        request = order_service_pb2.PlaceOrderRequest(
            user_id=self.rng.choice(self.user_ids),
            line_items=[order_pb2.LineItem(product_id=self.rng.choice(self.product_ids),
                                           quantity=self.rng.randint(1, 3))],
            request_id=str(uuid.uuid4()),
        )
        response = await self.call(orders.PlaceOrder, request)
        if response is None:
            return
        self.order_ids.append(response.order.id)
        if self.rng.random() < 0.1:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.call(orders.CancelOrder, order_service_pb2.CancelOrderRequest(
                    id=response.order.id, request_id=str(uuid.uuid4())
                ))

    async def rename(self, users: user_service_pb2_grpc.UserServiceStub) -> None:
        """Change one user's display name (retried with its request_id)."""
        request = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=self.rng.choice(self.user_ids),
                               display_name=f"Renamed {uuid.uuid4().hex[:8]}"),
            request_id=str(uuid.uuid4()),
        )
        request.update_mask.paths.append("display_name")
        if await self.call(users.UpdateUser, request) is not None:
            self.updates += 1


async def run_scenario(scenario: str, size: int, work_dir: Path) -> Report:
    """Run one scenario with size calls of load and return its report."""
    report = Report(scenario)
    system = System(work_dir, clustered=scenario == "cluster-node-kill")
    system.nats.start()
    rng = random.Random(size)
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        for name in SERVICES:
            await system.start(name)
        if scenario == "replica-kill":
            await system.start("notifications-replica")
        channels = {name: grpc.aio.insecure_channel(system.address(name)) for name in SERVICES}
        load = Load(system, report, rng)
        await load.setup(channels, users=max(4, size // 20), products=3)

        recovered = await _drive_with_fault(scenario, system, load, channels, size)
        await _check(system, load, channels, report)
        report.recovery_seconds = recovered
    finally:
        for channel in channels.values():
            await channel.close()
        await system.stop_all()
    _count_events(system, report)
    return report


async def _drive_with_fault(
    scenario: str, system: System, load: Load, channels: dict[str, grpc.aio.Channel], size: int
) -> float:
    """Send size calls, 8 at a time; inject the fault after a third. Return seconds to recover."""
    orders = order_service_pb2_grpc.OrderServiceStub(channels["orders"])
    users = user_service_pb2_grpc.UserServiceStub(channels["users"])
    limit = asyncio.Semaphore(8)

    async def one(index: int) -> None:
        async with limit:
            if index % 4 == 3:
                await load.rename(users)
            else:
                await load.order(orders)

    first = [asyncio.create_task(one(index)) for index in range(size // 3)]
    await asyncio.gather(*first)
    rest = [asyncio.create_task(one(index)) for index in range(size // 3, size)]
    fault_started = time.monotonic()
    await _inject(scenario, system)
    recovered = time.monotonic() - fault_started
    await asyncio.gather(*rest)
    return recovered


async def _inject(scenario: str, system: System) -> None:
    """Apply one fault and undo it (restart or resume) after a short outage."""
    if scenario == "nats-kill":
        assert isinstance(system.nats, EmbeddedNats)
        system.nats.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(system.nats.start)
    elif scenario == "service-kill":
        await system.kill("inventory")
        await asyncio.sleep(1.0)
        await system.start("inventory")
    elif scenario == "consumer-pause":
        process = system.processes["payments"]
        process.send_signal(signal.SIGSTOP)
        # Longer than ack_wait, so JetStream redelivers what the paused consumer holds.
        await asyncio.sleep(ACK_WAIT * 2)
        process.send_signal(signal.SIGCONT)
    elif scenario == "replica-kill":
        await system.kill("notifications-replica")
    elif scenario == "cluster-node-kill":
        assert isinstance(system.nats, EmbeddedCluster)
        node = system.nats.nodes[0]
        node.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(node.start)
    else:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")


async def _check(system: System, load: Load, channels: dict[str, grpc.aio.Channel], report: Report) -> None:
    """Wait until every order is final, then check it against its stock and payment records."""
    orders = order_service_pb2_grpc.OrderServiceStub(channels["orders"])
    inventory = inventory_service_pb2_grpc.InventoryServiceStub(channels["inventory"])
    payments = payment_service_pb2_grpc.PaymentServiceStub(channels["payments"])
    report.orders = len(load.order_ids)

    deadline = time.monotonic() + 90
    final: list[order_pb2.Order] = []
    while time.monotonic() < deadline:
        final = [(await orders.GetOrder(order_service_pb2.GetOrderRequest(id=order_id))).order
                 for order_id in load.order_ids]
        if all(order.state in TERMINAL for order in final):
            break
        await asyncio.sleep(0.5)
    report.states = Counter(order_pb2.OrderState.Name(order.state) for order in final)
    open_orders = [order.id for order in final if order.state not in TERMINAL]
    if open_orders:
        report.problems.append(f"{len(open_orders)} orders not final after 90 s")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        products = [(await inventory.GetProduct(inventory_service_pb2.GetProductRequest(id=p))).product
                    for p in load.product_ids]
        if all(product.reserved == 0 for product in products):
            break
        await asyncio.sleep(0.5)
    confirmed_units: Counter[str] = Counter()
    charged: Counter[str] = Counter()
    for order in final:
        if order.state == order_pb2.ORDER_STATE_CONFIRMED:
            for line in order.line_items:
                confirmed_units[line.product_id] += line.quantity
            charged[order.user_id] += order.total_cents
    for product in products:
        if product.reserved != 0:
            report.problems.append(f"product {product.id} still has {product.reserved} reserved")
        if product.stock != 40 - confirmed_units[product.id]:
            report.problems.append(f"product {product.id}: stock {product.stock}, expected "
                                   f"{40 - confirmed_units[product.id]}")
    for user_id in load.user_ids:
        wallet = (await payments.GetWallet(payment_service_pb2.GetWalletRequest(user_id=user_id))).wallet
        if wallet.balance_cents < 0 or wallet.topped_up_cents != wallet.balance_cents + charged[user_id]:
            report.problems.append(f"wallet of {user_id}: balance {wallet.balance_cents}, topped up "
                                   f"{wallet.topped_up_cents}, charged {charged[user_id]}")

    report.problems += await _wait_until_consumed(system)
    report.problems += await _wait_until_applied(system)
    report.problems += await _stream_gaps(system)


async def _wait_until_consumed(system: System) -> list[str]:
    """Wait until every durable consumer has acknowledged everything in its stream."""
    client = await nats.connect(servers=system.nats.url.split(","))
    try:
        js = client.jetstream()
        deadline = time.monotonic() + 60
        waiting: dict[str, int] = {}
        while time.monotonic() < deadline:
            waiting = {}
            for stream in ("USERS", "ORDERS", "INVENTORY", "PAYMENTS"):
                try:
                    consumers = await js.consumers_info(stream)
                except nats.errors.TimeoutError:
                    # A cluster that is electing leaders returns no API reply for a while.
                    waiting[stream] = -1
                    continue
                for consumer in consumers:
                    pending = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
                    if pending:
                        waiting[consumer.name] = pending
            if not waiting:
                return []
            await asyncio.sleep(0.5)
        return [f"consumers still had unacknowledged events after 60 s: {waiting}"]
    finally:
        await client.close()


async def _wait_until_applied(system: System) -> list[str]:
    """Wait until every consumer's processed-events table lists every event it should apply.

    The server's pending counts are not enough: a consumer that the server
    stopped feeding reports nothing pending while events wait in the stream.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not _missing_events(system):
            return []
        await asyncio.sleep(0.5)
    return []  # _count_events reports what is still missing.


async def _stream_gaps(system: System) -> list[str]:
    """Compare the events each stream stores with the outbox rows marked sent for it."""
    owners = {"USERS": "users", "ORDERS": "orders", "INVENTORY": "inventory", "PAYMENTS": "payments"}
    client = await nats.connect(servers=system.nats.url.split(","))
    problems = []
    try:
        js = client.jetstream()
        for stream, service in owners.items():
            stored = (await js.stream_info(stream)).state.messages
            with sqlite3.connect(system.work_dir / "data" / f"{service}.sqlite3") as connection:
                query = "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"
                sent = connection.execute(query).fetchone()[0]
            if stored != sent:
                problems.append(f"stream {stream} stores {stored} events, but {sent} were acknowledged")
    finally:
        await client.close()
    return problems


def _committed_events(system: System) -> tuple[dict[str, str], int]:
    """Return the subject of every committed outbox event by event id, and how many are unsent."""
    subjects: dict[str, str] = {}
    unsent = 0
    for service in SERVICES:
        with sqlite3.connect(system.work_dir / "data" / f"{service}.sqlite3") as connection:
            rows = connection.execute("SELECT event_id, subject, sent_at IS NOT NULL FROM outbox").fetchall()
        subjects.update({event_id: subject for event_id, subject, _ in rows})
        unsent += sum(1 for _, _, sent in rows if not sent)
    return subjects, unsent


def _applied_events(system: System) -> Counter[tuple[str, str]]:
    """Count each (consumer, event id) in the processed-events tables."""
    applied: Counter[tuple[str, str]] = Counter()
    for service in ("inventory", "payments", "orders", "notifications"):
        with sqlite3.connect(system.work_dir / "data" / f"{service}.sqlite3") as connection:
            for consumer, event_id in connection.execute("SELECT consumer, event_id FROM processed_events"):
                applied[(consumer, event_id)] += 1
    return applied


def _expected_events(subjects: dict[str, str]) -> set[tuple[str, str]]:
    return {
        (consumer, event_id)
        for event_id, subject in subjects.items()
        for consumer, consumed in CONSUMED.items()
        if subject in consumed
    }


def _missing_events(system: System) -> set[tuple[str, str]]:
    subjects, _ = _committed_events(system)
    return _expected_events(subjects) - set(_applied_events(system))


def _count_events(system: System, report: Report) -> None:
    """Compare committed outbox rows with what each consumer recorded, from the SQLite files."""
    subjects, unsent = _committed_events(system)
    report.events_committed = len(subjects)
    report.events_delivered = len(subjects) - unsent

    applied = _applied_events(system)
    expected = _expected_events(subjects)
    report.events_applied = len(applied)
    report.applied_twice = sum(1 for count in applied.values() if count > 1)
    missing = expected - set(applied)
    report.lost = len(missing)
    for consumer, count in sorted(Counter(consumer for consumer, _ in missing).items()):
        report.problems.append(f"{consumer} did not apply {count} event(s)")
    report.duplicates_dropped = system.log_count('"duplicate event dropped"')
    report.stall_recoveries = system.log_count('"consumer stalled: ')
    report.dead_lettered = system.log_count('"event moved to the dead letters"')


def render(reports: list[Report], command: str) -> str:
    """Return the results page for the reports."""
    lines = [
        "# Tidings reliability results",
        "",
        f"Written by `bench/chaos.py` from one run of `{command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, on a machine with "
        f"{os.cpu_count()} CPUs. No figure is edited by hand.",
        "",
        "| scenario | client calls | failed | reliability | orders | final states | events committed "
        "| delivered | applied (consumer, event) | lost | applied twice | duplicates dropped "
        "| dead-lettered | stalled consumers restarted | fault to recovery s | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        states = ", ".join(f"{name.removeprefix('ORDER_STATE_').lower()} {count}"
                           for name, count in sorted(report.states.items()))
        lines.append(
            f"| {report.scenario} | {report.calls} | {report.failed_calls} | {report.reliability:.4f} "
            f"| {report.orders} | {states} | {report.events_committed} | {report.events_delivered} "
            f"| {report.events_applied} | {report.lost} | {report.applied_twice} "
            f"| {report.duplicates_dropped} | {report.dead_lettered} | {report.stall_recoveries} "
            f"| {report.recovery_seconds:.1f} "
            f"| {'; '.join(report.problems) or 'none'} |"
        )
    lines += ["", *_explanations()]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True, check=True, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return completed.stdout.strip()


def _explanations() -> list[str]:
    return [
        f"- **Settings** of every service: `TIDINGS_CONSUMER_ACK_WAIT={ACK_WAIT:g}` so that a paused "
        f"consumer's events are redelivered quickly, `TIDINGS_CONSUMER_HANDLER_TIMEOUT={ACK_WAIT / 2:g}`, "
        "`TIDINGS_SAGA_TIMEOUT=60`, tracing off (`OTEL_TRACES_EXPORTER=none`), SQLite, and "
        "nats-servers with `sync_interval: always`; *cluster-node-kill* uses three replicas per stream.",
        "- **Load**: PlaceOrder (a tenth of them cancelled right after) and UpdateUser calls, 8 in "
        "flight, each with a `request_id`. A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED "
        f"is retried with the same request id, up to {CALL_ATTEMPTS} times with backoff; "
        "*failed* counts calls that never succeeded, and reliability is 1 - failed/total.",
        "- **Faults** are injected after a third of the calls. *nats-kill* kills the nats-server "
        "with SIGKILL and restarts it on the same port and store after 1 s. *service-kill* kills "
        "the inventory service with SIGKILL and restarts it after 1 s. *consumer-pause* stops the "
        f"payments process with SIGSTOP for {2 * ACK_WAIT:.0f} s, twice its ack_wait, then resumes "
        "it. *replica-kill* runs two notifications replicas on one durable consumer and kills one "
        "with SIGKILL for good. *cluster-node-kill* runs a three-node cluster with three replicas "
        "per stream and kills one node with SIGKILL, restarting it after 1 s.",
        "- **events committed** counts outbox rows in every service database, **delivered** those "
        "marked sent after JetStream's ack. **lost** counts the (consumer, event) pairs that "
        "should have been applied, by each consumer's subjects, but are missing from that "
        "consumer's processed-events table after the system drained. **applied** counts "
        "(consumer, event id) rows in the processed-events "
        "tables, and **applied twice** the pairs recorded more than once (the table's primary key "
        "makes that impossible, so it must stay 0). **duplicates dropped** counts redeliveries "
        "that found their event already applied, from the services' logs.",
        "- **fault to recovery** is the time from the start of the fault until the system is "
        "back (the process restarted and SERVING, the server accepting connections, or the "
        "process resumed).",
        "- **Stalled consumers restarted** counts the times a service found its durable consumer "
        "stuck and requested a new consumer leader. A consumer is stuck when the stream contains "
        "events on its subjects past its delivered sequence while the server reports nothing pending. "
        "nats-server 2.15.1 does this in some *cluster-node-kill* runs, as docs/delivery.md explains.",
        "- Final states, stock and money are checked as in the saga invariant test: every order "
        "final, reserved stock back to 0, stock = start - confirmed units, and per user top-ups = "
        "balance + charges of confirmed orders.",
    ]


async def run_chaos(size: int, output: Path | None, scenarios: list[str]) -> int:
    """Run the scenarios, print the results page and write it to output; return the exit code."""
    reports = []
    for scenario in scenarios:
        with tempfile.TemporaryDirectory(prefix=f"tidings-chaos-{scenario}-") as scratch:
            print(f"chaos: running {scenario} with {size} calls ...", file=sys.stderr, flush=True)
            reports.append(await run_scenario(scenario, size, Path(scratch)))
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    page = render(reports, command)
    print(page)
    if output is not None:
        await asyncio.to_thread(output.write_text, page)
    return 1 if any(report.problems or report.lost or report.applied_twice for report in reports) else 0


def main() -> None:
    """Run the chaos scenarios from the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--size", type=int, default=400, help="client calls per scenario (default 400)")
    parser.add_argument("--output", type=Path, help="Markdown file to write the results to")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this scenario; repeat for several (default: all)")
    options = parser.parse_args()
    scenarios = options.scenario or list(SCENARIOS)
    raise SystemExit(asyncio.run(run_chaos(options.size, options.output, scenarios)))


if __name__ == "__main__":
    main()
