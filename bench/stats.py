"""Closed-loop load driver and latency percentiles."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Latency:
    """Percentiles of one latency sample, in milliseconds (nearest-rank method)."""

    count: int
    p50_ms: float
    p99_ms: float


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize_ms(values_ms: Sequence[float]) -> Latency | None:
    """Return p50 and p99 of values in milliseconds, or None for an empty sample."""
    if not values_ms:
        return None
    ordered = sorted(values_ms)
    return Latency(len(ordered), percentile(ordered, 0.50), percentile(ordered, 0.99))


@dataclass
class CallStats:
    """Outcome of one measured batch of calls.

    Attributes:
        calls: Calls started.
        elapsed_s: Seconds from the first call's start to the last call's end.
        latencies_s: Duration of each call by index, None for a failed call.
        start_wall_ns: ``time.time_ns()`` at the start of each call, for
            comparison with timestamps taken by other processes on this machine.
        errors: Number of failed calls.
        first_error: repr of the first failure, or None.
    """

    calls: int
    elapsed_s: float = 0.0
    latencies_s: list[float | None] = field(default_factory=list)
    start_wall_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    @property
    def succeeded(self) -> int:
        """Number of calls that returned without an exception."""
        return self.calls - self.errors

    @property
    def calls_per_s(self) -> float:
        """Successful calls per second of elapsed time."""
        return self.succeeded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def latency(self) -> Latency | None:
        """p50 and p99 of the successful calls."""
        return summarize_ms([value * 1000 for value in self.latencies_s if value is not None])


async def drive_calls(
    call: Callable[[int], Awaitable[object]], *, count: int, concurrency: int, timeout: float
) -> CallStats:
    """Run call(0) … call(count - 1) with at most concurrency in flight and time each one.

    Each of the concurrency workers starts its next call as soon as its previous
    one returns (a closed loop), so the rate is what the system sustains.

    Raises:
        TimeoutError: The whole batch took longer than timeout seconds.
    """
    stats = CallStats(calls=count, latencies_s=[None] * count, start_wall_ns=[0] * count)
    indexes = iter(range(count))

    async def worker() -> None:
        # Workers share one iterator, and next() runs without an await, so no index is taken twice.
        for index in indexes:
            stats.start_wall_ns[index] = time.time_ns()
            started = time.perf_counter()
            try:
                await call(index)
            except Exception as exc:
                stats.errors += 1
                if stats.first_error is None:
                    stats.first_error = f"{exc!r} in call {index}"
                continue
            stats.latencies_s[index] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    except TimeoutError:
        finished = sum(value is not None for value in stats.latencies_s) + stats.errors
        raise TimeoutError(
            f"{finished} of {count} calls finished within the {timeout:.0f}s bound"
        ) from None
    stats.elapsed_s = time.perf_counter() - started
    return stats
