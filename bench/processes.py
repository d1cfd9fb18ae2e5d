"""Child processes of the benchmark: start, wait until serving, read peak RSS, stop by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.runtime.cli.embedded_nats import EmbeddedNats, free_port
from services.runtime.cli.supervisor import wait_until_http_ok, wait_until_ready_or_exit, wait_until_serving

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Seconds a child gets between SIGTERM and SIGKILL. The services drain within
# their shutdown grace, TIDINGS_SHUTDOWN_GRACE, which is 10 s by default.
STOP_TIMEOUT = 20.0
START_TIMEOUT = 60.0

# Variables of the harness's own environment that would redirect a child
# (another NATS server, database or collector) are not passed on.
_DROPPED_PREFIXES = ("TIDINGS_", "OTEL_", "NATS_URL")


@dataclass(frozen=True)
class ProcessUsage:
    """Peak resident set size (VmHWM) and CPU time of one process, read just before it was stopped."""

    process: str
    pid: int
    peak_rss_kib: int | None
    cpu_s: float | None


def peak_rss_kib(pid: int | str) -> int | None:
    """Return VmHWM of a process in KiB, or None when /proc has no status for it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return count distinct TCP ports on host that nothing listens on right now."""
    # free_port() never returns a port twice in one process, so the ports differ.
    return [free_port(host) for _ in range(count)]


def cpu_seconds(pid: int | str) -> float | None:
    """Return the user plus system CPU time of a process, or None when /proc has no stat for it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Fields after the parenthesised command name start at field 3 (state),
            # so utime and stime, fields 14 and 15 in clock ticks, are at 11 and 12.
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Return the CPU time all CPUs of this machine spent outside idle and iowait since boot."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """Return the CPU time of this process plus that of every child it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def child_environment(variables: Mapping[str, str]) -> dict[str, str]:
    """Return the harness's environment without TIDINGS_*, OTEL_* and NATS_URL, plus variables."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(_DROPPED_PREFIXES)
    }
    environment.update(variables)
    return environment


def log_tail(path: Path, limit: int = 1500) -> str:
    """Return the last limit characters of a log file, or a note that it is empty or missing."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return f"(no log at {path})"
    return text[-limit:] if text else f"(log {path.name} is empty)"


class Child:
    """A Python child process whose stdout and stderr go to a log file."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log_path: Path,
                 log_file: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self._log_file = log_file

    @property
    def pid(self) -> int:
        """Process id of the child."""
        return self.process.pid

    def describe_failure(self) -> str:
        """Return the exit code (if the child exited) and the end of its log, for an error message."""
        code = self.process.returncode
        state = f"exited with code {code}" if code is not None else "is still running"
        return f"{self.name} (pid {self.pid}) {state}. End of its log:\n{log_tail(self.log_path)}"

    async def wait_until_serving(self, address: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the child's gRPC health service at address reports SERVING.

        Raises:
            RuntimeError: The child exited first or was not SERVING within timeout.
        """
        await self._wait_until_ready(wait_until_serving(address), address, "SERVING", timeout)

    async def wait_until_http_ok(self, url: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until a GET of url on the child returns HTTP 200.

        Raises:
            RuntimeError: The child exited first or did not return 200 within timeout.
        """
        await self._wait_until_ready(wait_until_http_ok(url), url, "returning HTTP 200", timeout)

    async def _wait_until_ready(
        self, check: Coroutine[Any, Any, None], target: str, ready_state: str, timeout: float
    ) -> None:
        """Wait until check returns, and raise RuntimeError when the child exits first or time runs out."""
        problem = await wait_until_ready_or_exit(check, self.process, timeout)
        if problem is None:
            return
        exited = problem.startswith("exited")
        reason = "exited during start" if exited else f"not {ready_state} within {timeout:.0f}s"
        raise RuntimeError(f"{self.name} at {target}: {reason}: {self.describe_failure()}")

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Send SIGTERM, wait, and send SIGKILL when the child is still running after timeout."""
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.process.wait(), timeout=timeout)
                except TimeoutError:
                    print(f"bench: {self.name} (pid {self.pid}) did not stop within {timeout:.0f}s "
                          "after SIGTERM, sending SIGKILL", file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await asyncio.wait_for(self.process.wait(), timeout=timeout)
        finally:
            self._log_file.close()


class NatsChild:
    """An EmbeddedNats server tracked like the Python children."""

    def __init__(self, name: str, server: EmbeddedNats) -> None:
        self.name = name
        self.server = server

    @property
    def pid(self) -> int:
        """Process id of nats-server."""
        assert self.server.process is not None
        return self.server.process.pid

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return self.server.url

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Send SIGTERM and wait. EmbeddedNats sends SIGKILL after timeout."""
        await asyncio.to_thread(self.server.stop, timeout)


class ProcessSet:
    """The processes the harness started, each stopped by its PID, newest first."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.running: list[Child | NatsChild] = []
        self.usage: list[ProcessUsage] = []

    async def start_python(
        self, name: str, arguments: list[str], environment: Mapping[str, str]
    ) -> Child:
        """Start ``sys.executable`` with arguments in the project root, logging to a file."""
        log_path = self.work_dir / f"{_file_name(name)}.log"
        log_file = log_path.open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *arguments,
                cwd=PROJECT_ROOT, env=dict(environment),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
            )
        except BaseException:
            log_file.close()
            raise
        child = Child(name, process, log_path, log_file)
        self.running.append(child)
        return child

    async def start_nats(self, name: str) -> NatsChild:
        """Start a JetStream nats-server on a free loopback port with its own store directory."""
        server = EmbeddedNats(self.work_dir / _file_name(name))
        child = NatsChild(name, server)
        try:
            await asyncio.to_thread(server.start)
        except BaseException:
            await child.stop()
            raise
        self.running.append(child)
        return child

    async def stop(self, child: Child | NatsChild) -> None:
        """Record the child's peak RSS and CPU time, then stop it."""
        if child in self.running:
            self.running.remove(child)
        self.usage.append(
            ProcessUsage(child.name, child.pid, peak_rss_kib(child.pid), cpu_seconds(child.pid))
        )
        await child.stop()

    async def stop_all(self) -> None:
        """Stop every child still running, newest first, and report a failed stop without raising."""
        while self.running:
            child = self.running[-1]
            try:
                await self.stop(child)
            except Exception as exc:
                print(f"bench: stopping {child.name} (pid {child.pid}) failed: {exc!r}",
                      file=sys.stderr, flush=True)


def _file_name(name: str) -> str:
    return "".join(char if char.isalnum() else "-" for char in name)
