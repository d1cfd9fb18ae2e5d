"""The service launcher: aiohttp kept out of service processes unless NATS is reached over WebSocket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.launch import service_command, uses_websocket

REPO_ROOT = Path(__file__).resolve().parents[2]

# A module the launcher runs in place of a service: it reports whether it runs
# as __main__, its arguments and whether nats-py and aiohttp can be imported.
PROBE = '''
import importlib, json, sys
def importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
print(json.dumps({"main": __name__ == "__main__", "argv": sys.argv[1:],
                  "nats": importable("nats"), "aiohttp": importable("aiohttp")}))
'''


def _run_probe(tmp_path: Path, nats_url: str | None, *arguments: str) -> dict[str, object]:
    (tmp_path / "launch_probe.py").write_text(PROBE)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("NATS_URL", "TIDINGS_NATS_URL")}
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO_ROOT)])
    if nats_url is not None:
        environment["NATS_URL"] = nats_url
    completed = subprocess.run(
        [*service_command("launch_probe"), *arguments],
        env=environment, capture_output=True, text=True, timeout=60, check=True,
    )
    result: dict[str, object] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize(
    ("nats_url", "expected"),
    [
        ("nats://127.0.0.1:4222", False),
        ("tls://nats.example:4222", False),
        ("ws://127.0.0.1:8080", True),
        ("wss://nats.example:443", True),
        ("nats://a:4222, wss://b:443", True),
        ("", False),
    ],
)
def test_uses_websocket_table(nats_url: str, expected: bool) -> None:
    assert uses_websocket(nats_url) is expected


def test_launch_runs_module_as_main(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, "nats://127.0.0.1:4222")
    assert result["main"] is True


def test_launch_passes_remaining_arguments(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, "nats://127.0.0.1:4222", "--flag", "value")
    assert result["argv"] == ["--flag", "value"]


def test_launch_hides_aiohttp_for_nats_url(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, "nats://127.0.0.1:4222")
    assert result["aiohttp"] is False


def test_launch_hides_aiohttp_without_nats_url(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, None)
    assert result["aiohttp"] is False


def test_launch_nats_importable_without_aiohttp(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, "nats://127.0.0.1:4222")
    assert result["nats"] is True


def test_launch_keeps_aiohttp_for_websocket_url(tmp_path: Path) -> None:
    result = _run_probe(tmp_path, "ws://127.0.0.1:8080")
    assert result["aiohttp"] is True


def _launch(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.runtime.launch", *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_launch_without_module_prints_usage() -> None:
    completed = _launch()
    assert "missing MODULE; usage: python -m services.runtime.launch MODULE" in completed.stderr


def test_launch_without_module_exits_2() -> None:
    completed = _launch()
    assert completed.returncode == 2


def test_launch_unknown_module_names_it() -> None:
    completed = _launch("services.nosuch.main")
    assert "no module named 'services.nosuch.main'" in completed.stderr


def test_launch_unknown_module_exits_2() -> None:
    completed = _launch("services.nosuch.main")
    assert completed.returncode == 2


# Imports a service module without running it and reports which heavy modules
# that loaded. A service on SQLite needs none of them.
FOOTPRINT_PROBE = """
import json, sys
import services.users.main
heavy = ["aiohttp", "jwt", "cryptography", "sqlalchemy.ext.asyncio", "sqlalchemy.dialects.postgresql"]
print(json.dumps(sorted(name for name in heavy if sys.modules.get(name) is not None)))
"""


def test_launch_service_skips_heavy_modules(tmp_path: Path) -> None:
    (tmp_path / "footprint_probe.py").write_text(FOOTPRINT_PROBE)
    environment = {key: value for key, value in os.environ.items() if key != "TIDINGS_NATS_URL"}
    environment.update(
        NATS_URL="nats://127.0.0.1:4222", PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)])
    )
    completed = subprocess.run(
        [*service_command("footprint_probe")],
        env=environment, capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(completed.stdout) == []
