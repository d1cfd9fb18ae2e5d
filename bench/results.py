"""Result records of the benchmark phases."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.stats import CallStats, Latency


@dataclass
class PhaseResult:
    """Measurements of one phase. Fields that a phase does not measure stay None.

    Attributes:
        key: Short identifier, such as ``grpc`` or ``tidings-off``.
        title: Row label in the results tables.
        calls: The measured calls (warm-up excluded).
        event_latency: End-to-end event latency as the phase defines it.
        start_to_stored: From call start in the harness until the event's
            effect was stored (Tidings path only).
        event_stages: Parts of the event latency (CreateUser) or of the time
            to a terminal state (PlaceOrder), as (from → to, latency).
        pipeline_per_s: Measured calls divided by the time from the first
            call's start until the last event was received or stored, or
            until the last order reached a terminal state (PlaceOrder).
        terminal_latency: Order create_time → update_time of the measured
            orders in a terminal state (PlaceOrder only).
        start_to_terminal: From call start in the harness until the order's
            update_time in a terminal state (PlaceOrder only).
        outcomes: Measured orders per final state and rejection reason
            (PlaceOrder only).
        cpu_ms_per_call: CPU time of each service process per measured call,
            in milliseconds (Tidings services and the GetUser phases, which
            also record the harness's own CPU time).
        peak_rss_kib: Peak resident set size (VmHWM) of each service process,
            read just before it was stopped (GetUser phases only).
        other_cpu_s: CPU time that processes not started by the harness used
            during the phase.
        spans: Spans received by the OTLP receiver, per service.name.
        error: Why the phase failed, or None.
    """

    key: str
    title: str
    calls: CallStats | None = None
    event_latency: Latency | None = None
    start_to_stored: Latency | None = None
    event_stages: list[tuple[str, Latency | None]] = field(default_factory=list)
    pipeline_per_s: float | None = None
    terminal_latency: Latency | None = None
    start_to_terminal: Latency | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_call: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    other_cpu_s: float | None = None
    spans: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the phase ran to the end with no failed call."""
        return self.error is None and self.calls is not None and self.calls.errors == 0
