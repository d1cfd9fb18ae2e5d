"""Token-bucket rate limiting per key, with a bounded number of buckets.

Pure logic with no I/O. The caller picks the key (such as caller and route)
and turns a positive wait from TokenBuckets.take into 429 with Retry-After.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from gateway.settings import GatewaySettings

# Tolerance for float rounding, so that a caller who waits exactly the time
# take() returned gets its token.
_EPSILON = 1e-9

# Maximum full buckets removed per take() call. Two is more than the one bucket
# a call can add, so the sweep keeps up with new keys and each call stays O(1).
_SWEEP_PER_CALL = 2


class TokenBuckets:
    """One token bucket per key: up to burst tokens, refilled at rate tokens per second.

    Buckets are kept in least-recently-used order. Each call drops the oldest
    buckets once they have refilled to burst, which loses nothing because a new
    bucket starts full. When max_keys buckets exist, the least recently used one is dropped
    even if it is not full. That key then gets a full burst again, which is
    the price of bounded memory under a flood of distinct keys.

    Not thread-safe: use one instance from one event loop.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create empty buckets.

        Args:
            rate: Tokens added per second, greater than 0.
            burst: Maximum tokens of a bucket, and the tokens a new key starts with.
            max_keys: Maximum number of buckets kept at once.
            clock: Monotonic time in seconds, replaceable in tests.
        """
        if rate <= 0:
            raise ValueError(f"rate must be greater than 0 tokens per second, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1 token, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")

        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        # key -> (tokens, time of the last update), oldest update first.
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_settings(
        cls,
        settings: GatewaySettings,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> TokenBuckets:
        """Create buckets with rate_limit_per_second and rate_limit_burst."""
        return cls(settings.rate_limit_per_second, settings.rate_limit_burst, max_keys=max_keys, clock=clock)

    def __len__(self) -> int:
        """Return the number of buckets currently stored."""
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        """Take one token from key's bucket.

        Returns:
            0.0 when a token was taken. Otherwise the seconds until the bucket
            has a token again, and nothing was taken.
        """
        now = self._clock()
        entry = self._buckets.get(key)
        if entry is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
            tokens = float(self._burst)
        else:
            tokens = self._refilled(entry, now)

        if tokens >= 1 - _EPSILON:
            tokens = max(tokens - 1, 0.0)
            wait = 0.0
        else:
            wait = (1 - tokens) / self._rate

        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._sweep(now)
        return wait

    def _refilled(self, entry: tuple[float, float], now: float) -> float:
        """Return the tokens of a stored bucket at time now, at most burst."""
        tokens, updated = entry
        # max() guards against a clock that steps back.
        elapsed = max(now - updated, 0.0)
        return min(tokens + elapsed * self._rate, float(self._burst))

    def _sweep(self, now: float) -> None:
        """Drop up to _SWEEP_PER_CALL of the oldest buckets that have refilled to burst."""
        for _ in range(_SWEEP_PER_CALL):
            if not self._buckets:
                return
            key, entry = next(iter(self._buckets.items()))
            if self._refilled(entry, now) < self._burst - _EPSILON:
                # This bucket still limits its key, so keep it. Scanning past
                # it for full buckets would make the call O(n).
                return
            del self._buckets[key]


def retry_after_header(seconds: float) -> str:
    """Return the Retry-After header value for a wait: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
