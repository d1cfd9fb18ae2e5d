"""Tracing set-up: OTEL_SDK_DISABLED as the OpenTelemetry SDK reads it."""

from __future__ import annotations

import pytest

from observability.tracing import tracing_disabled


@pytest.mark.parametrize("value", ["true", "TRUE", " true "])
def test_tracing_disabled_true_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)

    assert tracing_disabled() is True


@pytest.mark.parametrize("value", ["false", "", "1", "yes"])
def test_tracing_disabled_other_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", value)

    assert tracing_disabled() is False


def test_tracing_disabled_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)

    assert tracing_disabled() is False
