"""Service bootstrap: gRPC server, health, reflection, database, NATS, relay and consumers.

Start order: the gRPC server comes up first and reports NOT_SERVING. Then
come the database schema, the NATS connection, the streams, the relay and the
consumers, and health turns SERVING only when all of them are ready.

Shutdown order on SIGTERM or SIGINT: health NOT_SERVING, stop accepting calls
and let in-flight calls finish within ``shutdown_grace``, stop the consumers
after their current batch, publish what is left in the outbox, drain NATS,
close the database and flush spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import nats.js.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from sqlalchemy import MetaData, Table

from gateway.identity import IdentityInterceptor
from observability.logging import configure_logging, redact_url
from observability.server_spans import ServerSpanInterceptor
from observability.tracing import configure_tracing, shutdown_tracing
from services.runtime.blocked import event_failures_table
from services.runtime.clients import server_credentials
from services.runtime.config import Settings, load_settings
from services.runtime.consumer import (
    ConsumerSettings,
    ConsumerSpec,
    EventConsumer,
    processed_events_table,
)
from services.runtime.database import Database
from services.runtime.deadletters import DEADLETTERS
from services.runtime.errors import ConfigurationError
from services.runtime.guarantees import check_guarantees
from services.runtime.idempotency import RequestLog, request_log_table
from services.runtime.interceptors import ErrorMappingInterceptor
from services.runtime.outbox import DEFAULT_MAX_PAYLOAD, Outbox, outbox_table
from services.runtime.relay import OutboxRelay
from services.runtime.streams import StreamSpec, ensure_stream

logger = logging.getLogger(__name__)

# (add_XServicer_to_server, servicer instance, full service name)
ServicerBinding = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]

# A loop that runs beside the server until the event is set, such as a scanner
# for timed-out work. It must return soon after the event is set.
BackgroundTask = Callable[[asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class ServiceSpec:
    """Everything the runtime needs to run one service.

    Attributes:
        name: Service name: log field, ``service.name``, port and database file.
        metadata: The service's own tables; the runtime adds its outbox,
            request log and processed-events tables.
        servicers: Builds the gRPC servicers once the runtime is ready.
        streams: Streams the service publishes to or consumes from.
        consumers: Builds the durable consumers the service runs.
        tasks: Builds background loops started after the consumers.
    """

    name: str
    metadata: MetaData
    servicers: Callable[[Runtime], Sequence[ServicerBinding]]
    streams: tuple[StreamSpec, ...] = ()
    consumers: Callable[[Runtime], Sequence[ConsumerSpec]] = field(default=lambda runtime: ())
    tasks: Callable[[Runtime], Sequence[BackgroundTask]] = field(default=lambda runtime: ())


class Runtime:
    """The parts a servicer or handler uses: settings, database, outbox, request log, NATS."""

    def __init__(self, spec: ServiceSpec, settings: Settings) -> None:
        self.name = spec.name
        self.settings = settings
        self.database = Database(settings.database_url_for(spec.name), spec.metadata)
        self.nats: NATS = NATS()
        self.outbox = Outbox(
            _runtime_table(spec.metadata, "outbox", outbox_table),
            source=f"/tidings/{spec.name}",
            max_payload=self._max_payload,
        )
        self.request_log = RequestLog(
            _runtime_table(spec.metadata, "request_log", request_log_table)
        )
        self.processed_events = _runtime_table(
            spec.metadata, "processed_events", processed_events_table
        )
        self.event_failures = _runtime_table(spec.metadata, "event_failures", event_failures_table)
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def _max_payload(self) -> int:
        # max_payload is the server's value once connected, the default before.
        return self.nats.max_payload if self.nats.is_connected else DEFAULT_MAX_PAYLOAD

    def on_stop(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Run close at shutdown, after the server and consumers stopped (e.g. a client channel)."""
        self._closers.append(close)

    async def close_resources(self) -> None:
        """Run every on_stop callback, logging failures instead of stopping the shutdown."""
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                logger.exception("closing a resource failed during shutdown")


def _runtime_table(metadata: MetaData, name: str, define: Callable[[MetaData], Table]) -> Table:
    existing = metadata.tables.get(name)
    return existing if existing is not None else define(metadata)


# Seconds between two warnings about a first NATS connection that keeps failing.
_CONNECT_WARNING_INTERVAL = 10.0


class Service:
    """One running service process."""

    def __init__(self, spec: ServiceSpec, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.runtime = Runtime(spec, settings)
        self.health = HealthServicer()
        secret = settings.identity_secret.get_secret_value() if settings.identity_secret else None
        # The tracing interceptor stays with the SDK off too: the API's no-op spans
        # then carry the caller's trace context on to outgoing calls and events.
        self.server = grpc.aio.server(
            interceptors=[ServerSpanInterceptor(), IdentityInterceptor(secret), ErrorMappingInterceptor()],
            # gRPC sets SO_REUSEPORT by default, so a second process on the same port
            # would start without error and take part of the calls. Without it, the
            # second process fails at start with the "cannot listen" error below.
            options=[("grpc.so_reuseport", 0)],
        )
        self.stopping = asyncio.Event()
        self.relay: OutboxRelay | None = None
        self.consumers: list[EventConsumer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._service_names: list[str] = []
        self.port = 0
        self.failed = False
        self._nats_connected = False
        self._last_connect_warning: float | None = None

    async def start(self) -> None:
        """Start serving; returns once health reports SERVING."""
        await self._start_server()
        await self.runtime.database.create_schema()
        await self._connect_nats()
        if self.stopping.is_set():
            return
        await self._ensure_streams()
        if self.stopping.is_set():
            return
        await check_guarantees(
            self.settings, self.runtime.nats.jetstream(), (*self.spec.streams, DEADLETTERS)
        )
        self._start_relay()
        await self._start_consumers()
        for index, task in enumerate(self.spec.tasks(self.runtime)):
            self._spawn(task(self.stopping), f"background task {index}")
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("service ready", extra={"port": self.port})

    async def _start_server(self) -> None:
        for add_to_server, servicer, full_name in self.spec.servicers(self.runtime):
            add_to_server(servicer, self.server)
            self._service_names.append(full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        address = f"{self.settings.host}:{self.settings.port_of(self.spec.name)}"
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigurationError(
                f"cannot listen on {address}: the port is in use or not allowed; set "
                f"TIDINGS_{self.spec.name.upper()}_PORT to a free port"
            ) from exc
        await self.server.start()
        logger.info("grpc server listening", extra={"address": f"{self.settings.host}:{self.port}"})

    async def _connect_nats(self) -> None:
        servers = [server.strip() for server in self.settings.nats_url.split(",")]
        delay = 0.2
        while not self.stopping.is_set():
            try:
                await self.runtime.nats.connect(
                    servers=servers,
                    name=f"tidings-{self.spec.name}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py accepts floats
                    connect_timeout=2,
                    drain_timeout=self.settings.shutdown_grace,  # type: ignore[arg-type]
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_nats_error,
                )
            except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
                logger.warning(
                    "cannot connect to NATS; retrying",
                    extra={"nats_url": redact_url(self.settings.nats_url), "error": repr(exc),
                           "retry_in": delay},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            self._nats_connected = True
            logger.info("connected to NATS",
                        extra={"nats_url": redact_url(self.settings.nats_url)})
            return

    async def _on_disconnected(self) -> None:
        if not self.stopping.is_set():
            logger.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS")

    async def _on_nats_error(self, exc: Exception) -> None:
        # nats-py retries the first connection inside connect() and reports each
        # failed attempt only here, so without this warning a service whose NATS
        # is unreachable would wait in silence.
        now = asyncio.get_running_loop().time()
        last = self._last_connect_warning
        due = last is None or now - last >= _CONNECT_WARNING_INTERVAL
        if not self._nats_connected and due:
            self._last_connect_warning = now
            logger.warning(
                "cannot connect to NATS yet; retrying every 0.5 s",
                extra={"nats_url": redact_url(self.settings.nats_url), "error": repr(exc)},
            )
            return
        logger.debug("NATS client error", extra={"error": repr(exc)})

    async def _ensure_streams(self) -> None:
        js = self.runtime.nats.jetstream()
        for stream in (*self.spec.streams, DEADLETTERS):
            delay = 0.2
            while not self.stopping.is_set():
                error = await self._try_ensure_stream(js, stream)
                if error is None:
                    break
                logger.warning(
                    "cannot create or update the stream yet; retrying",
                    extra={"stream": stream.name, "error": repr(error), "retry_in": delay},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)

    async def _try_ensure_stream(self, js: Any, stream: StreamSpec) -> Exception | None:
        """Create or update one stream; return a passing error to retry on, None on success.

        Raises:
            ConfigurationError: JetStream rejected the stream's settings.
        """
        try:
            await ensure_stream(
                js,
                stream,
                replicas=self.settings.stream_replicas,
                duplicate_window=self.settings.duplicate_window,
            )
        except nats.js.errors.ServiceUnavailableError as exc:
            # A JetStream cluster returns "temporarily unavailable" until it
            # has elected a leader.
            return exc
        except nats.js.errors.APIError as exc:
            raise ConfigurationError(
                f"JetStream rejected stream {stream.name} with {self.settings.stream_replicas} "
                f"replica(s): {exc.description} (error {exc.err_code}); set "
                "TIDINGS_STREAM_REPLICAS to at most the number of servers in the cluster"
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            return exc
        return None

    def _start_relay(self) -> None:
        if not self.settings.relay_enabled:
            logger.warning("outbox relay disabled by TIDINGS_RELAY_ENABLED; events stay pending")
            return
        self.relay = OutboxRelay(
            self.runtime.database,
            self.runtime.outbox.table,
            self.runtime.nats,
            source=f"/tidings/{self.spec.name}",
            batch_size=self.settings.relay_batch_size,
            poll_interval=self.settings.relay_poll_interval,
            publish_timeout=self.settings.relay_publish_timeout,
            linger=self.settings.relay_linger,
        )
        self.runtime.outbox.on_commit(self.relay.wake)
        self._spawn(self.relay.run(), "outbox relay")

    async def _start_consumers(self) -> None:
        consumer_settings = ConsumerSettings(
            batch_size=self.settings.consumer_batch_size,
            ack_wait=self.settings.consumer_ack_wait,
            max_deliver=self.settings.consumer_max_deliver,
            backoff=self.settings.consumer_backoff,
            handler_timeout=self.settings.consumer_handler_timeout,
        )
        for consumer_spec in self.spec.consumers(self.runtime):
            consumer = EventConsumer(
                consumer_spec,
                self.runtime.database,
                self.runtime.processed_events,
                self.runtime.nats,
                dataclasses.replace(
                    consumer_settings,
                    max_deliver=consumer_spec.max_deliver or consumer_settings.max_deliver,
                    backoff=consumer_spec.backoff or consumer_settings.backoff,
                ),
                self.runtime.event_failures,
            )
            await consumer.start()
            self.consumers.append(consumer)
            self._spawn(consumer.run(), f"consumer {consumer_spec.durable}")

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.append(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A background loop that dies takes the process down, so a supervisor
        # restarts it instead of leaving a service that no longer moves events.
        logger.error("background task failed; stopping the service",
                     extra={"task": task.get_name()}, exc_info=task.exception())
        self.failed = True
        self.stopping.set()

    async def stop(self) -> None:
        """Shut down in the documented order; safe to call once after start()."""
        grace = self.settings.shutdown_grace
        logger.info("service stopping", extra={"grace_seconds": grace})

        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

        for consumer in self.consumers:
            consumer.stop()
        if self.relay is not None:
            self.relay.stop()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

        if self.relay is not None and self.runtime.nats.is_connected:
            await self._flush_outbox()
        await self.runtime.close_resources()

        if self.runtime.nats.is_connected:
            with contextlib.suppress(Exception):
                await self.runtime.nats.drain()
        await self.runtime.database.close()
        logger.info("service stopped")

    async def _flush_outbox(self) -> None:
        """Publish rows committed by the last calls, so a clean stop leaves nothing pending."""
        assert self.relay is not None
        try:
            async with asyncio.timeout(self.settings.shutdown_grace):
                while await self.relay.publish_pending():
                    pass
        except Exception as exc:
            logger.warning(
                "outbox not fully published at shutdown; the next start publishes the rest",
                extra={"error": repr(exc)},
            )


async def serve(spec: ServiceSpec, settings: Settings) -> int:
    """Run a service until SIGTERM or SIGINT; return the process exit code."""
    service = Service(spec, settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stopping.set)

    try:
        start = asyncio.create_task(service.start())
        stopped = asyncio.create_task(service.stopping.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            start.result()
        else:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        await service.stopping.wait()
    finally:
        await service.stop()
    return 1 if service.failed else 0


def run(spec: ServiceSpec) -> None:
    """Entry point of a service process: settings, logging, tracing, then serve()."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"{spec.name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    configure_logging(spec.name, settings.log_level)
    try:
        provider = configure_tracing(spec.name)
    except ValueError as exc:
        logger.error("invalid tracing configuration", extra={"error": str(exc)})
        raise SystemExit(2) from exc

    try:
        code = asyncio.run(serve(spec, settings))
    except ConfigurationError as exc:
        logger.error("cannot start", extra={"error": str(exc)})
        code = 2
    finally:
        shutdown_tracing(provider)
    raise SystemExit(code)
