"""Run a service module as the main program of a lean process.

Usage: ``python -m services.runtime.launch services.users.main``

nats-py imports aiohttp, which only its WebSocket transport uses, whenever
aiohttp is installed, and Tidings installs it for the gateway. A service that
reaches NATS over ``nats://`` or ``tls://`` never needs it, and loading it
added about 8.5 MiB of resident memory to each service process in one
measurement (CPython 3.11, aiohttp 3.14). This launcher marks aiohttp as
absent (a ``None`` entry in ``sys.modules`` makes its import fail) unless
NATS_URL names a WebSocket server, then runs the module as ``__main__``, as
``python -m`` would.

The module imports nothing outside the standard library, so that the mark is
in place before nats-py is first imported.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

_WEBSOCKET_SCHEMES = ("ws://", "wss://")


def uses_websocket(nats_url: str) -> bool:
    """Return whether any server of a comma-separated NATS URL list is reached over WebSocket."""
    return any(server.strip().startswith(_WEBSOCKET_SCHEMES) for server in nats_url.split(","))


LAUNCHER = "services.runtime.launch"


def service_arguments(module: str) -> list[str]:
    """Return the interpreter arguments that run a service module, such as ``services.users.main``."""
    return ["-m", LAUNCHER, module]


def service_command(module: str) -> list[str]:
    """Return the whole command that runs a service module through this launcher."""
    return [sys.executable, *service_arguments(module)]


def _find_module(name: str) -> object | None:
    """Return the import spec of a module, or None when it or one of its packages does not exist."""
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def main(argv: list[str]) -> None:
    """Run the module named by argv[0] as __main__, with the remaining arguments as its own."""
    if not argv or argv[0].startswith("-"):
        print("missing MODULE; usage: python -m services.runtime.launch MODULE [ARGUMENT ...]",
              file=sys.stderr)
        raise SystemExit(2)
    if _find_module(argv[0]) is None:
        print(f"no module named {argv[0]!r}; name a service module such as services.users.main",
              file=sys.stderr)
        raise SystemExit(2)
    nats_url = os.environ.get("NATS_URL") or os.environ.get("TIDINGS_NATS_URL") or ""
    if not uses_websocket(nats_url):
        sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]

    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
