"""`tidings bench` at a small size: every phase runs and the page shows the HTTP gateway rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import run_benchmark

pytestmark = pytest.mark.e2e

CALLS = 20
GATEWAY_PHASES = (
    "direct gRPC GetUser, tracing off",
    "gateway GET /v1/users/{id}, tracing off",
    "gateway GET /v1/users/{id}, tracing on",
)


def table_row(page: str, first_cell: str) -> list[str]:
    """Return the cells of the first Markdown table row whose first cell is first_cell."""
    for line in page.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starts with {first_cell!r}")


def section(page: str, heading: str) -> str:
    """Return the text under a ``## heading`` up to the next heading."""
    marker = f"\n## {heading}\n"
    assert marker in page, f"the page has no section {heading!r}"
    return page.split(marker, 1)[1].split("\n## ", 1)[0]


async def test_bench_small_run_includes_gateway_phases(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"

    code = await run_benchmark(calls=CALLS, concurrency=4, output=str(output))

    page = output.read_text()
    assert code == 0, section(page, "Failures and warnings") if "## Failures" in page else page
    throughput = section(page, "Throughput and call latency")
    for title in GATEWAY_PHASES:
        assert table_row(throughput, title)[4] == f"0 of {CALLS}"

    gateway = section(page, "HTTP gateway path against direct gRPC")
    against_direct = (
        "requests/s ÷ direct gRPC GetUser calls/s",
        "p50 ÷ direct gRPC GetUser p50 (above 1x: slower)",
    )
    for label in against_direct:
        cells = table_row(gateway, label)
        assert cells[1] == ""
        assert cells[2].endswith("x")
        assert cells[3].endswith("x")
    assert all(cell.endswith("x") for cell in table_row(gateway, "calls/s ÷ bare grpc.aio calls/s")[1:])
    assert table_row(gateway, "gateway CPU ms per measured call")[2] != "n/a"
    assert table_row(gateway, "gateway peak RSS (VmHWM) MiB")[2] != "n/a"
    assert table_row(gateway, "users peak RSS (VmHWM) MiB")[1] != "n/a"

    assert "in gateway GET /v1/users/{id}, tracing on: gateway: " in section(page, "Tracing cost")
    assert "**gateway GET /v1/users/{id}**" in section(page, "What the numbers measure")
