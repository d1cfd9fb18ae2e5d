"""Entry point of the gateway process (``python -m gateway.main``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys

import nats
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from nats.aio.client import Client as NATS

from gateway.app import Gateway
from gateway.auth import AuthConfigError
from gateway.backends import BackendConfigError
from gateway.events import EventStream
from gateway.routes import RouteError
from gateway.settings import GatewaySettings
from observability.logging import configure_logging, redact_url
from observability.tracing import configure_tracing, shutdown_tracing
from services.runtime.config import Settings, load_settings
from services.runtime.errors import ConfigurationError

logger = logging.getLogger("gateway.main")


def server_ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """Return the HTTPS context of the gateway, or None when it serves plain HTTP."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load TIDINGS_GATEWAY_TLS_CERT_FILE={str(settings.tls_cert_file)!r} with its key "
            f"TIDINGS_GATEWAY_TLS_KEY_FILE: {exc}"
        ) from exc
    return context


# Seconds between two warnings about a NATS server that cannot be reached.
NATS_WARNING_INTERVAL = 10.0


class _NatsErrorReport:
    """Log NATS client errors as one warning per NATS_WARNING_INTERVAL, not a traceback per attempt.

    nats-py retries the first connection inside connect() and reports each
    failed attempt only through its error callback, which by default logs a
    traceback every time.
    """

    def __init__(self, url: str) -> None:
        self._url = redact_url(url)
        self._last: float | None = None

    async def on_error(self, error: Exception) -> None:
        """Log error as the client's error callback, which nats-py accepts only as a coroutine function."""
        now = asyncio.get_running_loop().time()
        if self._last is not None and now - self._last < NATS_WARNING_INTERVAL:
            logger.debug("NATS client error", extra={"error": repr(error)})
            return
        self._last = now
        logger.warning("cannot reach nats; live events wait for it, REST routes work",
                       extra={"url": self._url, "error": repr(error)})


async def _connect_nats(client: NATS, runtime: Settings, stopping: asyncio.Event) -> None:
    """Connect for live events, retrying until it works; REST routes do not wait for it."""
    servers = [server.strip() for server in runtime.nats_url.split(",")]
    delay = 0.2
    while not stopping.is_set():
        try:
            await client.connect(
                servers=servers, name="tidings-gateway", max_reconnect_attempts=-1,
                allow_reconnect=True, connect_timeout=2, error_cb=_NatsErrorReport(runtime.nats_url).on_error,
            )
            logger.info("connected to nats", extra={"url": redact_url(client.connected_url.geturl()
                                                                      if client.connected_url else "")})
            return
        except Exception as exc:
            logger.warning("cannot reach nats yet; live events wait for it",
                           extra={"url": redact_url(runtime.nats_url), "error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def serve(settings: GatewaySettings, runtime: Settings) -> int:
    """Serve HTTP until SIGTERM or SIGINT, then drain in-flight requests; return the exit code."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)

    client = nats.NATS()
    events = EventStream(client)
    secret = runtime.identity_secret.get_secret_value() if runtime.identity_secret else None
    gateway = Gateway(settings, runtime, events=events, identity_secret=secret)
    runner = web.AppRunner(
        gateway.application(), shutdown_timeout=runtime.shutdown_grace, access_log=None,
        handler_cancellation=True,
        # Above the gateway's own limit, so that it rejects headers up to
        # twice that size with 431. aiohttp rejects larger ones with 400.
        max_line_size=2 * settings.max_header_bytes, max_field_size=2 * settings.max_header_bytes,
    )
    await runner.setup()
    connecting = asyncio.create_task(_connect_nats(client, runtime, stopping))
    try:
        site = web.TCPSite(
            runner, settings.host, runtime.gateway_port, ssl_context=server_ssl_context(settings),
            reuse_address=True,
        )
        try:
            await site.start()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {settings.host}:{runtime.gateway_port}: {exc.strerror}; set "
                "TIDINGS_GATEWAY_PORT to a free port"
            ) from exc
        scheme = "https" if settings.tls_cert_file else "http"
        logger.info("gateway ready", extra={"url": f"{scheme}://{settings.host}:{runtime.gateway_port}",
                                            "auth": settings.auth_enabled})
        await stopping.wait()
        logger.info("stopping; draining in-flight requests", extra={"grace_s": runtime.shutdown_grace})
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await runner.cleanup()
        await gateway.close()
        if client.is_connected:
            await client.drain()
    logger.info("gateway stopped")
    return 0


class _WithoutRequestBytes(logging.Filter):
    """Replace aiohttp's report of a malformed request, whose text quotes the request's bytes.

    Those bytes can be an Authorization header, and secrets stay out of logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BadHttpMessage):
            record.msg = "rejected a malformed or oversized HTTP request"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def main() -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    try:
        runtime = load_settings()
        settings = load_settings(GatewaySettings)
    except ConfigurationError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc

    configure_logging("gateway", runtime.log_level)
    logging.getLogger("aiohttp.server").addFilter(_WithoutRequestBytes())
    try:
        provider = configure_tracing("gateway")
    except ValueError as exc:
        logger.error("invalid tracing configuration", extra={"error": str(exc)})
        raise SystemExit(2) from exc

    try:
        code = asyncio.run(serve(settings, runtime))
    except (ConfigurationError, AuthConfigError, BackendConfigError, RouteError) as exc:
        logger.error("cannot start", extra={"error": str(exc)})
        code = 2
    finally:
        shutdown_tracing(provider)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
