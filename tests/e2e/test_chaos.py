"""Chaos scenarios at a small size: a fault under load loses no event and applies none twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import SCENARIOS, run_scenario

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_fault_under_load_keeps_promises(scenario: str, tmp_path: Path) -> None:
    report = await run_scenario(scenario, 90, tmp_path)

    print(
        f"\n{scenario}: {report.calls} calls ({report.failed_calls} failed, {report.retried_calls} "
        f"retried), {report.orders} orders {dict(report.states)}, {report.events_committed} events "
        f"committed, {report.events_delivered} delivered, {report.events_applied} applications, "
        f"{report.duplicates_dropped} duplicates dropped, {report.dead_lettered} dead-lettered, "
        f"{report.stall_recoveries} stalled consumers restarted, {report.lost} lost, "
        f"{report.applied_twice} applied twice"
    )
    assert report.problems == []
    assert report.lost == 0
    assert report.applied_twice == 0
    assert report.failed_calls == 0
    assert report.events_delivered == report.events_committed
