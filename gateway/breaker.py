"""Circuit breaker per backend, so the gateway fails fast while a backend is down.

Pure logic with no I/O apart from logging state changes. The caller asks
allow() before a backend call and reports the outcome with record_success()
or record_failure(), using counts_as_failure() to classify gRPC status codes.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import grpc

logger = logging.getLogger(__name__)

# Codes that mean the backend is down, overloaded or broken. Other codes,
# such as NOT_FOUND or PERMISSION_DENIED, describe the request and show that
# the backend processed it.
_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def counts_as_failure(code: grpc.StatusCode) -> bool:
    """Return whether a call that ended with code counts against the backend's breaker."""
    return code in _FAILURE_CODES


class BreakerState(enum.Enum):
    """State of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Breaker that opens after consecutive failures and probes with one trial call.

    CLOSED lets every call through. failure_threshold consecutive failures
    open it. OPEN rejects calls for reset_timeout seconds. The first allow()
    after that moves it to HALF_OPEN and lets one trial call through. The
    trial's success closes the breaker, and its failure reopens it for another
    reset_timeout. Outcomes recorded while OPEN come from calls started
    before it opened and are ignored.

    Not thread-safe: use one instance from one event loop.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        name: str,
    ) -> None:
        """Create a closed breaker.

        Args:
            failure_threshold: Consecutive failures that open the breaker, at least 1.
            reset_timeout: Seconds an open breaker rejects calls before a trial,
                greater than 0. Also the time after which a trial that never
                reported its outcome stops blocking the next one.
            clock: Monotonic time in seconds, replaceable in tests.
            name: Backend name written to the log with each state change.
        """
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if reset_timeout <= 0:
            raise ValueError(f"reset_timeout must be greater than 0 seconds, got {reset_timeout}")

        self.name = name
        self._failure_threshold = failure_threshold
        self._reset_timeout = reset_timeout
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        # Start time of the trial call in HALF_OPEN, or None when no trial runs.
        self._trial_started_at: float | None = None

    @property
    def state(self) -> BreakerState:
        """Current state. OPEN turns into HALF_OPEN only in allow(), not by time alone."""
        return self._state

    def allow(self) -> bool:
        """Return whether a call may go to the backend now, and count it as the trial if HALF_OPEN."""
        if self._state is BreakerState.CLOSED:
            return True

        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self._reset_timeout:
                return False
            self._state = BreakerState.HALF_OPEN
            logger.info(
                "circuit breaker half-open, letting one trial call through", extra={"breaker": self.name}
            )
            self._trial_started_at = now
            return True

        # HALF_OPEN lets one trial through at a time. A trial whose caller never recorded an
        # outcome (for example a cancelled request) frees the slot after
        # reset_timeout, so the breaker cannot stay half-open for ever.
        if self._trial_started_at is not None and now < self._trial_started_at + self._reset_timeout:
            return False
        self._trial_started_at = now
        return True

    def record_success(self) -> None:
        """Record a call that the backend completed, including one that returned a client error code."""
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
        elif self._state is BreakerState.HALF_OPEN:
            self._close()

    def record_failure(self) -> None:
        """Record a call that failed with a code for which counts_as_failure() is true."""
        if self._state is BreakerState.OPEN:
            return
        self._consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN or self._consecutive_failures >= self._failure_threshold:
            self._open()

    def release(self) -> None:
        """Free the HALF_OPEN trial slot for a call that ended without an outcome.

        Call it when the call was cancelled or raised something other than a
        gRPC error, so the next allow() can start a new trial at once. The state
        and the failure count do not change.
        """
        # NOTE: the breaker does not track which call holds the trial slot, so a
        # non-trial call released while HALF_OPEN frees the slot too.
        if self._state is BreakerState.HALF_OPEN:
            self._trial_started_at = None

    def retry_after(self) -> float:
        """Return the seconds until allow() lets a call through again, 0.0 if it would now.

        In HALF_OPEN with a trial running, this is the time until that trial's
        slot expires. That is an upper bound because the trial usually ends sooner.
        """
        if self._state is BreakerState.CLOSED:
            return 0.0

        now = self._clock()
        if self._state is BreakerState.OPEN:
            return max(self._opened_at + self._reset_timeout - now, 0.0)
        if self._trial_started_at is None:
            return 0.0
        return max(self._trial_started_at + self._reset_timeout - now, 0.0)

    def _open(self) -> None:
        reopened = self._state is BreakerState.HALF_OPEN
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._trial_started_at = None
        message = "circuit breaker reopened, trial call failed" if reopened else "circuit breaker opened"
        logger.warning(
            message,
            extra={
                "breaker": self.name,
                "consecutive_failures": self._consecutive_failures,
                "reset_timeout": self._reset_timeout,
            },
        )

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._trial_started_at = None
        logger.info("circuit breaker closed, trial call succeeded", extra={"breaker": self.name})
