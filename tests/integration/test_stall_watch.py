"""The stalled-consumer watch against real nats-servers: no false alarm, a real leader stepdown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import ServiceUnavailableError

from services.runtime import stall
from services.runtime.cli.embedded_nats import EmbeddedCluster, EmbeddedNats
from services.runtime.stall import ConsumerPosition, StallWatch
from tests.helpers import wait_for

SUBJECT = "tidings.users.user.created"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    nodes = EmbeddedCluster(tmp_path / "cluster", 3)
    nodes.start()
    yield nodes
    nodes.stop()


async def _stream_with_consumer(url: str, replicas: int) -> nats.NATS:
    client = await nats.connect(servers=url.split(","))
    js = client.jetstream()
    config = StreamConfig(name="USERS", subjects=["tidings.users.>"], num_replicas=replicas)

    async def stream_created() -> bool:
        # A new cluster may still place the stream's replicas; the services retry too.
        try:
            await js.add_stream(config)
        except (NatsTimeoutError, ServiceUnavailableError):
            return False
        return True

    await wait_for(stream_created, timeout=30)
    await js.add_consumer("USERS", ConsumerConfig(
        durable_name="watched", ack_policy=AckPolicy.EXPLICIT, filter_subjects=[SUBJECT],
    ))
    return client


async def test_stall_watch_ignores_a_healthy_consumer(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stall, "CHECK_INTERVAL", 0.0)
    client = await _stream_with_consumer(nats_server.url, replicas=1)
    try:
        for index in range(3):
            await client.jetstream().publish(SUBJECT, f"event {index}".encode())
        watch = StallWatch(client, "USERS", "watched", [SUBJECT])

        for _ in range(3):
            await watch.on_idle()
    finally:
        await client.close()

    assert watch.stepdowns == 0


async def test_stall_watch_stepdown_elects_a_new_leader(cluster: EmbeddedCluster) -> None:
    client = await _stream_with_consumer(cluster.url, replicas=3)
    try:
        js = client.jetstream()
        before = (await js.consumer_info("USERS", "watched")).cluster.leader
        watch = StallWatch(client, "USERS", "watched", [SUBJECT])

        await watch._step_down(ConsumerPosition(delivered=0, pending=0, ack_pending=0, newest=1))

        async def new_leader() -> str | None:
            try:
                leader = (await js.consumer_info("USERS", "watched", timeout=1)).cluster.leader
            except NatsTimeoutError:
                return None  # No leader while the election runs.
            return leader if leader and leader != before else None

        await wait_for(new_leader, timeout=20)
    finally:
        await client.close()

    assert watch.stepdowns == 1
