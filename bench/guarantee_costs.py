"""What the JetStream settings behind the delivery guarantees cost in publish throughput.

``python -m bench.guarantee_costs --output docs/GUARANTEE_COSTS.md`` publishes
the same messages, each ack awaited and a fixed number in flight, to three
setups. They are a single server with its default disk sync, a single server
that syncs every write (`sync_interval: always`), and a three-node cluster
with three replicas that syncs every write.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from services.runtime.cli.embedded_nats import EmbeddedCluster, EmbeddedNats

BODY = b"x" * 256


async def _publish_rate(url: str, replicas: int, count: int, concurrency: int) -> float:
    client = await nats.connect(servers=url.split(","))
    try:
        js = client.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name="COST", subjects=["cost.>"], storage=StorageType.FILE,
                                         num_replicas=replicas))
        limit = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with limit:
                await js.publish(f"cost.{index % 16}", BODY)

        await asyncio.gather(*(one(index) for index in range(200)))
        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(count)))
        return count / (time.perf_counter() - started)
    finally:
        await client.close()


async def measure(count: int, concurrency: int) -> list[tuple[str, float]]:
    """Return (setup, publishes per second) for each setup."""
    results = []
    with tempfile.TemporaryDirectory(prefix="tidings-costs-") as scratch:
        for label, sync_always in (("1 server, default sync (every 2 min)", False),
                                   ("1 server, sync_interval: always", True)):
            server = EmbeddedNats(Path(scratch) / label.replace(" ", "-"), sync_always=sync_always)
            server.start()
            try:
                results.append((label, await _publish_rate(server.url, 1, count, concurrency)))
            finally:
                server.stop()
        cluster = EmbeddedCluster(Path(scratch) / "cluster", 3, sync_always=True)
        cluster.start()
        try:
            rate = await _publish_rate(cluster.url, 3, count, concurrency)
            results.append(("3-node cluster, R3 streams, sync_interval: always", rate))
        finally:
            cluster.stop()
    return results


def render(results: list[tuple[str, float]], command: str, count: int, concurrency: int) -> str:
    """Return the Markdown page for the results."""
    base = results[0][1]
    lines = [
        "# What the delivery guarantees cost",
        "",
        f"Written by `bench/guarantee_costs.py` from one run of `{command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, on this project's 2-CPU test machine. "
        "No figure is edited by hand.",
        "",
        f"{count} JetStream publishes of {len(BODY)} bytes to a file-storage stream, {concurrency} in "
        "flight, each awaiting its ack, from one nats-py client on the same machine (after 200 "
        "unmeasured ones).",
        "",
        "| setup | publishes/s | relative to the first row |",
        "|---|---|---|",
        *[f"| {label} | {rate:.0f} | {rate / base:.2f}x |" for label, rate in results],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure and print, or write, the page."""
    parser = argparse.ArgumentParser(prog="python -m bench.guarantee_costs", description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="measured publishes per setup")
    parser.add_argument("--concurrency", type=int, default=32, help="publishes in flight")
    parser.add_argument("--output", type=Path, help="Markdown file to write")
    options = parser.parse_args()
    results = asyncio.run(measure(options.count, options.concurrency))
    page = render(results, " ".join(["python -m bench.guarantee_costs", *sys.argv[1:]]),
                  options.count, options.concurrency)
    print(page)
    if options.output:
        options.output.write_text(page)


if __name__ == "__main__":
    main()
