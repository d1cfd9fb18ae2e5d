"""The benchmark's CreateUser rounds: the median round per phase and the targets table."""

from __future__ import annotations

from bench.processes import ProcessUsage
from bench.report import rounds_table, targets_table, throughput_table
from bench.results import PhaseResult, measured_phases, median_rounds, round_key
from bench.stats import CallStats


def _phase(key: str, calls_per_s: float, *, failed: bool = False) -> PhaseResult:
    calls = CallStats(calls=1000, elapsed_s=1000 / calls_per_s, latencies_s=[0.01] * 1000)
    return PhaseResult(key, f"{key} title", calls=calls, error="broke" if failed else None)


def _rounds(key: str, *rates: float) -> dict[str, PhaseResult]:
    return {round_key(key, number): _phase(round_key(key, number), rate)
            for number, rate in enumerate(rates, start=1)}


def test_median_rounds_picks_middle_round() -> None:
    phases = _rounds("tidings-on", 700, 600, 650)

    chosen = median_rounds(phases, 3)

    assert chosen["tidings-on"] is phases["tidings-on#3"]


def test_median_rounds_even_count() -> None:
    phases = _rounds("tidings-off", 100, 400, 200, 300)

    chosen = median_rounds(phases, 4)

    assert chosen["tidings-off"] is phases["tidings-off#4"]


def test_median_rounds_ranks_failed_round_lowest() -> None:
    phases = _rounds("dual-write", 500, 510)
    phases["dual-write#3"] = _phase("dual-write#3", 9000, failed=True)

    chosen = median_rounds(phases, 3)

    assert chosen["dual-write"] is phases["dual-write#1"]


def test_median_rounds_keeps_round_entries() -> None:
    phases = _rounds("tidings-on", 700, 600, 650)

    chosen = median_rounds(phases, 3)

    assert all(key in chosen for key in phases)


def test_measured_phases_lists_median_round_once() -> None:
    phases = median_rounds({"grpc": _phase("grpc", 4000), **_rounds("tidings-on", 1, 2, 3)}, 3)

    keys = [phase.key for phase in measured_phases(phases)]

    assert keys == ["grpc", "tidings-on#1", "tidings-on#2", "tidings-on#3"]


def test_throughput_table_has_one_row_per_round() -> None:
    phases = median_rounds(_rounds("tidings-off", 700, 600, 650), 3)

    rows = throughput_table(phases)

    assert len(rows) == 1 + 3


def test_rounds_table_names_reported_round() -> None:
    phases = median_rounds(_rounds("tidings-on", 700, 600, 650), 3)

    rows = rounds_table(phases)

    assert rows[1] == ["tidings-on#3 title", "700", "600", "650", "round 3"]


def _targets(on: float, off: float, dual: float, rss_mib: float) -> dict[str, list[str]]:
    phases = {
        "naive": _phase("naive", 2000),
        "dual-write": _phase("dual-write", dual),
        "tidings-off": _phase("tidings-off", off),
        "tidings-on": _phase("tidings-on", on),
    }
    usage = [
        ProcessUsage("users (Tidings, tracing on)", 10, int(rss_mib * 1024), 1.0),
        ProcessUsage("nats-server (Tidings, tracing on)", 11, 500_000, 1.0),
    ]
    return {row[0]: row[1:] for row in targets_table(phases, usage)[1:]}


def _row(rows: dict[str, list[str]], start: str) -> list[str]:
    return next(cells for label, cells in rows.items() if label.startswith(start))


def test_targets_tracing_cost_met() -> None:
    rows = _targets(on=910, off=1000, dual=900, rss_mib=80)

    assert _row(rows, "tracing costs") == ["9.0 %", "yes"]


def test_targets_tracing_cost_not_met() -> None:
    rows = _targets(on=850, off=1000, dual=900, rss_mib=80)

    assert _row(rows, "tracing costs") == ["15.0 %", "no"]


def test_targets_against_dual_write_is_ratio() -> None:
    rows = _targets(on=850, off=1000, dual=800, rss_mib=80)

    assert _row(rows, "CreateUser, tracing on: calls/s at least those of the dual-write") == ["1.06x", "yes"]


def test_targets_rss_ignores_nats_server() -> None:
    rows = _targets(on=850, off=1000, dual=800, rss_mib=80)

    assert _row(rows, "each service process") == ["largest: 80.0 MiB, users (Tidings, tracing on)", "yes"]


def test_targets_rss_over_limit() -> None:
    rows = _targets(on=850, off=1000, dual=800, rss_mib=96)

    assert _row(rows, "each service process")[1] == "no"
