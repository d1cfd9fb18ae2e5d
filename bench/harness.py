"""`tidings bench`: run every phase once, print the tables and write the results page."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.gateway_path import RATE_LIMIT_PER_SECOND, measure_direct_get_user, measure_gateway_get_user
from bench.phases import Load, measure_grpc, measure_naive_pipeline, measure_nats_publish
from bench.processes import (
    ProcessSet,
    ProcessUsage,
    cpu_seconds,
    machine_busy_seconds,
    own_cpu_seconds,
    peak_rss_kib,
)
from bench.report import Report, invoked_command, render_markdown, render_text
from bench.results import PhaseResult, median_rounds, round_key
from bench.saga_path import (
    BUYER_TOP_UP_CENTS,
    BUYERS,
    DECLINED_EVERY,
    LINES_PER_ORDER,
    PRICE_CENTS,
    PRODUCTS,
    SHORT_WALLET_CENTS,
    SHORT_WALLET_USERS,
    STOCK_UNITS,
    measure_place_order,
)
from bench.servers import NAIVE_BODY_SIZE, NAIVE_FETCH_BATCH
from bench.tidings_path import BSP_SCHEDULE_DELAY_MS, measure_tidings

MAX_WARMUP_CALLS = 200
DEFAULT_ROUNDS = 3
# Share of traces recorded in the sampled CreateUser phase.
SAMPLED_SHARE = 0.1

Measure = Callable[[PhaseResult], Awaitable[None]]


def warmup_calls_for(calls: int) -> int:
    """Return the number of unmeasured warm-up calls per phase: a tenth of calls, 10 to MAX_WARMUP_CALLS."""
    return min(MAX_WARMUP_CALLS, max(10, calls // 10))


async def run_benchmark(
    *, calls: int, concurrency: int, output: str | None, rounds: int = DEFAULT_ROUNDS
) -> int:
    """Run every phase, print the tables and write the Markdown page to output.

    The CreateUser phases (dual write, tracing off, tracing on) run rounds
    times, interleaved, and the page reports the round with the median
    calls/s of each, because this machine's speed drifts from minute to
    minute. Every other phase runs once.

    Returns:
        0 when every phase finished without a failed call, 1 otherwise, 2 for
        invalid options.
    """
    problem = _check_options(calls, concurrency, output, rounds)
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return 2

    load = Load(calls=calls, concurrency=concurrency, warmup_calls=warmup_calls_for(calls))
    date = datetime.now(UTC)
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    busy_at_start, own_at_start = machine_busy_seconds(), own_cpu_seconds()
    try:
        phases, usage = await _run_with_sigterm_cancel(load, rounds)
    except BenchTerminated:
        print("bench: stopped by SIGTERM after stopping every process it started", file=sys.stderr)
        return 143
    own_cpu_s = own_cpu_seconds() - own_at_start
    harness = ProcessUsage(
        "harness (load generator, all phases)", os.getpid(), peak_rss_kib("self"), cpu_seconds("self")
    )
    report = Report(
        date=date,
        command=invoked_command(),
        calls=calls,
        concurrency=concurrency,
        warmup_calls=load.warmup_calls,
        run_seconds=time.monotonic() - started,
        phases=median_rounds({phase.key: phase for phase in phases}, rounds),
        usage=usage,
        harness=harness,
        load_average=(load_at_start, os.getloadavg()[0]),
        own_cpu_s=own_cpu_s,
        other_cpu_s=max(0.0, machine_busy_seconds() - busy_at_start - own_cpu_s),
    )

    print(render_text(report), flush=True)
    if output is not None:
        _write_page(Path(output), render_markdown(report, measurement_notes(load, rounds)))
        print(f"\nbench: wrote {output}", flush=True)
    return 0 if all(phase.ok for phase in phases) else 1


def _write_page(path: Path, text: str) -> None:
    path.write_text(text)


def _check_options(calls: int, concurrency: int, output: str | None, rounds: int) -> str | None:
    if rounds < 1:
        return f"invalid --rounds {rounds}: use 1 or more"
    if calls < 1:
        return f"invalid --calls {calls}: use 1 or more"
    if concurrency < 1:
        return f"invalid --concurrency {concurrency}: use 1 or more"
    if output is not None and not Path(output).resolve().parent.is_dir():
        return f"invalid --output {output}: directory {Path(output).resolve().parent} does not exist"
    return None


class BenchTerminated(Exception):
    """The harness received SIGTERM and stopped its children."""


async def _run_with_sigterm_cancel(
    load: Load, rounds: int
) -> tuple[list[PhaseResult], list[ProcessUsage]]:
    """Run the phases, and let SIGTERM cancel the run so that the finally blocks still stop every child.

    Raises:
        BenchTerminated: SIGTERM arrived during the run.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="tidings-bench-") as work:
            return await _run_phases(load, Path(work), rounds)
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise
        task.uncancel()
        raise BenchTerminated() from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _round_plan(
    processes: ProcessSet, load: Load, work_dir: Path, rounds: int
) -> list[tuple[PhaseResult, Measure]]:
    plan: list[tuple[PhaseResult, Measure]] = []
    for number in range(1, rounds + 1):
        suffix = f" (round {number} of {rounds})" if rounds > 1 else ""
        plan += [
            (PhaseResult(round_key("dual-write", number),
                         "dual-write CreateUser (same transaction, publish awaited per call)" + suffix),
             lambda result: measure_tidings(result, processes, load, work_dir, tracing=False,
                                            users_module="bench.dual_write", variant="dual write")),
            (PhaseResult(round_key("tidings-off", number), "Tidings CreateUser, tracing off" + suffix),
             lambda result: measure_tidings(result, processes, load, work_dir, tracing=False)),
            (PhaseResult(round_key("tidings-on", number), "Tidings CreateUser, tracing on" + suffix),
             lambda result: measure_tidings(result, processes, load, work_dir, tracing=True)),
            (PhaseResult(round_key("tidings-sampled", number),
                         f"Tidings CreateUser, tracing on, {SAMPLED_SHARE:.0%} of traces sampled" + suffix),
             lambda result: measure_tidings(result, processes, load, work_dir, tracing=True,
                                            sampled=SAMPLED_SHARE)),
        ]
    return plan


async def _run_phases(
    load: Load, work_dir: Path, rounds: int
) -> tuple[list[PhaseResult], list[ProcessUsage]]:
    processes = ProcessSet(work_dir)
    plan: list[tuple[PhaseResult, Measure]] = [
        (PhaseResult("grpc", "bare grpc.aio unary (Health/Check)"),
         lambda result: measure_grpc(result, processes, load)),
        (PhaseResult("nats", "bare JetStream publish + ack"),
         lambda result: measure_nats_publish(result, processes, load)),
        (PhaseResult("naive", "naive pipeline (grpc.aio → publish → pull consumer)"),
         lambda result: measure_naive_pipeline(result, processes, load, work_dir)),
        *_round_plan(processes, load, work_dir, rounds),
        (PhaseResult("saga-off", "Tidings PlaceOrder saga, tracing off"),
         lambda result: measure_place_order(result, processes, load, work_dir, tracing=False)),
        (PhaseResult("saga-on", "Tidings PlaceOrder saga, tracing on"),
         lambda result: measure_place_order(result, processes, load, work_dir, tracing=True)),
        (PhaseResult("get-user-grpc", "direct gRPC GetUser, tracing off"),
         lambda result: measure_direct_get_user(result, processes, load, work_dir)),
        (PhaseResult("gateway-off", "gateway GET /v1/users/{id}, tracing off"),
         lambda result: measure_gateway_get_user(result, processes, load, work_dir, tracing=False)),
        (PhaseResult("gateway-on", "gateway GET /v1/users/{id}, tracing on"),
         lambda result: measure_gateway_get_user(result, processes, load, work_dir, tracing=True)),
    ]
    try:
        for result, measure in plan:
            await _run_phase(result, measure, processes)
    finally:
        await processes.stop_all()
    return [result for result, _ in plan], processes.usage


async def _run_phase(result: PhaseResult, measure: Measure, processes: ProcessSet) -> None:
    """Run one phase and record a failure in the result, so the next phase still runs."""
    print(f"bench: measuring {result.title} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    busy_at_start, own_at_start = machine_busy_seconds(), own_cpu_seconds()
    try:
        await measure(result)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc} ({_failure_location(exc)})"
        print(f"bench: {result.title} failed: {result.error}", file=sys.stderr, flush=True)
    finally:
        # A failed phase can leave its processes running, and the next phase must start without them.
        await processes.stop_all()
    # Every child of the phase has been waited for, so own_cpu_seconds() includes its CPU time.
    own_cpu_s = own_cpu_seconds() - own_at_start
    result.other_cpu_s = max(0.0, machine_busy_seconds() - busy_at_start - own_cpu_s)
    print(f"bench: {result.title} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def _failure_location(exc: BaseException) -> str:
    """Return the innermost bench/ frame of the traceback, such as ``at bench/phases.py:120 in run``."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if Path(frame.filename).parent.name == "bench"]
    if not frames:
        return "outside bench/"
    frame = frames[-1]
    return f"at bench/{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def measurement_notes(load: Load, rounds: int = DEFAULT_ROUNDS) -> list[str]:
    """Return the page's explanation of each figure, with this run's settings filled in."""
    return [
        f"- **Targets**: the CreateUser phases run in {rounds} interleaved round(s) (dual write, "
        "tracing off, tracing on, sampled tracing, then again), and every CreateUser figure on this "
        "page is from each phase's round with the median calls/s. With an even number of rounds that is the "
        "faster of the two middle ones. The tracing cost is 1 - (tracing-on calls/s ÷ tracing-off "
        "calls/s). The RSS target is 100 MB (decimal) for every users, orders, inventory, payments, "
        "notifications and gateway process of the run, all rounds and phases included.",
        f"- **Load.** The harness process is the only client. {load.concurrency} workers each start "
        "their next call when the previous one returns (a closed loop), so the rate is what the "
        "system under test sustains with that many calls in flight. Each call is timed with "
        f"`time.perf_counter()` from just before the call until the response. Each phase first makes "
        f"{load.warmup_calls} warm-up calls that are not measured. calls/s is the number of measured "
        "calls that succeeded divided by the time from the first measured call's start to the last "
        "one's end. p50 and p99 use the nearest-rank method.",
        "- **bare grpc.aio unary**: `grpc.health.v1.Health/Check` on a grpc.aio server with no "
        "interceptors, in its own process. No database, no NATS: the ceiling of a Python grpc.aio "
        "client and server on this machine.",
        f"- **bare JetStream publish + ack**: nats-py in the harness publishes a {NAIVE_BODY_SIZE}-byte "
        "message to a file-storage stream on a nats-server of its own and awaits each ack. No gRPC. "
        "Every nats-server of this page runs with `sync_interval: always`, as `tidings up` runs it, "
        "so each acknowledged write is on disk; docs/GUARANTEE_COSTS.md measures what that costs.",
        "- **naive pipeline**: a grpc.aio server process whose handler publishes the "
        f"{NAIVE_BODY_SIZE}-byte request body to a file-storage stream and returns after the ack, and a "
        f"second process that reads the stream through a durable pull consumer (fetches of "
        f"{NAIVE_FETCH_BATCH}, an explicit ack per message). Its event latency runs from the "
        "harness's wall clock at call start (carried in the body) to the consumer's wall clock when "
        "it takes the message from the fetched batch. No database, no CloudEvents headers, no tracing.",
        "- **dual-write CreateUser**: the baseline the outbox replaces. `python -m bench.dual_write` "
        "is the users service with the same validation, transaction and request log, but without "
        "the outbox: after the commit the handler publishes the UserCreated event itself and awaits "
        "JetStream's ack before it returns. The real notifications service consumes the events, so "
        "its figures compare directly with the Tidings rows. It runs with tracing off, and unlike "
        "the outbox it loses the event when the process dies between the commit and the publish. "
        "Its `event_time` is taken after the commit, just before the publish.",
        "- **Tidings CreateUser**: the users and notifications services as processes, started as "
        "`tidings up` starts them (`python -m services.runtime.launch services.users.main`) with their "
        "SQLite files in a new data directory and a new nats-server per run. Each call creates a user "
        "with a unique email and a `request_id`, so one transaction checks the email, inserts the "
        "user, the outbox row and the request log row. The outbox relay publishes the event and the "
        "notifications consumer stores one notification per `UserCreated`. Before the measured calls "
        "the harness waits until the consumer acknowledged every warm-up event, so the measured run "
        "starts with an empty pipeline.",
        "- **event_time → notification create_time**: both stamped by the services. `event_time` is "
        "taken when CreateUser builds the event inside its transaction, and `create_time` when the "
        "notifications handler inserts the row, before its transaction commits. The span covers the "
        "rest of the CreateUser transaction, the relay's read, publish and ack, the consumer's fetch "
        "and the handler up to the insert.",
        "- **The two stages** split that latency at the time the nats-server stored the event, read back "
        "from the USERS stream after the run. The first stage covers the rest of the CreateUser "
        "transaction and its commit, then the relay's wait for the database connection, its read, the "
        "publish and the ack. The second covers the consumer's fetch and the handler up to the insert.",
        "- **call start (harness) → notification create_time** adds the call's path up to the "
        "handler. It is the figure to compare with the naive pipeline's event latency, which however "
        "ends at receipt, not at a stored row.",
        "- **pipeline events/s**: measured calls divided by the time from the first measured call's "
        "start until the last event was received (naive) or the last notification was stored "
        "(Tidings, the largest `create_time`). The harness detects completion from the consumer's "
        "ack floor and then reads every notification with ListNotifications, which is not timed.",
        "- **Tidings PlaceOrder saga**: the users, inventory, payments, orders and notifications "
        "services as processes (`python -m services.<name>.main`) with their SQLite files in a new data "
        "directory and a new nats-server per run, `TIDINGS_LOG_LEVEL=WARNING` and the other settings "
        f"at their defaults. The untimed set-up creates {BUYERS} buyers with CreateUser and tops up "
        f"each wallet with {BUYER_TOP_UP_CENTS:,} cents (TopUp), creates {SHORT_WALLET_USERS} users whose "
        f"wallets get {SHORT_WALLET_CENTS} cent, and creates {PRODUCTS} products at {PRICE_CENTS} cents "
        f"with {STOCK_UNITS:,} units each (CreateProduct). Each PlaceOrder call has a `request_id` and "
        f"orders 1 unit each of {LINES_PER_ORDER} products, {LINES_PER_ORDER * PRICE_CENTS} cents. Every "
        f"{DECLINED_EVERY}th call is placed by one of the users with {SHORT_WALLET_CENTS} cent, so "
        "inventory reserves the stock, payments declines, orders rejects the order with "
        "INSUFFICIENT_FUNDS and inventory releases the stock. The buyers place the other calls, and "
        "their wallets and the stock cover every such order, so those orders are CONFIRMED. "
        "PlaceOrder checks the user with GetUser on the users service, inserts the PENDING order with "
        "its `OrderPlaced` outbox row and returns, so calls/s and the call percentiles cover placement "
        "only. Before the measured calls the harness waits until the warm-up orders are terminal and "
        "every durable consumer of the five services is idle.",
        "- **terminal orders/s**: measured orders divided by the time from the first measured call's "
        "start until the latest `update_time` of a measured order. The harness reads no order during "
        "the run. It polls the ORDERS stream's per-subject counts every 0.1 s until the stream contains "
        "an `OrderConfirmed` or `OrderRejected` event for every order placed, which the orders service "
        "writes in the transaction that makes an order terminal. Then it reads every order with "
        "ListOrders, which is not timed.",
        "- **Order create_time → update_time**: both stamped by the orders service. `create_time` is "
        "taken when PlaceOrder inserts the order, and `update_time` when the transition to CONFIRMED "
        "or REJECTED runs its UPDATE, before that transaction commits. It covers the rest of the "
        "PlaceOrder transaction and every step of the saga in inventory, payments and orders.",
        "- **The five stages** of the confirmed orders split that time at the times the nats-server "
        "stored `OrderPlaced` (ORDERS stream), `StockReserved` (INVENTORY), `PaymentRequested` "
        "(ORDERS) and `PaymentCaptured` (PAYMENTS), read back from the streams after the run. The first "
        "stage covers the rest of the PlaceOrder transaction and the orders relay. Each later stage "
        "covers one consumer's fetch, its handler's transaction and commit, and that service's "
        "relay up to the ack, except the last, which ends at the UPDATE. Rejected orders are not in "
        "the stages.",
        "- **call start (harness) → Order update_time** adds the PlaceOrder call up to the insert. It "
        "is the figure to compare with the naive pipeline's event latency.",
        "- **direct gRPC GetUser**: the users service as a process (through the launcher, as above) "
        "with its SQLite file in a new data directory, a new nats-server, `TIDINGS_LOG_LEVEL=WARNING` "
        "and tracing off. Before the warm-up the harness creates one user with CreateUser, which is "
        "not timed. Every call then reads that user with GetUser over one grpc.aio channel: a read "
        "transaction and no event. The process gets a `TIDINGS_IDENTITY_SECRET`, as it does behind "
        "the gateway, but these calls carry no identity metadata, so it verifies none.",
        "- **gateway GET /v1/users/{id}**: the same users service and the gateway as a process "
        "(`python -m gateway.main`) with the same log level and tracing setting. The harness sends "
        f"every request through one `aiohttp.ClientSession` with at most {load.concurrency} "
        "keep-alive connections and one HS256 bearer token with the scope `users:read`, minted with "
        "`gateway.auth.mint_hs256_token`. A request is timed from just before `session.get` until "
        "its body is read, and every status other than 200 counts as a failed call. For each "
        "request the gateway verifies the token's signature and scope, takes a rate-limit token, "
        "builds the GetUserRequest, signs the caller's identity into the call metadata, calls the "
        "users service, which verifies that signature, and writes the response as JSON. The rate "
        f"limit refills {RATE_LIMIT_PER_SECOND:,} tokens per second and its burst covers every "
        "request of the phase, so it rejects none. One untimed request before the warm-up checks "
        "that the body contains the created user.",
        "- **HTTP gateway path against direct gRPC**: the ratios divide a gateway figure by the "
        "direct GetUser figure or the bare grpc.aio figure of the same run. The direct path runs "
        "with tracing off, so the tracing-on column includes the cost of tracing. CPU ms per measured "
        "call is each process's user plus system time from the end of the warm-up until the last "
        "measured call returned, divided by the measured calls. The harness row is the load "
        "generator's own process, which shares the CPUs with the processes it measures. The peak "
        "RSS is VmHWM, read just before the harness sent SIGTERM.",
        "- **Tracing on**: `OTEL_TRACES_EXPORTER=otlp` to an OTLP/gRPC receiver process that the "
        f"harness starts on loopback, which counts spans and drops them. `OTEL_BSP_SCHEDULE_DELAY="
        f"{BSP_SCHEDULE_DELAY_MS}` ms, and the other batch span processor settings are the SDK defaults. "
        "**Sampled tracing** adds `OTEL_TRACES_SAMPLER=parentbased_traceidratio` and "
        f"`OTEL_TRACES_SAMPLER_ARG={SAMPLED_SHARE}`: the users service records that share of the "
        "CreateUser traces, and the relay and the consumer follow its decision, which travels in "
        "`traceparent`. "
        "**Tracing off**: `OTEL_SDK_DISABLED=true`, so the gRPC interceptor, relay and consumer use "
        "the no-op tracer. The change column is (on - off) / off. The CPU ms per measured call is "
        "a service's user plus system time from the first measured call until the consumer "
        "acknowledged the last measured event, divided by the measured calls. For PlaceOrder the "
        "CPU time runs until every durable consumer was idle after the last measured order, so it also "
        "covers the work after the terminal state: the stock commit or release and the notification. "
        "It is less sensitive to other work on the machine than calls/s.",
        "- **Ratios**: the Tidings figure divided by the reference figure, measured in the same run. "
        "Below 1x on a throughput ratio means the Tidings path does less per second, and above 1x on "
        "a latency ratio means slower. A confirmed order's saga publishes five events through three "
        "services' relays (`OrderPlaced`, `StockReserved`, `PaymentRequested`, `PaymentCaptured`, "
        "`OrderConfirmed`) and consumers apply them six times, because inventory and notifications "
        "both apply `OrderConfirmed`. The naive pipeline publishes and reads one event per call.",
        "- **Peak RSS and CPU time**: VmHWM from `/proc/PID/status` and user plus system time from "
        "`/proc/PID/stat`, read just before the harness sent SIGTERM, so the CPU time covers start-up, "
        "warm-up and the measured calls. The harness's own figures are read at the end and cover every "
        "phase. CPU time of other processes is the machine's busy time from `/proc/stat` during the "
        "run (or phase) minus that of the harness and its children. It shows how much unrelated work "
        "shared the CPUs, and a phase with a large figure measured a busier machine.",
        "- **Limits**: the harness, servers, nats-server and the OTLP receiver all share this "
        "machine's CPUs, so the figures describe this machine under this load, not the capacity of a "
        "deployment. Phases other than the CreateUser rounds run once, so run the command again to see "
        "their spread between runs. "
        "Latencies that cross processes compare wall clocks of the same machine. An order that waits "
        "longer than the saga timeout (30 s by default) is rejected with TIMEOUT, and such orders "
        "appear in the final states and under failures and warnings.",
    ]
