"""Child processes of the benchmark: bare gRPC server, naive pipeline and an OTLP span counter.

Run as ``python -m bench.servers KIND ...``. Every server runs until SIGTERM
or SIGINT. Results go to the JSON file named by ``--result``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import nats
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# Body of a naive pipeline call and event: the caller's time.time_ns() at call
# start, a flag that is 0 for warm-up calls and 1 for measured ones, padding.
NAIVE_HEADER = struct.Struct(">Q?")
NAIVE_BODY_SIZE = 128
NAIVE_SERVICE = "tidings.bench.NaivePipeline"
NAIVE_METHOD = f"/{NAIVE_SERVICE}/Publish"

# Same fetch size as the Tidings consumer's default (TIDINGS_CONSUMER_BATCH_SIZE).
NAIVE_FETCH_BATCH = 64


def naive_body(measured: bool) -> bytes:
    """Return a naive pipeline request body stamped with the current wall-clock time."""
    header = NAIVE_HEADER.pack(time.time_ns(), measured)
    return header + bytes(NAIVE_BODY_SIZE - len(header))


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write result as JSON through a rename, so a reader sees the whole file or none."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, path)


def _stop_event() -> asyncio.Event:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    return stopping


async def serve_health(port: int) -> None:
    """Serve only grpc.health.v1.Health, SERVING, with no interceptors."""
    stopping = _stop_event()
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()

    await stopping.wait()
    await server.stop(1.0)


async def serve_naive(port: int, nats_url: str, subject: str) -> None:
    """Serve a method that publishes its request body to JetStream and returns after the ack."""
    stopping = _stop_event()
    connection = await nats.connect(nats_url, name="bench-naive-server", connect_timeout=5)
    js = connection.jetstream(timeout=10.0)

    async def publish(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        ack = await js.publish(subject, request)
        return int(ack.seq).to_bytes(8, "big")

    handler = grpc.method_handlers_generic_handler(
        NAIVE_SERVICE, {"Publish": grpc.unary_unary_rpc_method_handler(publish)}
    )
    health = HealthServicer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)

    await stopping.wait()
    await server.stop(1.0)
    await connection.close()


async def consume_naive(nats_url: str, stream: str, durable: str, expected: int, result: Path) -> None:
    """Read events from an existing durable pull consumer, ack each, time each measured one.

    Writes the result once expected events arrived (or at SIGTERM, with what
    arrived), then waits for SIGTERM.
    """
    stopping = _stop_event()
    connection = await nats.connect(nats_url, name="bench-naive-consumer", connect_timeout=5)
    subscription = await connection.jetstream().pull_subscribe_bind(durable=durable, stream=stream)

    received = 0
    latencies_ms: list[float] = []
    last_receive_ns = 0
    while received < expected and not stopping.is_set():
        try:
            messages = await subscription.fetch(NAIVE_FETCH_BATCH, timeout=1.0)
        except (NatsTimeoutError, TimeoutError):
            continue
        for message in messages:
            now = time.time_ns()
            start_ns, measured = NAIVE_HEADER.unpack_from(message.data)
            received += 1
            if measured:
                latencies_ms.append((now - start_ns) / 1e6)
                last_receive_ns = now
            await message.ack()

    write_result(result, {
        "received": received,
        "latencies_ms": latencies_ms,
        "last_receive_ns": last_receive_ns,
    })
    await stopping.wait()
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()
    await connection.close()


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC trace receiver that counts spans per service.name and drops them."""

    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self.requests = 0

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        for resource_spans in request.resource_spans:
            service = next(
                (attribute.value.string_value for attribute in resource_spans.resource.attributes
                 if attribute.key == "service.name"),
                "(unknown)",
            )
            self.spans[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def receive_spans(port: int, result: Path) -> None:
    """Receive OTLP trace exports until SIGTERM, then write the span counts."""
    stopping = _stop_event()
    counter = SpanCounter()
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()

    await stopping.wait()
    await server.stop(1.0)
    write_result(result, {"spans": dict(counter.spans), "export_requests": counter.requests})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    kinds = parser.add_subparsers(dest="kind", required=True)
    port_help = "TCP port on 127.0.0.1 to listen on"
    nats_help = "URL of the nats-server, such as nats://127.0.0.1:4222"
    result_help = "JSON file to write the result to"

    health = kinds.add_parser("health", help="bare grpc.aio health server")
    health.add_argument("--port", type=int, required=True, help=port_help)

    naive = kinds.add_parser("naive-server", help="gRPC method that awaits a JetStream publish")
    naive.add_argument("--port", type=int, required=True, help=port_help)
    naive.add_argument("--nats-url", required=True, help=nats_help)
    naive.add_argument("--subject", required=True, help="subject to publish each request body to")

    consumer = kinds.add_parser("naive-consumer", help="pull consumer of the naive pipeline")
    consumer.add_argument("--nats-url", required=True, help=nats_help)
    consumer.add_argument("--stream", required=True, help="stream of the durable consumer")
    consumer.add_argument("--durable", required=True, help="existing durable pull consumer to bind to")
    consumer.add_argument("--expected", type=int, required=True, help="events to read, warm-up included")
    consumer.add_argument("--result", type=Path, required=True, help=result_help)

    otlp = kinds.add_parser("otlp", help="OTLP/gRPC trace receiver that counts spans")
    otlp.add_argument("--port", type=int, required=True, help=port_help)
    otlp.add_argument("--result", type=Path, required=True, help=result_help)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the server named on the command line until SIGTERM."""
    options = _parser().parse_args(argv)
    if options.kind == "health":
        work = serve_health(options.port)
    elif options.kind == "naive-server":
        work = serve_naive(options.port, options.nats_url, options.subject)
    elif options.kind == "naive-consumer":
        work = consume_naive(
            options.nats_url, options.stream, options.durable, options.expected, options.result
        )
    else:
        work = receive_spans(options.port, options.result)
    try:
        asyncio.run(work)
    except Exception as exc:
        print(f"bench.servers {options.kind} failed: {exc!r}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
