"""Unit tests of gateway/ratelimit.py, with a fake clock in place of time."""

from __future__ import annotations

import pytest

from gateway.ratelimit import TokenBuckets, retry_after_header
from gateway.settings import GatewaySettings


class FakeClock:
    """Monotonic clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_ratelimit_burst_allowed(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)

    waits = [buckets.take("alice") for _ in range(3)]

    assert waits == [0.0, 0.0, 0.0]


def test_ratelimit_rejects_after_burst(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        buckets.take("alice")

    assert buckets.take("alice") > 0


def test_ratelimit_retry_after_empty_bucket(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=1, clock=clock)
    buckets.take("alice")

    assert buckets.take("alice") == pytest.approx(0.5)


def test_ratelimit_retry_after_partial_refill(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=1, clock=clock)
    buckets.take("alice")
    clock.advance(0.125)

    assert buckets.take("alice") == pytest.approx(0.375)


def test_ratelimit_refill_after_retry_after(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=3.0, burst=1, clock=clock)
    buckets.take("alice")
    wait = buckets.take("alice")
    clock.advance(wait)

    assert buckets.take("alice") == 0.0


def test_ratelimit_rejected_take_consumes_nothing(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=1, clock=clock)
    buckets.take("alice")
    buckets.take("alice")
    buckets.take("alice")
    clock.advance(0.5)

    assert buckets.take("alice") == 0.0


def test_ratelimit_refill_one_token_per_interval(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=5, clock=clock)
    for _ in range(5):
        buckets.take("alice")
    clock.advance(0.5)

    waits = [buckets.take("alice") for _ in range(2)]

    assert waits == [0.0, pytest.approx(0.5)]


def test_ratelimit_refill_capped_at_burst(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    buckets.take("alice")
    clock.advance(3600)

    waits = [buckets.take("alice") for _ in range(4)]

    assert waits[3] > 0


def test_ratelimit_keys_independent(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take("alice")

    assert buckets.take("bob") == 0.0


def test_ratelimit_other_key_keeps_limit(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take("alice")
    buckets.take("bob")

    assert buckets.take("alice") > 0


def test_ratelimit_tuple_keys(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    buckets.take(("alice", "GET /v1/users"))

    assert buckets.take(("alice", "POST /v1/users")) == 0.0


def test_ratelimit_memory_bound_many_keys(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=0.001, burst=10, max_keys=100, clock=clock)
    for index in range(10_000):
        buckets.take(f"caller-{index}")

    assert len(buckets) == 100


def test_ratelimit_evicts_least_recently_used(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=0.001, burst=1, max_keys=2, clock=clock)
    buckets.take("alice")
    buckets.take("bob")
    buckets.take("alice")
    buckets.take("carol")

    # bob's bucket was dropped, so bob starts again with a full bucket.
    assert buckets.take("bob") == 0.0


def test_ratelimit_recent_key_survives_eviction(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=0.001, burst=1, max_keys=2, clock=clock)
    buckets.take("alice")
    buckets.take("bob")
    buckets.take("alice")
    buckets.take("carol")

    assert buckets.take("alice") > 0


def test_ratelimit_sweeps_full_buckets(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, clock=clock)
    for index in range(1000):
        buckets.take(f"old-{index}")
    clock.advance(2.0)

    for index in range(500):
        buckets.take(f"new-{index}")

    # Each call drops two of the refilled old buckets and adds one new one.
    assert len(buckets) == 500


def test_ratelimit_keeps_buckets_not_refilled(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=1.0, burst=2, clock=clock)
    for index in range(10):
        buckets.take(f"old-{index}")
    clock.advance(0.5)

    buckets.take("new")

    assert len(buckets) == 11


def test_ratelimit_clock_step_back(clock: FakeClock) -> None:
    buckets = TokenBuckets(rate=2.0, burst=1, clock=clock)
    buckets.take("alice")
    clock.advance(-10.0)

    assert buckets.take("alice") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0, "burst": 1}, "rate must be greater than 0 tokens per second, got 0.0"),
        ({"rate": 1.0, "burst": 0}, "burst must be at least 1 token, got 0"),
        ({"rate": 1.0, "burst": 1, "max_keys": 0}, "max_keys must be at least 1, got 0"),
    ],
)
def test_ratelimit_invalid_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBuckets(**kwargs)  # type: ignore[arg-type]


def test_ratelimit_from_settings_burst(clock: FakeClock) -> None:
    settings = GatewaySettings(auth_enabled=False, rate_limit_per_second=4.0, rate_limit_burst=2)
    buckets = TokenBuckets.from_settings(settings, clock=clock)
    buckets.take("alice")
    buckets.take("alice")

    assert buckets.take("alice") > 0


def test_ratelimit_from_settings_rate(clock: FakeClock) -> None:
    settings = GatewaySettings(auth_enabled=False, rate_limit_per_second=4.0, rate_limit_burst=2)
    buckets = TokenBuckets.from_settings(settings, clock=clock)
    buckets.take("alice")
    buckets.take("alice")

    assert buckets.take("alice") == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (29.5, "30")],
)
def test_ratelimit_retry_after_header(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header
