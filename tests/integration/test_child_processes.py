"""Children started with child_command end when their parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.runtime.cli.embedded_nats import child_command
from tests.e2e.processes import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from services.runtime.cli.embedded_nats import child_command, child_process_options
    child = subprocess.Popen(child_command(["/bin/sleep", "60"]), **child_process_options())
    print(child.pid, flush=True)
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie, which is gone for our purpose.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_child_command_child_ends_when_the_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    cmdline = Path(f"/proc/{child_pid}/cmdline")
    wait_until(lambda: cmdline.read_bytes().startswith(b"/bin/sleep"), timeout=10)

    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)

    wait_until(lambda: not _alive(child_pid), timeout=10)
    assert not _alive(child_pid)


def test_child_command_runs_the_program_itself() -> None:
    command = child_command(["/bin/echo", "hello"])

    completed = subprocess.run(command, capture_output=True, text=True, check=True)

    assert completed.stdout == "hello\n"
