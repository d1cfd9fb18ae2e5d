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


# The CreateUser phases that run once per round, in this order within a round.
ROUND_KEYS = ("dual-write", "tidings-off", "tidings-on", "tidings-sampled")


def round_key(key: str, round_number: int) -> str:
    """Return the key of one round of a CreateUser phase, such as ``tidings-on#2``."""
    return f"{key}#{round_number}"


def median_rounds(phases: dict[str, PhaseResult], rounds: int) -> dict[str, PhaseResult]:
    """Return phases with, under each CreateUser key, its round of median calls/s.

    With an even number of rounds this is the faster of the two middle ones.
    A failed round ranks below every finished one. The rounds stay under
    their own keys for the page's table of rounds.
    """
    chosen = dict(phases)
    for key in ROUND_KEYS:
        runs = [phases[round_key(key, number)] for number in range(1, rounds + 1)
                if round_key(key, number) in phases]
        if not runs:
            continue
        ranked = sorted(runs, key=lambda phase: phase.calls.calls_per_s if phase.ok and phase.calls else -1.0)
        chosen[key] = ranked[len(ranked) // 2]
    return chosen


def measured_phases(phases: dict[str, PhaseResult]) -> list[PhaseResult]:
    """Return each phase once: the rounds, but not the median round again under its phase's own key."""
    rounds = {id(phase) for key, phase in phases.items() if "#" in key}
    return [phase for key, phase in phases.items() if "#" in key or id(phase) not in rounds]
