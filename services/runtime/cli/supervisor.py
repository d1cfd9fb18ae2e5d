"""`tidings up`: run NATS, every service and the gateway as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from observability.logging import redact_url
from services.runtime.cli.console_log import render_line
from services.runtime.cli.embedded_nats import (
    EmbeddedCluster,
    EmbeddedNats,
    child_command,
    child_process_options,
    free_port,
    port_in_use,
)
from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError
from services.runtime.launch import service_command

logger = logging.getLogger(__name__)

# Services started by `tidings up`, in start order; the gateway comes last.
SERVICES = ("users", "inventory", "payments", "orders", "notifications")
GATEWAY = "gateway"

# Settings that give the gateway a key to check tokens with; without any,
# `tidings up` makes a local HS256 secret so that `tidings token` can mint.
_JWT_KEY_VARIABLES = (
    "TIDINGS_GATEWAY_JWT_HS256_SECRET", "TIDINGS_GATEWAY_JWT_PUBLIC_KEY_FILE",
    "TIDINGS_GATEWAY_JWT_JWKS_FILE",
)

READY_TIMEOUT = 60.0
# Seconds between the lines that name the services not ready yet.
READY_PROGRESS_INTERVAL = 10.0

# Maximum bytes of a log line printed as one line in text mode. A longer line is printed in parts.
MAX_LOG_LINE_BYTES = 1 << 20
# Seconds to wait at exit for the last lines of the stopped children.
OUTPUT_DRAIN_TIMEOUT = 2.0


@dataclass
class Child:
    """One service process started by the supervisor."""

    name: str
    address: str
    process: asyncio.subprocess.Process


class Supervisor:
    """Starts the system, reports when it is ready and stops it on a signal."""

    def __init__(
        self,
        settings: Settings,
        services: tuple[str, ...] = SERVICES,
        nats_cluster: int = 1,
        gateway: bool = True,
        log_format: str = "auto",
    ) -> None:
        """Prepare a supervisor. run() starts the processes.

        Args:
            log_format: ``text`` prints the services' JSON log lines as text
                in columns (console_log.render_line), ``json`` lets them through
                as they are, and ``auto`` picks text when stdout is a terminal.
        """
        self.settings = settings
        self.services = services
        self.gateway = gateway
        self.nats_cluster = nats_cluster
        terminal = sys.stdout.isatty()
        self.text_logs = log_format == "text" or (log_format == "auto" and terminal)
        # https://no-color.org: any non-empty NO_COLOR turns colors off.
        self.color = self.text_logs and terminal and not os.environ.get("NO_COLOR")
        self._output_readers: list[asyncio.Task[None]] = []
        self.nats: EmbeddedNats | EmbeddedCluster | None = None
        self._child_settings: dict[str, str] = {}
        self.children: list[Child] = []
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        """Start everything, wait for a signal or a crash, stop everything; return the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stopping.set)

        try:
            self._check_data_dir()
            self._check_ports()
            # A file left by a `tidings up` that was killed would send the demo elsewhere.
            gateway_url_file(self.settings).unlink(missing_ok=True)
            self._prepare_secrets()
            nats_url = self._start_nats()
            for name in self.services:
                await self._start_service(name, nats_url)
            if self.gateway:
                await self._start_service(GATEWAY, nats_url)
            if not await self._wait_until_ready():
                return 1
            if self.gateway:
                # `tidings demo --via-gateway` finds the gateway here.
                gateway_url_file(self.settings).write_text(self._gateway_url())
            self._print_ready(nats_url)
            return await self._watch()
        finally:
            await self._stop_all()

    def _check_data_dir(self) -> None:
        """Create the data directory and make sure files can be written there, or name the setting."""
        directory = self.settings.data_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".tidings-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use {str(directory.resolve())!r} as the data directory: "
                f"{exc.strerror or exc}; set TIDINGS_DATA_DIR to a directory this user can write to"
            ) from exc

    def _check_ports(self) -> None:
        names = (*self.services, *([GATEWAY] if self.gateway else []))
        owners: dict[int, str] = {}
        for name in names:
            port = self.settings.port_of(name)
            if port in owners:
                raise ConfigurationError(
                    f"{owners[port]} and {name} are both set to port {port}; give "
                    f"TIDINGS_{owners[port].upper()}_PORT and TIDINGS_{name.upper()}_PORT different ports"
                )
            owners[port] = name
            if port_in_use(port, self.settings.host):
                raise ConfigurationError(
                    f"port {port} for {name} is in use; stop what listens there or set "
                    f"TIDINGS_{name.upper()}_PORT to a free port"
                )

    def _prepare_secrets(self) -> None:
        """Give the processes a shared identity secret and the gateway a token key."""
        if "TIDINGS_IDENTITY_SECRET" not in os.environ:
            self._child_settings["TIDINGS_IDENTITY_SECRET"] = local_secret(self.settings, "identity")
        if self.gateway and not any(name in os.environ for name in _JWT_KEY_VARIABLES):
            self._child_settings["TIDINGS_GATEWAY_JWT_HS256_SECRET"] = local_secret(self.settings, "jwt")
            print("the gateway checks tokens with a local HS256 secret; get one with `tidings token`",
                  flush=True)

    def _gateway_url(self) -> str:
        scheme = "https" if os.environ.get("TIDINGS_GATEWAY_TLS_CERT_FILE") else "http"
        return f"{scheme}://{self.settings.address_of(GATEWAY)}"

    def _start_nats(self) -> str:
        if "NATS_URL" in os.environ:
            print(f"using NATS at {redact_url(self.settings.nats_url)}", flush=True)
            if self.nats_cluster > 1:
                print("--nats-cluster is ignored because NATS_URL is set", flush=True)
            return self.settings.nats_url

        # A file left by a `tidings up` that was killed would point other
        # commands at a server that no longer runs.
        nats_url_file(self.settings).unlink(missing_ok=True)

        if self.nats_cluster > 1:
            return self._start_cluster()

        preferred = self.settings.embedded_nats_port
        port = preferred
        if port_in_use(port):
            if "TIDINGS_EMBEDDED_NATS_PORT" in os.environ:
                # A port the user chose is not swapped for another behind their back.
                raise ConfigurationError(
                    f"port {port} for the embedded nats-server (TIDINGS_EMBEDDED_NATS_PORT) is in use; "
                    "stop what listens there, set another port, or unset it to take a free one"
                )
            port = free_port()
            print(f"port {preferred} is taken; embedded nats-server uses port {port}", flush=True)
        self.nats = EmbeddedNats(self.settings.data_dir.resolve() / "nats", port=port)
        self.nats.start()
        print(f"started nats-server (pid {self.nats.process.pid if self.nats.process else '?'}) "
              f"at {self.nats.url}", flush=True)
        # Other `tidings` commands run with the same data directory find the server here.
        nats_url_file(self.settings).write_text(self.nats.url)
        self._child_settings["TIDINGS_NATS_MONITOR_URL"] = self.nats.monitor_url
        return self.nats.url

    def _start_cluster(self) -> str:
        cluster = EmbeddedCluster(self.settings.data_dir.resolve() / "nats-cluster", self.nats_cluster)
        self.nats = cluster
        cluster.start()
        pids = ", ".join(str(node.process.pid) for node in cluster.nodes if node.process)
        print(f"started a {self.nats_cluster}-node nats-server cluster (pids {pids}) at {cluster.url}",
              flush=True)
        if "TIDINGS_STREAM_REPLICAS" not in os.environ:
            replicas = min(3, self.nats_cluster)
            self._child_settings["TIDINGS_STREAM_REPLICAS"] = str(replicas)
            print(f"streams get {replicas} replicas (set TIDINGS_STREAM_REPLICAS to change)", flush=True)
        nats_url_file(self.settings).write_text(cluster.url)
        self._child_settings["TIDINGS_NATS_MONITOR_URL"] = cluster.nodes[0].monitor_url
        return cluster.url

    async def _start_service(self, name: str, nats_url: str) -> None:
        environment = {
            **os.environ,
            **self._child_settings,
            "NATS_URL": nats_url,
            "TIDINGS_DATA_DIR": str(self.settings.data_dir.resolve()),
        }
        command = (
            [sys.executable, "-m", "gateway.main"] if name == GATEWAY
            else service_command(f"services.{name}.main")
        )
        if self.text_logs:
            # Output goes through a pipe, unbuffered, so that no line waits in the child.
            environment["PYTHONUNBUFFERED"] = "1"
        process = await asyncio.create_subprocess_exec(
            *child_command(command),
            env=environment, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if self.text_logs else None,
            stderr=asyncio.subprocess.STDOUT if self.text_logs else None,
            limit=MAX_LOG_LINE_BYTES, **child_process_options(),
        )
        if process.stdout is not None:
            self._output_readers.append(asyncio.create_task(self._print_output(name, process.stdout)))
        address = self.settings.address_of(name)
        self.children.append(Child(name, address, process))
        print(f"started {name} (pid {process.pid}) on {address}", flush=True)

    async def _print_output(self, name: str, stream: asyncio.StreamReader) -> None:
        """Print each line a child writes as text, until it closes its output."""
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                # A line above MAX_LOG_LINE_BYTES: print the part read so far as it is.
                raw = await stream.read(MAX_LOG_LINE_BYTES)
            if not raw:
                return
            print(render_line(name, raw.decode(errors="replace"), color=self.color), flush=True)

    async def _wait_until_ready(self) -> bool:
        checks = [
            asyncio.create_task(
                wait_until_http_ok(f"{self._gateway_url()}/healthz")
                if child.name == GATEWAY
                else wait_until_serving(child.address)
            )
            for child in self.children
        ]
        exits = [asyncio.create_task(child.process.wait()) for child in self.children]
        stop = asyncio.create_task(self.stopping.wait())
        try:
            ready: asyncio.Future[Any] = asyncio.gather(*checks)
            waiting: list[asyncio.Future[Any]] = [ready, stop, *exits]
            deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
            while True:
                left = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait(
                    waiting, timeout=min(left, READY_PROGRESS_INTERVAL),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done or left <= READY_PROGRESS_INTERVAL:
                    break
                pending = [child.name for child, check in zip(self.children, checks, strict=True)
                           if not check.done()]
                print(f"still waiting for {', '.join(pending)} to be SERVING; their log lines say "
                      "why", file=sys.stderr, flush=True)
            if ready in done:
                return True
            for child in self.children:
                if child.process.returncode is not None:
                    print(f"{child.name} exited with code {child.process.returncode} during start; "
                          "see its log lines above", file=sys.stderr, flush=True)
            if not done:
                print(f"not every service was SERVING within {READY_TIMEOUT:.0f}s",
                      file=sys.stderr, flush=True)
            return False
        finally:
            for task in [*checks, *exits, stop]:
                task.cancel()
            # Retrieve the gathered result so that asyncio does not report it.
            ready.add_done_callback(lambda future: future.cancelled() or future.exception())

    def _print_ready(self, nats_url: str) -> None:
        lines = [
            f"  {child.name:<14} {self._gateway_url() if child.name == GATEWAY else 'grpc ' + child.address}"
            for child in self.children
        ]
        # Repeated here because the services' start-up logs push the earlier hint out of view.
        hint = "try it: `tidings demo`"
        if "TIDINGS_GATEWAY_JWT_HS256_SECRET" in self._child_settings:
            hint += ", or `tidings token` for a gateway bearer token"
        print("tidings is ready:", *lines, f"  {'nats':<14} {redact_url(nats_url)}", hint,
              "press Ctrl-C to stop", sep="\n", flush=True)

    async def _watch(self) -> int:
        """Wait for a signal (exit code 0) or a service that exits by itself (exit code 1)."""
        exits = {asyncio.create_task(child.process.wait()): child for child in self.children}
        stop = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
        for task in [stop, *exits]:
            task.cancel()
        if stop in done:
            return 0
        for task in done:
            child = exits[task]
            print(f"{child.name} exited with code {child.process.returncode}; stopping tidings",
                  file=sys.stderr, flush=True)
        return 1

    async def _stop_all(self) -> None:
        running = [child for child in self.children if child.process.returncode is None]
        if running:
            print("stopping services ...", flush=True)
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        grace = self.settings.shutdown_grace + 5
        for child in running:
            try:
                await asyncio.wait_for(child.process.wait(), timeout=grace)
            except TimeoutError:
                print(f"{child.name} did not stop within {grace:.0f}s; killing it",
                      file=sys.stderr, flush=True)
                child.process.kill()
                await child.process.wait()
        # The last lines of the stopped children, such as "service stopped".
        if self._output_readers:
            await asyncio.wait(self._output_readers, timeout=OUTPUT_DRAIN_TIMEOUT)
            for reader in self._output_readers:
                reader.cancel()
        with contextlib.suppress(OSError):
            # Fails only when the data directory itself is unusable, as reported at start.
            gateway_url_file(self.settings).unlink(missing_ok=True)
        if self.nats is not None:
            nats_url_file(self.settings).unlink(missing_ok=True)
            self.nats.stop()
            print("stopped nats-server" if isinstance(self.nats, EmbeddedNats)
                  else "stopped the nats-server cluster", flush=True)
        if running or self.nats is not None:
            print("tidings stopped", flush=True)


def gateway_url_file(settings: Settings) -> Path:
    """Return the file where `tidings up` records the URL of the gateway it started."""
    return settings.data_dir.resolve() / "gateway.url"


def nats_url_file(settings: Settings) -> Path:
    """Return the file where `tidings up` records the URL of the nats-server it started."""
    return settings.data_dir.resolve() / "nats.url"


def local_secret(settings: Settings, name: str) -> str:
    """Return the secret stored as data/secrets/<name>, creating it (mode 0600) the first time."""
    path = settings.data_dir.resolve() / "secrets" / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret)
    return secret


async def wait_until_http_ok(url: str, timeout: float | None = None) -> None:
    """Poll url until it returns 200.

    The certificate of an https URL is not verified: this probes a process
    this machine just started, and the CA that signed it may be private.
    """
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0), ssl=False) as reply:
                    if reply.status == 200:
                        return
            await asyncio.sleep(0.1)


async def wait_until_ready_or_exit(
    check: Coroutine[Any, Any, None], process: asyncio.subprocess.Process, timeout: float
) -> str | None:
    """Run check until it returns; return None then, or why not ("exited ...", "not ready ...")."""
    ready = asyncio.create_task(check)
    exited = asyncio.create_task(process.wait())
    try:
        done, _ = await asyncio.wait({ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        exited.cancel()
    if ready in done and ready.exception() is None:
        return None
    if exited in done:
        return f"exited with code {process.returncode} during start"
    return f"not ready within {timeout:.0f} s"


def discover_nats_url(settings: Settings) -> str:
    """Return NATS_URL if set, else the URL of a running `tidings up`, else the default."""
    recorded = nats_url_file(settings)
    if "NATS_URL" in os.environ:
        return settings.nats_url
    if recorded.exists():
        return recorded.read_text().strip()
    print(f"no running `tidings up` recorded its nats-server in {str(recorded.resolve())!r}; using "
          f"{redact_url(settings.nats_url)}. Set NATS_URL, or TIDINGS_DATA_DIR to the data directory "
          "of `tidings up`", file=sys.stderr, flush=True)
    return settings.nats_url


async def wait_until_serving(address: str, timeout: float | None = None) -> None:
    """Poll the gRPC health service at address until it reports SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)

