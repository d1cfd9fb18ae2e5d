"""Results page of the benchmark: machine facts, tables, ratios and what each number measures."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.processes import ProcessUsage
from bench.results import ROUND_KEYS, PhaseResult, measured_phases, round_key
from bench.stats import Latency
from services.runtime.cli.embedded_nats import nats_server_binary
from services.runtime.errors import ConfigurationError

PACKAGES = ("grpcio", "nats-py", "opentelemetry-sdk", "SQLAlchemy", "aiosqlite", "protobuf")

Table = list[list[str]]


@dataclass
class Report:
    """Everything the results page shows about one run."""

    date: datetime
    command: str
    calls: int
    concurrency: int
    warmup_calls: int
    run_seconds: float
    phases: dict[str, PhaseResult]
    usage: list[ProcessUsage]
    harness: ProcessUsage
    load_average: tuple[float, float]
    own_cpu_s: float
    other_cpu_s: float


def invoked_command() -> str:
    """Return the command line this process was started with, as a user would type it."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = "python -m bench"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def source_revision() -> str:
    """Return the git commit of the project and whether tracked files had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (git failed: {exc})"
    return f"{commit} with uncommitted changes to tracked files" if status.strip() else commit


def machine_facts() -> list[list[str]]:
    """Return rows of CPU, memory, OS, Python and package versions of this machine."""
    rows = [
        ["CPUs available (nproc)", str(len(os.sched_getaffinity(0)))],
        ["CPU model", _cpu_model()],
        ["memory", _memory_total()],
        ["OS", platform.platform()],
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
    ]
    for package in PACKAGES:
        try:
            rows.append([package, importlib.metadata.version(package)])
        except importlib.metadata.PackageNotFoundError:
            rows.append([package, "not installed"])
    rows.append(["nats-server", _nats_server_version()])
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _nats_server_version() -> str:
    try:
        completed = subprocess.run(
            [str(nats_server_binary()), "--version"], capture_output=True, text=True, timeout=10
        )
    except (ConfigurationError, OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return completed.stdout.strip().removeprefix("nats-server: ") or "unknown"


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "n/a"
    ratio = numerator / denominator
    # Two significant digits below 0.1x, so that a small ratio does not print as 0.00x.
    return f"{ratio:.2g}x" if ratio < 0.1 else f"{ratio:.2f}x"


def _change(off: float | None, on: float | None) -> str:
    if off is None or on is None or not off:
        return "n/a"
    return f"{(on - off) / off * 100:+.1f} %"


def _percentiles(latency: Latency | None) -> list[str]:
    if latency is None:
        return ["n/a", "n/a"]
    return [_number(latency.p50_ms), _number(latency.p99_ms)]


def _calls_per_s(phase: PhaseResult | None) -> float | None:
    return phase.calls.calls_per_s if phase and phase.calls else None


def _call_p50(phase: PhaseResult | None) -> float | None:
    latency = phase.calls.latency if phase and phase.calls else None
    return latency.p50_ms if latency else None


def _p50(latency: Latency | None) -> float | None:
    return latency.p50_ms if latency else None


def throughput_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of calls per second, call latency and failures per phase."""
    rows = [["phase", "calls/s", "call p50 ms", "call p99 ms", "failed calls", "other processes' CPU s"]]
    for phase in measured_phases(phases):
        other_cpu = _number(phase.other_cpu_s)
        if phase.calls is None:
            rows.append([phase.title, "failed", "", "", "", other_cpu])
            continue
        rows.append([
            phase.title, _number(phase.calls.calls_per_s), *_percentiles(phase.calls.latency),
            f"{phase.calls.errors} of {phase.calls.calls}", other_cpu,
        ])
    return rows


def rounds_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of calls/s per round of each CreateUser phase and the round the page reports."""
    rounds = sorted({int(key.partition("#")[2]) for key in phases if "#" in key})
    rows = [["phase", *(f"round {number} calls/s" for number in rounds), "reported round"]]
    for key in ROUND_KEYS:
        reported = phases.get(key)
        if reported is None:
            continue
        runs = {number: phases.get(round_key(key, number)) for number in rounds}
        cells = [_number(_calls_per_s(phase)) for phase in runs.values()]
        chosen = next((f"round {number}" for number, phase in runs.items() if phase is reported), "")
        rows.append([_base_title(reported.title), *cells, chosen])
    return rows


def _base_title(title: str) -> str:
    return title.split(" (round ", 1)[0]


# Peak resident memory allowed for each service process: 100 MB (decimal), in KiB.
MAX_SERVICE_RSS_KIB = 100_000_000 // 1024
MAX_TRACING_COST_PERCENT = 10.0
SERVICE_PROCESSES = ("users", "orders", "inventory", "payments", "notifications", "gateway")


def targets_table(phases: dict[str, PhaseResult], usage: Sequence[ProcessUsage]) -> Table:
    """Return rows of the benchmark targets, each with its measured value and whether it is met."""
    dual, off, on, naive = (phases.get(key) for key in ("dual-write", "tidings-off", "tidings-on", "naive"))
    rows = [["target", "measured", "met"]]

    def at_least_one(value: float | None, denominator: float | None) -> list[str]:
        if value is None or not denominator:
            return ["n/a", "n/a"]
        return [_ratio(value, denominator), "yes" if value >= denominator else "no"]

    rows.append(["CreateUser, tracing on: calls/s at least those of the dual-write baseline "
                 "(same service, event published and awaited in each call, tracing off)",
                 *at_least_one(_calls_per_s(on), _calls_per_s(dual))])
    rows.append(["CreateUser, tracing on: calls/s at least those of the naive pipeline "
                 "(no protobuf, no validation, no database)",
                 *at_least_one(_calls_per_s(on), _calls_per_s(naive))])

    tracing_target = f"tracing costs at most {MAX_TRACING_COST_PERCENT:.0f} % of CreateUser calls/s"
    calls_off, calls_on = _calls_per_s(off), _calls_per_s(on)
    if calls_off and calls_on is not None:
        cost = (1 - calls_on / calls_off) * 100
        rows.append([tracing_target, f"{cost:.1f} %", "yes" if cost <= MAX_TRACING_COST_PERCENT else "no"])
    else:
        rows.append([tracing_target, "n/a", "n/a"])

    services = [process for process in usage
                if process.process.split(" ", 1)[0] in SERVICE_PROCESSES and process.peak_rss_kib is not None]
    if services:
        largest = max(services, key=lambda process: process.peak_rss_kib or 0)
        assert largest.peak_rss_kib is not None
        rows.append([f"each service process under 100 MB ({MAX_SERVICE_RSS_KIB / 1024:.1f} MiB) peak RSS",
                     f"largest: {_mib(largest.peak_rss_kib)} MiB, {largest.process}",
                     "yes" if largest.peak_rss_kib < MAX_SERVICE_RSS_KIB else "no"])
    return rows


def event_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of end-to-end event latency and pipeline throughput."""
    rows = [["phase", "from → to", "p50 ms", "p99 ms", "pipeline events/s"]]
    naive = phases.get("naive")
    if naive is not None:
        rows.append([naive.title, "call start (harness) → event received (consumer)",
                     *_percentiles(naive.event_latency), _number(naive.pipeline_per_s)])
    for key in ("dual-write", "tidings-off", "tidings-on"):
        phase = phases.get(key)
        if phase is None:
            continue
        rows.append([phase.title, "event_time → notification create_time",
                     *_percentiles(phase.event_latency), _number(phase.pipeline_per_s)])
        for stage, latency in phase.event_stages:
            rows.append([phase.title, stage, *_percentiles(latency), ""])
        rows.append([phase.title, "call start (harness) → notification create_time",
                     *_percentiles(phase.start_to_stored), ""])
    return rows


def saga_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of the PlaceOrder path's time to a terminal state and its orders per second."""
    rows = [["phase", "from → to", "p50 ms", "p99 ms", "terminal orders/s"]]
    for key in ("saga-off", "saga-on"):
        phase = phases.get(key)
        if phase is None:
            continue
        rows.append([phase.title, "Order create_time → update_time (CONFIRMED or REJECTED)",
                     *_percentiles(phase.terminal_latency), _number(phase.pipeline_per_s)])
        for stage, latency in phase.event_stages:
            rows.append([phase.title, f"confirmed orders: {stage}", *_percentiles(latency), ""])
        rows.append([phase.title, "call start (harness) → Order update_time (terminal)",
                     *_percentiles(phase.start_to_terminal), ""])
    return rows


def _outcome_lines(phases: dict[str, PhaseResult]) -> list[str]:
    lines = []
    for key in ("saga-off", "saga-on"):
        phase = phases.get(key)
        if phase is None or not phase.outcomes:
            continue
        counts = ", ".join(f"{outcome} {count}" for outcome, count in phase.outcomes.items())
        lines.append(f"- {phase.title}: {counts}.")
    if not lines:
        return []
    return ["", "Final state of the measured orders, read with ListOrders after the run:", "", *lines]


def ratio_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of CreateUser-path figures divided by the reference figures."""
    grpc, publish, naive = phases.get("grpc"), phases.get("nats"), phases.get("naive")
    dual = phases.get("dual-write")
    rows = [["ratio", "tracing off", "tracing on"]]
    definitions = [
        ("CreateUser calls/s ÷ dual-write calls/s",
         lambda tidings: _ratio(_calls_per_s(tidings), _calls_per_s(dual))),
        ("pipeline events/s ÷ dual-write pipeline events/s",
         lambda tidings: _ratio(tidings.pipeline_per_s if tidings else None,
                                dual.pipeline_per_s if dual else None)),
        ("CreateUser calls/s ÷ bare grpc.aio calls/s",
         lambda tidings: _ratio(_calls_per_s(tidings), _calls_per_s(grpc))),
        ("CreateUser calls/s ÷ bare JetStream publishes/s",
         lambda tidings: _ratio(_calls_per_s(tidings), _calls_per_s(publish))),
        ("CreateUser calls/s ÷ naive pipeline calls/s",
         lambda tidings: _ratio(_calls_per_s(tidings), _calls_per_s(naive))),
        ("pipeline events/s ÷ naive pipeline events/s",
         lambda tidings: _ratio(tidings.pipeline_per_s if tidings else None,
                                naive.pipeline_per_s if naive else None)),
        ("CreateUser call p50 ÷ naive call p50 (above 1x: slower)",
         lambda tidings: _ratio(_call_p50(tidings), _call_p50(naive))),
        ("call start → stored p50 ÷ naive call start → received p50 (above 1x: slower)",
         lambda tidings: _ratio(_p50(tidings.start_to_stored) if tidings else None,
                                _p50(naive.event_latency) if naive else None)),
    ]
    for label, compute in definitions:
        rows.append([label, compute(phases.get("tidings-off")), compute(phases.get("tidings-on"))])
    return rows


def saga_ratio_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows of PlaceOrder-path figures divided by the reference figures."""
    grpc, publish, naive = phases.get("grpc"), phases.get("nats"), phases.get("naive")
    rows = [["ratio", "tracing off", "tracing on"]]
    definitions = [
        ("PlaceOrder calls/s ÷ bare grpc.aio calls/s",
         lambda saga, _: _ratio(_calls_per_s(saga), _calls_per_s(grpc))),
        ("PlaceOrder calls/s ÷ bare JetStream publishes/s",
         lambda saga, _: _ratio(_calls_per_s(saga), _calls_per_s(publish))),
        ("PlaceOrder calls/s ÷ naive pipeline calls/s",
         lambda saga, _: _ratio(_calls_per_s(saga), _calls_per_s(naive))),
        ("terminal orders/s ÷ naive pipeline events/s",
         lambda saga, _: _ratio(saga.pipeline_per_s if saga else None,
                                naive.pipeline_per_s if naive else None)),
        ("terminal orders/s ÷ CreateUser pipeline events/s (same tracing setting)",
         lambda saga, create_user: _ratio(saga.pipeline_per_s if saga else None,
                                          create_user.pipeline_per_s if create_user else None)),
        ("PlaceOrder call p50 ÷ naive call p50 (above 1x: slower)",
         lambda saga, _: _ratio(_call_p50(saga), _call_p50(naive))),
        ("call start → terminal p50 ÷ naive call start → received p50 (above 1x: slower)",
         lambda saga, _: _ratio(_p50(saga.start_to_terminal) if saga else None,
                                _p50(naive.event_latency) if naive else None)),
    ]
    for label, compute in definitions:
        rows.append([
            label,
            compute(phases.get("saga-off"), phases.get("tidings-off")),
            compute(phases.get("saga-on"), phases.get("tidings-on")),
        ])
    return rows


def gateway_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows comparing GetUser over gRPC with GET /v1/users/{id} through the gateway."""
    grpc, direct = phases.get("grpc"), phases.get("get-user-grpc")
    columns = [direct, phases.get("gateway-off"), phases.get("gateway-on")]
    rows = [["measure", "direct gRPC GetUser, tracing off", "gateway, tracing off", "gateway, tracing on"]]

    def through_gateway(compute: Callable[[PhaseResult | None], str]) -> list[str]:
        # The direct column is the reference of these ratios, so it stays empty.
        return ["", *(compute(phase) for phase in columns[1:])]

    def mib(phase: PhaseResult | None, process: str) -> str:
        kib = phase.peak_rss_kib.get(process) if phase else None
        return _mib(kib) if kib is not None else "n/a"

    rows += [
        ["calls/s (requests/s through the gateway)", *(_number(_calls_per_s(phase)) for phase in columns)],
        ["p50 ms", *(_number(_latency_of(phase, "p50_ms")) for phase in columns)],
        ["p99 ms", *(_number(_latency_of(phase, "p99_ms")) for phase in columns)],
        ["requests/s ÷ direct gRPC GetUser calls/s",
         *through_gateway(lambda phase: _ratio(_calls_per_s(phase), _calls_per_s(direct)))],
        ["calls/s ÷ bare grpc.aio calls/s",
         *(_ratio(_calls_per_s(phase), _calls_per_s(grpc)) for phase in columns)],
        ["p50 ÷ direct gRPC GetUser p50 (above 1x: slower)",
         *through_gateway(lambda phase: _ratio(_latency_of(phase, "p50_ms"), _latency_of(direct, "p50_ms")))],
        ["p99 ÷ direct gRPC GetUser p99 (above 1x: slower)",
         *through_gateway(lambda phase: _ratio(_latency_of(phase, "p99_ms"), _latency_of(direct, "p99_ms")))],
    ]
    for process in ("gateway", "users", "harness"):
        rows.append([f"{process} CPU ms per measured call",
                     *(_number(phase.cpu_ms_per_call.get(process) if phase else None) for phase in columns)])
    for process in ("gateway", "users"):
        rows.append([f"{process} peak RSS (VmHWM) MiB", *(mib(phase, process) for phase in columns)])
    return rows


def _latency_of(phase: PhaseResult | None, pick: str) -> float | None:
    latency = phase.calls.latency if phase and phase.calls else None
    return getattr(latency, pick) if latency else None


def _change_rows(measures: list[tuple[str, float | None, float | None]]) -> Table:
    rows = [["measure", "tracing off", "tracing on", "change with tracing on"]]
    for label, value_off, value_on in measures:
        rows.append([label, _number(value_off), _number(value_on), _change(value_off, value_on)])
    return rows


def _cpu_measures(
    off: PhaseResult | None, on: PhaseResult | None, services: Sequence[str], unit: str
) -> list[tuple[str, float | None, float | None]]:
    return [
        (f"{service} CPU ms per measured {unit}",
         off.cpu_ms_per_call.get(service) if off else None,
         on.cpu_ms_per_call.get(service) if on else None)
        for service in services
    ]


def tracing_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows comparing the CreateUser path with tracing off, on, and on for a sample of traces."""
    off, on, sampled = (phases.get(key) for key in ("tidings-off", "tidings-on", "tidings-sampled"))

    def measures(phase: PhaseResult | None) -> list[float | None]:
        return [
            _calls_per_s(phase), _latency_of(phase, "p50_ms"), _latency_of(phase, "p99_ms"),
            phase.pipeline_per_s if phase else None, _p50(phase.event_latency) if phase else None,
            *(phase.cpu_ms_per_call.get(service) if phase else None
              for service in ("users", "notifications")),
        ]

    labels = [
        "CreateUser calls/s", "CreateUser call p50 ms", "CreateUser call p99 ms", "pipeline events/s",
        "event latency p50 ms", "users CPU ms per measured call", "notifications CPU ms per measured call",
    ]
    rows = [["measure", "tracing off", "tracing on", "change with tracing on",
             "tracing on, sampled", "change with sampled tracing"]]
    for label, value_off, value_on, value_sampled in zip(
        labels, measures(off), measures(on), measures(sampled), strict=True
    ):
        rows.append([label, _number(value_off), _number(value_on), _change(value_off, value_on),
                     _number(value_sampled), _change(value_off, value_sampled)])
    return rows


def saga_tracing_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows comparing the PlaceOrder path with tracing off and on."""
    off, on = phases.get("saga-off"), phases.get("saga-on")
    measures = [
        ("PlaceOrder calls/s", _calls_per_s(off), _calls_per_s(on)),
        ("PlaceOrder call p50 ms", _latency_of(off, "p50_ms"), _latency_of(on, "p50_ms")),
        ("PlaceOrder call p99 ms", _latency_of(off, "p99_ms"), _latency_of(on, "p99_ms")),
        ("terminal orders/s", off.pipeline_per_s if off else None, on.pipeline_per_s if on else None),
        ("create_time → terminal update_time p50 ms", _p50(off.terminal_latency) if off else None,
         _p50(on.terminal_latency) if on else None),
        *_cpu_measures(off, on, ("users", "inventory", "payments", "orders", "notifications"), "order"),
    ]
    return _change_rows(measures)


def gateway_tracing_table(phases: dict[str, PhaseResult]) -> Table:
    """Return rows comparing GET /v1/users/{id} through the gateway with tracing off and on."""
    off, on = phases.get("gateway-off"), phases.get("gateway-on")
    measures = [
        ("gateway GET /v1/users/{id} requests/s", _calls_per_s(off), _calls_per_s(on)),
        ("gateway GET p50 ms", _latency_of(off, "p50_ms"), _latency_of(on, "p50_ms")),
        ("gateway GET p99 ms", _latency_of(off, "p99_ms"), _latency_of(on, "p99_ms")),
        *_cpu_measures(off, on, ("gateway", "users"), "call"),
    ]
    return _change_rows(measures)


def usage_table(usage: Sequence[ProcessUsage], harness: ProcessUsage) -> Table:
    """Return rows of peak RSS and CPU time per process, the harness last."""
    rows = [["process", "PID", "peak RSS (VmHWM) MiB", "CPU s"]]
    for process in [*usage, harness]:
        cpu = f"{process.cpu_s:.2f}" if process.cpu_s is not None else "unknown"
        rows.append([process.process, str(process.pid), _mib(process.peak_rss_kib), cpu])
    return rows


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f}" if kib is not None else "unknown"


def format_table(rows: Table) -> list[str]:
    """Format rows as a Markdown pipe table with padded columns, the first row as header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return [line(rows[0]), separator, *(line(row) for row in rows[1:])]


def _span_lines(phases: dict[str, PhaseResult]) -> list[str]:
    lines = []
    for key in ("tidings-on", "tidings-sampled", "saga-on", "gateway-on"):
        phase = phases.get(key)
        if phase is None or phase.spans is None:
            continue
        counts = ", ".join(f"{service}: {count}" for service, count in sorted(phase.spans.items()))
        lines += ["", f"Spans received by the OTLP receiver in {phase.title}: {counts or 'none'}."]
    return lines


def result_sections(report: Report) -> list[tuple[str, list[str]]]:
    """Return the headings and lines of the measurement sections, shared by terminal and page."""
    tracing_lines = [
        *format_table(tracing_table(report.phases)),
        "",
        *format_table(saga_tracing_table(report.phases)),
        "",
        *format_table(gateway_tracing_table(report.phases)),
        *_span_lines(report.phases),
    ]
    sections = [
        ("Targets", format_table(targets_table(report.phases, report.usage))),
        ("Throughput and call latency", format_table(throughput_table(report.phases))),
        ("CreateUser rounds", format_table(rounds_table(report.phases))),
        ("End-to-end event latency", format_table(event_table(report.phases))),
        ("Order saga: time to a terminal state",
         format_table(saga_table(report.phases)) + _outcome_lines(report.phases)),
        ("CreateUser path against the references", format_table(ratio_table(report.phases))),
        ("PlaceOrder path against the references", format_table(saga_ratio_table(report.phases))),
        ("HTTP gateway path against direct gRPC", format_table(gateway_table(report.phases))),
        ("Tracing cost", tracing_lines),
        ("Peak RSS and CPU time per process", format_table(usage_table(report.usage, report.harness))),
    ]
    problems = [
        f"- {phase.title}: {message}"
        for phase in measured_phases(report.phases)
        for message in ([f"failed: {phase.error}"] if phase.error else []) + phase.notes
    ]
    problems += [
        f"- {phase.title}: {phase.calls.errors} calls failed. First failure: {phase.calls.first_error}"
        for phase in measured_phases(report.phases)
        if phase.calls is not None and phase.calls.errors
    ]
    if problems:
        sections.append(("Failures and warnings", problems))
    return sections


def render_text(report: Report) -> str:
    """Return the measurement tables for the terminal."""
    lines: list[str] = []
    for heading, body in result_sections(report):
        lines += ["", heading, *body]
    return "\n".join(lines)


def render_markdown(report: Report, notes: Sequence[str]) -> str:
    """Return the results page: run, machine, measurement sections and notes."""
    run_rows = [
        ["setting", "value"],
        ["date", report.date.strftime("%Y-%m-%d %H:%M:%S UTC")],
        ["command", f"`{report.command}`"],
        ["source (git)", source_revision()],
        ["measured calls per phase", str(report.calls)],
        ["concurrency (calls in flight)", str(report.concurrency)],
        ["warm-up calls per phase (not measured)", str(report.warmup_calls)],
        ["run time", f"{report.run_seconds:.0f} s"],
        ["1-minute load average at start / end", "{:.2f} / {:.2f}".format(*report.load_average)],
        ["CPU time of the harness and its children", f"{report.own_cpu_s:.1f} s"],
        ["CPU time of other processes on this machine during the run", f"{report.other_cpu_s:.1f} s"],
    ]
    lines = [
        "# Tidings benchmark results",
        "",
        "Written by `bench/harness.py` from one run of the command below. No figure is edited by hand.",
        "Run the command again to replace this page.",
        "",
        "## Run",
        "",
        *format_table(run_rows),
        "",
        "## Machine",
        "",
        *format_table([["item", "value"], *machine_facts()]),
    ]
    for heading, body in result_sections(report):
        lines += ["", f"## {heading}", "", *body]
    lines += ["", "## What the numbers measure", "", *notes]
    return "\n".join(lines) + "\n"
