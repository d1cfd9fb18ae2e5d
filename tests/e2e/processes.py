"""Processes of end-to-end tests: started with logs in files, stopped by PID with a bound."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.runtime.launch import service_command as launcher_command

REPO_ROOT = Path(__file__).resolve().parents[2]

# Seconds a process gets to exit after SIGTERM before it is killed with SIGKILL.
STOP_TIMEOUT = 20.0

T = TypeVar("T")


@dataclass
class ChildProcess:
    """A process this test started, with its stdout and stderr in files under the test's tmp_path."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        """Return everything the process has written to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        """Return the end of stdout and stderr, for assertion messages."""
        stderr = self.stderr_path.read_text(errors="replace")
        return (
            f"--- {self.name} stdout ---\n{self.stdout()[-chars:]}\n"
            f"--- {self.name} stderr ---\n{stderr[-chars:]}"
        )


def clean_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment without NATS_URL, TIDINGS_* and OTEL_*, plus overrides.

    Dropping the inherited settings keeps a developer's shell (a NATS_URL, a
    collector endpoint) from reaching the processes under test.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if name != "NATS_URL" and not name.startswith(("TIDINGS_", "OTEL_"))
    }
    environment.update(overrides)
    return environment


def start_process(
    name: str, command: list[str], environment: Mapping[str, str], log_dir: Path
) -> ChildProcess:
    """Start command in its own session with output appended to <log_dir>/<name>.stdout/.stderr.

    Output is appended, so a restarted service keeps the log of its earlier runs.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / f"{name}.stdout"
    stderr_path = log_dir / f"{name}.stderr"
    with stdout_path.open("ab") as stdout, stderr_path.open("ab") as stderr:
        process = subprocess.Popen(
            command,
            env=dict(environment),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            # A Ctrl-C in the terminal reaches pytest only, and the fixtures then stop these processes.
            start_new_session=True,
        )
    return ChildProcess(name, process, stdout_path, stderr_path)


def service_command(service: str) -> list[str]:
    """Return the command that runs one service process, as `tidings up` runs it."""
    return launcher_command(f"services.{service}.main")


def stop_process(child: ChildProcess, timeout: float = STOP_TIMEOUT) -> int:
    """Stop the process with SIGTERM, or SIGKILL after timeout seconds, and return its exit code."""
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGTERM)
        try:
            return child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            child.process.kill()
    return child.process.wait(timeout)


def kill_process(child: ChildProcess, timeout: float = 10.0) -> int:
    """Kill the process with SIGKILL, as a crash would, reap it and return its exit code."""
    if child.process.poll() is None:
        child.process.kill()
    return child.process.wait(timeout)


def pid_running(pid: int) -> bool:
    """Return whether a process with this PID exists and has not exited (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the command name, which is in parentheses and may contain spaces.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in {"Z", "X"}


def pid_command_line(pid: int) -> str:
    """Return the command line of a running process, arguments separated by spaces."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def stop_pid(pid: int, command_marker: str, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a process that a child of this test started (SIGTERM, then SIGKILL after timeout).

    The signal goes only to a running process whose command line contains
    command_marker, so a PID that the system reused for something else is left alone.
    """
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not pid_running(pid) or command_marker not in pid_command_line(pid):
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_running(pid):
            time.sleep(0.05)


def wait_until(
    condition: Callable[[], T | None], *, timeout: float, interval: float = 0.05
) -> T | None:
    """Call condition until it returns a truthy value and return it, or return None after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result or None
        time.sleep(interval)
