"""GET /v1/events through the whole gateway: authorized like any route, events in order."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import Gateway
from gateway.events import EventStream
from services.runtime.config import Settings
from tests.helpers import wait_for
from tests.integration.gateway_fixtures import Api, gateway_settings, running_gateway, running_system, token

EVENTS_PATH = "/v1/events?subject=tidings.users.user.created&start=all"


ORIGIN = "https://app.example"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running_system(settings, ["users"]), running_gateway(
        settings, gateway_settings(cors_origins=(ORIGIN,)), events=True
    ) as (_, client):
        yield client


async def read_events(
    api: Api, count: int, headers: dict[str, str], path: str = EVENTS_PATH
) -> list[dict[str, Any]]:
    """Read count SSE events from the gateway, each as its id and CloudEvent."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with api.session.get(api.base + path, headers=headers) as reply:
        assert reply.status == 200, await reply.text()
        async for raw in reply.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                current["id"] = line[4:]
            elif line.startswith("data: "):
                current["event"] = json.loads(line[6:])
            elif not line and "event" in current:
                events.append(current)
                current = {}
                if len(events) == count:
                    break
    return events


async def create_users(api: Api, count: int) -> None:
    for index in range(count):
        status, body, _ = await api.call(
            "POST", "/v1/users", json={"email": f"user{index}@example.com", "displayName": "U"}
        )
        assert status == 200, body


async def test_gateway_events_without_a_token_is_401(api: Api) -> None:
    status, _, _ = await api.call("GET", EVENTS_PATH, bearer=None)

    assert status == 401


async def test_gateway_events_without_the_events_scope_is_403(api: Api) -> None:
    status, _, _ = await api.call("GET", EVENTS_PATH, bearer=token(scopes=["users:read"]))

    assert status == 403


async def test_gateway_events_arrive_in_order(api: Api) -> None:
    await create_users(api, 3)

    events = await read_events(api, 3, {"Authorization": f"Bearer {token()}"})

    assert [e["event"]["data"]["user"]["email"] for e in events] == [
        "user0@example.com", "user1@example.com", "user2@example.com",
    ]


async def test_events_resume_without_gaps_or_repeats(api: Api) -> None:
    await create_users(api, 4)
    first = await read_events(api, 2, {"Authorization": f"Bearer {token()}"})

    rest = await read_events(
        api, 2, {"Authorization": f"Bearer {token()}", "Last-Event-ID": first[-1]["id"]}
    )

    assert [int(e["id"]) for e in first + rest] == [1, 2, 3, 4]


async def test_events_take_token_as_query_parameter(api: Api) -> None:
    await create_users(api, 1)

    events = await read_events(api, 1, {}, path=f"{EVENTS_PATH}&access_token={token()}")

    assert events[0]["event"]["data"]["user"]["email"] == "user0@example.com"


async def test_access_token_parameter_rejected_elsewhere(api: Api) -> None:
    status, _, _ = await api.call("GET", f"/v1/users?access_token={token()}", bearer=None)

    assert status == 401


async def test_gateway_events_answer_an_allowed_origin(api: Api) -> None:
    headers = {"Authorization": f"Bearer {token()}", "Origin": ORIGIN}
    async with api.session.get(api.base + EVENTS_PATH, headers=headers) as reply:
        allowed = reply.headers.get("Access-Control-Allow-Origin")

    assert allowed == ORIGIN


@pytest.fixture
async def one_stream_api(settings: Settings) -> AsyncIterator[Api]:
    limited = gateway_settings(max_streams_per_caller=1)
    async with running_system(settings, ["users"]), running_gateway(settings, limited, events=True) as front:
        yield front[1]


async def test_gateway_events_limit_open_streams_per_caller(one_stream_api: Api) -> None:
    api = one_stream_api
    headers = {"Authorization": f"Bearer {token()}"}
    async with api.session.get(api.base + EVENTS_PATH, headers=headers) as first:
        await first.content.readline()  # The stream is open once its first comment arrives.
        status, body, _ = await api.call("GET", EVENTS_PATH)

    assert status == 429
    assert [d.get("reason") for d in body["details"]] == ["TOO_MANY_STREAMS"], body


async def test_stream_slot_freed_after_client_leaves(one_stream_api: Api) -> None:
    api = one_stream_api
    headers = {"Authorization": f"Bearer {token()}"}
    async with api.session.get(api.base + EVENTS_PATH, headers=headers) as first:
        await first.content.readline()

    async def reopened() -> bool:
        async with api.session.get(api.base + EVENTS_PATH, headers=headers) as again:
            return again.status == 200

    assert await wait_for(reopened, timeout=10)


async def test_gateway_events_before_nats_is_reached_is_503() -> None:
    never_connected = nats.NATS()
    front = Gateway(gateway_settings(), Settings(), events=EventStream(never_connected))
    async with TestClient(TestServer(front.application(), host="127.0.0.1")) as client:
        reply = await client.get(EVENTS_PATH, headers={"Authorization": f"Bearer {token()}"})
        body = await reply.json()
    await front.close()

    assert reply.status == 503
    assert [d.get("reason") for d in body["details"]] == ["EVENTS_UNAVAILABLE"], body
