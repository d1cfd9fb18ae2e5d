"""Every REST route of the gateway against the real services over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.runtime.config import Settings
from tests.helpers import wait_for
from tests.integration.gateway_fixtures import Api, gateway_settings, running_gateway, running_system


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running_system(settings), running_gateway(settings, gateway_settings()) as (_, client):
        yield client


async def create_user(api: Api, email: str = "ada@example.com") -> dict[str, Any]:
    status, body, _ = await api.call("POST", "/v1/users", json={"email": email, "displayName": "Ada"})
    assert status == 200, body
    return body["user"]


async def create_product(api: Api, stock: int = 5, price: int = 250) -> dict[str, Any]:
    status, body, _ = await api.call(
        "POST", "/v1/products", json={"name": "Lamp", "priceCents": str(price), "stock": stock}
    )
    assert status == 200, body
    return body["product"]


async def test_gateway_create_user_returns_camel_case_json(api: Api) -> None:
    user = await create_user(api)

    assert user["displayName"] == "Ada"


async def test_gateway_create_user_int64_is_a_string(api: Api) -> None:
    user = await create_user(api)

    assert user["revision"] == "1"


async def test_gateway_create_user_timestamp_is_rfc3339(api: Api) -> None:
    user = await create_user(api)

    assert user["createTime"].endswith("Z")


async def test_gateway_get_user(api: Api) -> None:
    user = await create_user(api)

    status, body, _ = await api.call("GET", f"/v1/users/{user['id']}")

    assert status == 200, body
    assert body["user"]["email"] == "ada@example.com"


async def test_gateway_list_users_pages_with_query_parameters(api: Api) -> None:
    for index in range(3):
        await create_user(api, f"user{index}@example.com")

    _, first, _ = await api.call("GET", "/v1/users?pageSize=2")
    _, second, _ = await api.call("GET", f"/v1/users?pageSize=2&pageToken={first['nextPageToken']}")

    assert [u["email"] for u in first["users"] + second["users"]] == [
        "user0@example.com", "user1@example.com", "user2@example.com",
    ]


async def test_gateway_update_user_applies_the_field_mask(api: Api) -> None:
    user = await create_user(api)

    status, body, _ = await api.call(
        "PATCH", f"/v1/users/{user['id']}?updateMask=displayName", json={"displayName": "Ada L."}
    )

    assert status == 200, body
    assert body["user"]["displayName"] == "Ada L."


async def test_gateway_update_mask_accepts_proto_field_names(api: Api) -> None:
    user = await create_user(api)

    status, body, _ = await api.call(
        "PATCH", f"/v1/users/{user['id']}?updateMask=display_name", json={"displayName": "Ada L."}
    )

    assert status == 200, body
    assert body["user"]["displayName"] == "Ada L."


async def test_gateway_delete_user_then_get_is_404(api: Api) -> None:
    user = await create_user(api)

    await api.call("DELETE", f"/v1/users/{user['id']}")
    status, body, _ = await api.call("GET", f"/v1/users/{user['id']}")

    assert status == 404, body
    assert body["code"] == 5, body


async def test_create_user_retry_returns_same_user(api: Api) -> None:
    key = str(uuid.uuid4())
    payload = {"email": "grace@example.com", "displayName": "Grace"}

    _, first, _ = await api.call("POST", f"/v1/users?requestId={key}", json=payload)
    _, second, _ = await api.call("POST", f"/v1/users?requestId={key}", json=payload)

    assert first["user"]["id"] == second["user"]["id"]


async def test_duplicate_email_is_409(api: Api) -> None:
    await create_user(api)

    payload = {"email": "ada@example.com", "displayName": "A"}

    status, body, _ = await api.call("POST", "/v1/users", json=payload)

    assert status == 409, body
    assert body["code"] == 6, body


async def test_gateway_service_field_violations_reach_the_client(api: Api) -> None:
    status, body, _ = await api.call("POST", "/v1/users", json={"email": "not-an-email", "displayName": "A"})

    assert status == 400, body
    violations = [
        v["field"] for d in body["details"] if d["@type"].endswith("BadRequest") for v in d["fieldViolations"]
    ]
    assert violations == ["user.email"], body


async def test_gateway_service_violations_use_json_names(api: Api) -> None:
    payload = {"email": "ada@example.com", "displayName": ""}
    status, body, _ = await api.call("POST", "/v1/users", json=payload)

    assert status == 400, body
    violations = [
        v["field"] for d in body["details"] if d["@type"].endswith("BadRequest") for v in d["fieldViolations"]
    ]
    assert violations == ["user.displayName"], body


async def test_gateway_product_routes(api: Api) -> None:
    product = await create_product(api)

    _, got, _ = await api.call("GET", f"/v1/products/{product['id']}")
    _, listed, _ = await api.call("GET", "/v1/products")
    _, updated, _ = await api.call(
        "PATCH", f"/v1/products/{product['id']}?updateMask=stock", json={"stock": "9"}
    )

    assert got["product"]["name"] == "Lamp", got
    assert len(listed["products"]) == 1, listed
    assert updated["product"]["stock"] == "9", updated


async def test_gateway_wallet_routes(api: Api) -> None:
    user = await create_user(api)

    status, topped, _ = await api.call(
        "POST", f"/v1/users/{user['id']}/wallet:topUp", json={"amountCents": "1000"}
    )
    _, wallet, _ = await api.call("GET", f"/v1/users/{user['id']}/wallet")

    assert status == 200, topped
    assert topped["wallet"]["balanceCents"] == "1000", topped
    assert wallet["wallet"]["balanceCents"] == "1000", wallet


async def test_gateway_order_routes_through_the_saga(api: Api) -> None:
    user = await create_user(api)
    product = await create_product(api, stock=5, price=250)
    await api.call("POST", f"/v1/users/{user['id']}/wallet:topUp", json={"amountCents": "1000"})

    status, placed, _ = await api.call(
        "POST", "/v1/orders",
        json={"userId": user["id"], "lineItems": [{"productId": product["id"], "quantity": 2}]},
    )
    assert status == 200, placed
    order_id = placed["order"]["id"]

    async def confirmed() -> dict[str, Any] | None:
        _, body, _ = await api.call("GET", f"/v1/orders/{order_id}")
        return body["order"] if body["order"]["state"] == "ORDER_STATE_CONFIRMED" else None

    order = await wait_for(confirmed, timeout=20)
    _, listed, _ = await api.call("GET", f"/v1/users/{user['id']}/orders")
    _, reservation, _ = await api.call("GET", f"/v1/orders/{order_id}/reservation")
    _, payment, _ = await api.call("GET", f"/v1/orders/{order_id}/payment")

    assert order["totalCents"] == "500", order
    assert [o["id"] for o in listed["orders"]] == [order_id], listed
    assert reservation["reservation"]["totalCents"] == "500", reservation
    assert payment["payment"]["amountCents"] == "500", payment


async def test_gateway_cancel_order_and_notifications(api: Api) -> None:
    user = await create_user(api)
    product = await create_product(api)
    await api.call("POST", f"/v1/users/{user['id']}/wallet:topUp", json={"amountCents": "1000"})
    _, placed, _ = await api.call(
        "POST", "/v1/orders",
        json={"userId": user["id"], "lineItems": [{"productId": product["id"], "quantity": 1}]},
    )
    order_id = placed["order"]["id"]

    status, cancelled, _ = await api.call("POST", f"/v1/orders/{order_id}:cancel", json={})

    assert status == 200, cancelled
    assert cancelled["order"]["state"] == "ORDER_STATE_CANCELLED", cancelled

    async def notified() -> list[dict[str, Any]] | None:
        _, body, _ = await api.call("GET", f"/v1/users/{user['id']}/notifications")
        kinds = [n["kind"] for n in body["notifications"]]
        return body["notifications"] if "NOTIFICATION_KIND_ORDER_CANCELLED" in kinds else None

    await wait_for(notified, timeout=20)


async def test_gateway_serves_the_openapi_document_without_a_token(api: Api) -> None:
    status, body, _ = await api.call("GET", "/openapi.json", bearer=None)

    assert status == 200, body
    assert body["openapi"] == "3.1.0"


async def test_gateway_serves_the_asyncapi_document_without_a_token(api: Api) -> None:
    status, body, _ = await api.call("GET", "/asyncapi.json", bearer=None)

    assert status == 200, body
    assert body["asyncapi"] == "3.0.0"


async def test_gateway_hides_the_server_version(api: Api) -> None:
    _, _, headers = await api.call("GET", "/v1/users")

    assert headers.get("Server") == "tidings-gateway"
