"""The start-up check of the JetStream settings that Tidings' delivery promises rely on.

Each problem names the setting that does not hold and how to fix it. By
default the service logs each one as a warning and starts; with
TIDINGS_STRICT_GUARANTEES=true it refuses to start instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable

from nats.js import JetStreamContext

from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError
from services.runtime.streams import StreamSpec

logger = logging.getLogger(__name__)

# The relay retries a failed publish after at most this many seconds.
RELAY_MAX_BACKOFF = 5.0


async def check_guarantees(settings: Settings, js: JetStreamContext, streams: Iterable[StreamSpec]) -> None:
    """Check replicas, duplicate windows, ack_wait and disk sync; warn or raise per strict mode.

    Raises:
        ConfigurationError: Strict mode is on and at least one check failed.
    """
    problems = [
        *await _stream_problems(settings, js, streams),
        *_consumer_problems(settings),
        *await _sync_problems(settings),
    ]
    for problem in problems:
        logger.warning("delivery guarantee not met", extra={"problem": problem})
    if problems and settings.strict_guarantees:
        raise ConfigurationError(
            "TIDINGS_STRICT_GUARANTEES is on and the JetStream settings break a delivery guarantee: "
            + "; ".join(problems)
        )


def relay_retry_horizon(settings: Settings) -> float:
    """Return the longest time between a publish and its republish that the relay can cause.

    A relay that crashes after JetStream's ack but before marking the row
    sent republishes it when it runs again, TIDINGS_MAX_RELAY_DOWNTIME
    later at most by assumption, or after a publish timeout and a backoff.
    """
    return settings.max_relay_downtime + settings.relay_publish_timeout + RELAY_MAX_BACKOFF


async def _stream_problems(
    settings: Settings, js: JetStreamContext, streams: Iterable[StreamSpec]
) -> list[str]:
    problems = []
    horizon = relay_retry_horizon(settings)
    for stream in streams:
        config = (await js.stream_info(stream.name)).config
        replicas = config.num_replicas or 1
        if replicas < settings.required_replicas:
            problems.append(
                f"stream {stream.name} has {replicas} replica(s) but TIDINGS_REQUIRED_REPLICAS is "
                f"{settings.required_replicas}: run a cluster and set TIDINGS_STREAM_REPLICAS to "
                f"{settings.required_replicas} or more"
            )
        window = config.duplicate_window or 0
        if window < horizon:
            problems.append(
                f"stream {stream.name} drops duplicates for {window:g} s, less than the relay's retry "
                f"horizon of {horizon:g} s, so a republish after a crash could be stored twice: set "
                f"TIDINGS_DUPLICATE_WINDOW to {horizon:g} or more"
            )
    return problems


def _consumer_problems(settings: Settings) -> list[str]:
    if settings.consumer_ack_wait >= settings.consumer_handler_timeout:
        return []
    return [
        f"TIDINGS_CONSUMER_ACK_WAIT ({settings.consumer_ack_wait:g} s) is shorter than "
        f"TIDINGS_CONSUMER_HANDLER_TIMEOUT ({settings.consumer_handler_timeout:g} s), so a handler "
        "whose in-progress acks are lost could run twice at once: raise the ack wait or lower the "
        "handler timeout"
    ]


async def _sync_problems(settings: Settings) -> list[str]:
    if not settings.nats_monitor_url:
        return [
            "cannot tell whether the nats-server syncs every write to disk: set "
            "TIDINGS_NATS_MONITOR_URL to its monitoring URL (such as http://127.0.0.1:8222) so that "
            "the check can read it"
        ]
    try:
        varz = await asyncio.to_thread(_read_varz, settings.nats_monitor_url)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        return [f"cannot read {settings.nats_monitor_url}/varz ({exc}): check TIDINGS_NATS_MONITOR_URL"]
    config = varz.get("jetstream", {}).get("config", {})
    if config.get("sync_always"):
        return []
    interval = config.get("sync_interval", 0)
    seconds = interval / 1e9 if isinstance(interval, int | float) else 0
    return [
        "the nats-server syncs JetStream writes to disk only every "
        f"{seconds:g} s, so acknowledged events can be lost on a power "
        "failure: run it with `jetstream { sync_interval: always }`"
    ]


def _read_varz(monitor_url: str) -> dict[str, dict[str, dict[str, object]]]:
    with urllib.request.urlopen(f"{monitor_url.rstrip('/')}/varz", timeout=3) as response:
        varz: dict[str, dict[str, dict[str, object]]] = json.loads(response.read())
        return varz
