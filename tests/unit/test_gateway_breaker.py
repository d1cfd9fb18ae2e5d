"""Unit tests of gateway/breaker.py, with a fake clock in place of time."""

from __future__ import annotations

import logging

import grpc
import pytest

from gateway.breaker import BreakerState, CircuitBreaker, counts_as_failure


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


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock, name="users")


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure()


def _open_then_wait(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Open the breaker and let its reset timeout pass."""
    _fail(breaker, 3)
    clock.advance(5.0)


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "gateway.breaker"]


def test_breaker_starts_closed(breaker: CircuitBreaker) -> None:
    assert breaker.state is BreakerState.CLOSED


def test_breaker_closed_allows(breaker: CircuitBreaker) -> None:
    assert breaker.allow()


def test_breaker_stays_closed_below_threshold(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)

    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_after_threshold(breaker: CircuitBreaker) -> None:
    _fail(breaker, 3)

    assert breaker.state is BreakerState.OPEN


def test_breaker_success_resets_failure_count(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    breaker.record_success()
    _fail(breaker, 2)

    assert breaker.state is BreakerState.CLOSED


def test_breaker_threshold_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock, name="users")
    breaker.record_failure()

    assert breaker.state is BreakerState.OPEN


def test_breaker_open_fails_fast(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _fail(breaker, 3)
    clock.advance(4.9)

    assert not breaker.allow()


def test_breaker_open_retry_after(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _fail(breaker, 3)
    clock.advance(2.0)

    assert breaker.retry_after() == pytest.approx(3.0)


def test_breaker_closed_retry_after_zero(breaker: CircuitBreaker) -> None:
    assert breaker.retry_after() == 0.0


def test_breaker_open_ignores_late_failures(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _fail(breaker, 3)
    clock.advance(4.0)
    # A call started before the breaker opened fails now, and the timeout must not restart.
    breaker.record_failure()
    clock.advance(1.0)

    assert breaker.allow()


def test_breaker_open_ignores_late_success(breaker: CircuitBreaker) -> None:
    _fail(breaker, 3)
    breaker.record_success()

    assert breaker.state is BreakerState.OPEN


def test_breaker_half_open_after_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()

    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_stays_open_until_allow(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)

    assert breaker.state is BreakerState.OPEN


def test_breaker_half_open_allows_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)

    assert breaker.allow()


def test_breaker_half_open_rejects_second_call(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()

    assert not breaker.allow()


def test_breaker_half_open_one_trial_of_many(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)

    allowed = [breaker.allow() for _ in range(10)]

    assert allowed.count(True) == 1


def test_breaker_half_open_retry_after(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    clock.advance(1.0)

    assert breaker.retry_after() == pytest.approx(4.0)


def test_breaker_half_open_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.record_success()

    assert breaker.state is BreakerState.CLOSED


def test_breaker_closed_after_trial_allows(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.record_success()

    allowed = [breaker.allow() for _ in range(3)]

    assert allowed == [True, True, True]


def test_breaker_closed_after_trial_needs_threshold(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.record_success()
    _fail(breaker, 2)

    assert breaker.state is BreakerState.CLOSED


def test_breaker_half_open_failure_reopens(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.record_failure()

    assert breaker.state is BreakerState.OPEN


def test_breaker_reopen_fresh_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    clock.advance(1.0)
    breaker.record_failure()
    clock.advance(4.9)

    assert not breaker.allow()


def test_breaker_reopen_retry_after(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    clock.advance(1.0)
    breaker.record_failure()

    assert breaker.retry_after() == pytest.approx(5.0)


def test_breaker_reopen_then_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.record_failure()
    clock.advance(5.0)

    assert breaker.allow()


def test_breaker_abandoned_trial_expires(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    # The trial's caller never records an outcome, e.g. the request was cancelled.
    clock.advance(5.0)

    assert breaker.allow()


def test_breaker_release_frees_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.release()

    assert breaker.allow()


def test_breaker_release_keeps_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.release()

    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_release_retry_after_zero(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _open_then_wait(breaker, clock)
    breaker.allow()
    breaker.release()

    assert breaker.retry_after() == 0.0


def test_breaker_release_keeps_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    _fail(breaker, 3)
    breaker.release()

    assert not breaker.allow()


def test_breaker_release_keeps_failure_count(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    breaker.release()
    _fail(breaker, 1)

    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize("threshold", [0, -1])
def test_breaker_invalid_threshold(threshold: int) -> None:
    with pytest.raises(ValueError, match=f"failure_threshold must be at least 1, got {threshold}"):
        CircuitBreaker(failure_threshold=threshold, reset_timeout=1.0, name="users")


def test_breaker_invalid_reset_timeout() -> None:
    with pytest.raises(ValueError, match="reset_timeout must be greater than 0 seconds, got 0"):
        CircuitBreaker(failure_threshold=1, reset_timeout=0.0, name="users")


def test_breaker_logs_open_once(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _fail(breaker, 3)
    breaker.record_failure()
    breaker.allow()

    assert [record.levelno for record in _records(caplog)] == [logging.WARNING]


def test_breaker_logs_name_field(breaker: CircuitBreaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _fail(breaker, 3)

    assert getattr(_records(caplog)[0], "breaker", None) == "users"


def test_breaker_logs_close_info(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _open_then_wait(breaker, clock)
    breaker.allow()
    caplog.clear()
    breaker.record_success()
    breaker.record_success()

    assert [record.message for record in _records(caplog)] == ["circuit breaker closed, trial call succeeded"]


def test_breaker_logs_close_level(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _open_then_wait(breaker, clock)
    breaker.allow()
    caplog.clear()
    breaker.record_success()

    assert _records(caplog)[0].levelno == logging.INFO


def test_breaker_logs_reopen_warning(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _open_then_wait(breaker, clock)
    breaker.allow()
    caplog.clear()
    breaker.record_failure()

    assert [(record.levelno, record.message) for record in _records(caplog)] == [
        (logging.WARNING, "circuit breaker reopened, trial call failed")
    ]


def test_breaker_logs_half_open_once(
    breaker: CircuitBreaker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.breaker")
    _open_then_wait(breaker, clock)
    caplog.clear()
    breaker.allow()
    breaker.allow()

    assert [(record.levelno, record.message) for record in _records(caplog)] == [
        (logging.INFO, "circuit breaker half-open, letting one trial call through")
    ]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_breaker_server_errors_count(code: grpc.StatusCode) -> None:
    assert counts_as_failure(code)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ],
)
def test_breaker_client_errors_do_not_count(code: grpc.StatusCode) -> None:
    assert not counts_as_failure(code)


def test_breaker_client_errors_keep_closed(breaker: CircuitBreaker) -> None:
    # The caller records a call that ended with a client error as a success,
    # which breaks the run of consecutive failures.
    unavailable = grpc.StatusCode.UNAVAILABLE
    codes = [unavailable, unavailable, grpc.StatusCode.NOT_FOUND, unavailable, unavailable]
    for code in codes:
        assert breaker.allow()
        if counts_as_failure(code):
            breaker.record_failure()
        else:
            breaker.record_success()

    assert breaker.state is BreakerState.CLOSED
