"""Reference phases: bare grpc.aio unary calls, bare JetStream publishes and the naive pipeline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from bench.processes import Child, ProcessSet, child_environment, free_ports
from bench.results import PhaseResult
from bench.servers import NAIVE_BODY_SIZE, NAIVE_FETCH_BATCH, NAIVE_METHOD, naive_body
from bench.stats import CallStats, drive_calls, summarize_ms

CALL_TIMEOUT = 10.0
RAW_PAYLOAD = bytes(NAIVE_BODY_SIZE)


@dataclass(frozen=True)
class Load:
    """How many calls a phase makes and how many are in flight at once."""

    calls: int
    concurrency: int
    warmup_calls: int

    def timeout_for(self, count: int) -> float:
        """Return the time bound of count calls: 60 s plus 50 ms per call."""
        return 60.0 + 0.05 * count

    async def run(
        self,
        call: Callable[[int], Awaitable[object]],
        *,
        measured_offset: int = 0,
        after_warmup: Callable[[], Awaitable[None]] | None = None,
    ) -> CallStats:
        """Make the warm-up calls, await after_warmup, make the measured calls and return their stats.

        call gets the call's index. Warm-up calls get indexes from 0 and
        measured calls from measured_offset, which a caller sets to the
        warm-up count when both need distinct indexes.
        """
        warmup = await drive_calls(
            call, count=self.warmup_calls, concurrency=self.concurrency,
            timeout=self.timeout_for(self.warmup_calls),
        )
        if warmup.errors:
            raise RuntimeError(f"{warmup.errors} of {warmup.calls} warm-up calls failed. First failure: "
                               f"{warmup.first_error}")
        if after_warmup is not None:
            await after_warmup()

        async def measured_call(index: int) -> object:
            return await call(measured_offset + index)

        return await drive_calls(
            measured_call, count=self.calls, concurrency=self.concurrency,
            timeout=self.timeout_for(self.calls),
        )


async def measure_grpc(result: PhaseResult, processes: ProcessSet, load: Load) -> None:
    """Measure Health.Check calls on a grpc.aio server with no interceptors, in its own process."""
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    server = await processes.start_python(
        "grpc health server", ["-m", "bench.servers", "health", "--port", str(port)],
        child_environment({}),
    )
    await server.wait_until_serving(address)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()

        async def check(_: int) -> object:
            return await stub.Check(request, timeout=CALL_TIMEOUT)

        result.calls = await load.run(check)
    await processes.stop(server)


async def measure_nats_publish(result: PhaseResult, processes: ProcessSet, load: Load) -> None:
    """Measure JetStream publishes from this process, each awaiting its ack."""
    server = await processes.start_nats("nats-server (raw publish)")
    connection = await nats.connect(server.url, name="bench-raw-publish", connect_timeout=5)
    try:
        js = connection.jetstream(timeout=CALL_TIMEOUT)
        await js.add_stream(
            StreamConfig(name="BENCH_RAW", subjects=["bench.raw"], storage=StorageType.FILE)
        )

        async def publish(_: int) -> object:
            return await js.publish("bench.raw", RAW_PAYLOAD)

        result.calls = await load.run(publish)
    finally:
        await connection.close()
    await processes.stop(server)


async def measure_naive_pipeline(
    result: PhaseResult, processes: ProcessSet, load: Load, work_dir: Path
) -> None:
    """Measure a grpc.aio method that awaits a JetStream publish, read by a pull consumer process."""
    server = await processes.start_nats("nats-server (naive pipeline)")
    stream, durable = "BENCH_NAIVE", "bench-naive"
    await _create_naive_stream(server.url, stream, durable)

    result_file = work_dir / "naive-consumer.json"
    expected = load.warmup_calls + load.calls
    consumer = await processes.start_python(
        "naive consumer",
        ["-m", "bench.servers", "naive-consumer", "--nats-url", server.url, "--stream", stream,
         "--durable", durable, "--expected", str(expected), "--result", str(result_file)],
        child_environment({}),
    )
    [port] = free_ports(1)
    address = f"127.0.0.1:{port}"
    naive_server = await processes.start_python(
        "naive grpc server",
        ["-m", "bench.servers", "naive-server", "--port", str(port), "--nats-url", server.url,
         "--subject", "bench.naive.events"],
        child_environment({}),
    )
    await naive_server.wait_until_serving(address)

    async with grpc.aio.insecure_channel(address) as channel:
        publish_call = channel.unary_unary(NAIVE_METHOD)

        async def call(index: int) -> object:
            return await publish_call(naive_body(measured=index >= load.warmup_calls),
                                      timeout=CALL_TIMEOUT)

        result.calls = await load.run(call, measured_offset=load.warmup_calls)

    consumed = await wait_for_result(consumer, result_file, load.timeout_for(expected))
    if consumed["received"] < expected:
        raise RuntimeError(f"naive consumer received {consumed['received']} of {expected} events")
    result.event_latency = summarize_ms(consumed["latencies_ms"])
    first_start_ns = min(result.calls.start_wall_ns)
    result.pipeline_per_s = load.calls / ((consumed["last_receive_ns"] - first_start_ns) / 1e9)

    await processes.stop(naive_server)
    await processes.stop(consumer)
    await processes.stop(server)


async def _create_naive_stream(url: str, stream: str, durable: str) -> None:
    connection = await nats.connect(url, name="bench-naive-setup", connect_timeout=5)
    try:
        js = connection.jetstream()
        await js.add_stream(
            StreamConfig(name=stream, subjects=["bench.naive.events"], storage=StorageType.FILE)
        )
        # The same delivery settings as the Tidings consumer (services/runtime/consumer.py).
        await js.add_consumer(stream, ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=max(1000, NAIVE_FETCH_BATCH * 4),
        ))
    finally:
        await connection.close()


async def wait_for_result(child: Child, path: Path, timeout: float) -> dict[str, Any]:
    """Wait until a child wrote its JSON result file and return it."""
    try:
        async with asyncio.timeout(timeout):
            while (data := _read_result(path)) is None:
                if child.process.returncode is not None:
                    raise RuntimeError(f"no result in {path.name}: {child.describe_failure()}")
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise RuntimeError(
            f"no result in {path.name} within {timeout:.0f}s: {child.describe_failure()}"
        ) from None
    return data


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data
