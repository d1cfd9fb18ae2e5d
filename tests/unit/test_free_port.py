"""free_port(): a port is never returned twice in one process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.runtime.cli import embedded_nats


class _Probe:
    """Stands in for a socket whose bind to port 0 gets the next port of a fixed sequence."""

    def __init__(self, ports: Iterator[int]) -> None:
        self._ports = ports
        self._port = 0

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self._port = next(self._ports)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)


def test_free_port_skips_port_returned_before(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = iter([41001, 41001, 41002])
    monkeypatch.setattr(embedded_nats, "_handed_out", set())
    monkeypatch.setattr(embedded_nats.socket, "socket", lambda *args: _Probe(ports))

    chosen = [embedded_nats.free_port(), embedded_nats.free_port()]

    assert chosen == [41001, 41002]


def test_free_port_real_ports_distinct() -> None:
    chosen = [embedded_nats.free_port() for _ in range(50)]

    assert len(set(chosen)) == 50
