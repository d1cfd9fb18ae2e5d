"""UserService against a real nats-server and SQLite: results, errors and events."""

from __future__ import annotations

import grpc
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import func, select

from services.runtime.service import Service
from tests.helpers import error_reason, field_violations, wait_for
from tidings.users.v1 import user_events_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc

UserStub = user_service_pb2_grpc.UserServiceStub


def create_request(email: str = "ada@example.com", name: str = "Ada", request_id: str = ""):
    return user_service_pb2.CreateUserRequest(
        user=user_pb2.User(email=email, display_name=name), request_id=request_id
    )


async def stream_messages(nats_client: NATS, stream: str = "USERS") -> int:
    return (await nats_client.jetstream().stream_info(stream)).state.messages


async def outbox_rows(service: Service) -> int:
    table = service.runtime.outbox.table
    async with service.runtime.database.transaction() as tx:
        return int((await tx.execute(select(func.count()).select_from(table))).scalar_one())


async def settle_with_one_good_call(users: UserStub, nats_client: NATS) -> None:
    """Publish one known event and wait until it is stored, so earlier publishes would show."""
    await users.CreateUser(create_request("marker@example.com", "Marker"))
    await wait_for(lambda: _has_messages(nats_client))


async def _has_messages(nats_client: NATS) -> bool:
    return await stream_messages(nats_client) > 0


async def test_create_user_returns_user(users: UserStub) -> None:
    response = await users.CreateUser(create_request("Ada@Example.COM", "  Ada  "))

    assert response.user.email == "Ada@example.com"
    assert response.user.display_name == "Ada"
    assert response.user.revision == 1
    assert len(response.user.id) == 36


async def test_create_user_publishes_cloudevent(users: UserStub, nats_client: NATS) -> None:
    subscription = await nats_client.jetstream().subscribe("tidings.users.>", ordered_consumer=True)

    response = await users.CreateUser(create_request())
    message = await subscription.next_msg(timeout=10)

    headers = message.headers or {}
    assert message.subject == "tidings.users.user.created"
    assert headers["ce-type"] == "tidings.users.v1.UserCreated"
    assert headers["ce-subject"] == response.user.id
    assert headers["Nats-Msg-Id"] == headers["ce-id"]
    assert user_events_pb2.UserCreated.FromString(message.data).user == response.user


@pytest.mark.parametrize(
    ("email", "name", "request_id", "field"),
    [
        ("not-an-email", "Ada", "", "user.email"),
        ("", "Ada", "", "user.email"),
        ("ada@localhost", "Ada", "", "user.email"),
        ("a" * 250 + "@example.com", "Ada", "", "user.email"),
        ("ada@example.com", "", "", "user.display_name"),
        ("ada@example.com", "   ", "", "user.display_name"),
        ("ada@example.com", "x" * 101, "", "user.display_name"),
        ("ada@example.com", "Ada\x00", "", "user.display_name"),
        ("ada@example.com", "Ada", "r" * 129, "request_id"),
        ("ada@example.com", "Ada", "has space", "request_id"),
    ],
)
async def test_create_user_bad_input_rejected(
    users: UserStub, users_service: Service, nats_client: NATS,
    email: str, name: str, request_id: str, field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.CreateUser(create_request(email, name, request_id))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert await outbox_rows(users_service) == 0
    await settle_with_one_good_call(users, nats_client)
    assert await stream_messages(nats_client) == 1


async def test_create_user_reports_every_bad_field(users: UserStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.CreateUser(create_request("nope", ""))

    assert set(field_violations(raised.value)) == {"user.email", "user.display_name"}


async def test_create_user_duplicate_email_already_exists(
    users: UserStub, users_service: Service, nats_client: NATS
) -> None:
    await users.CreateUser(create_request("ada@example.com"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.CreateUser(create_request("ADA@example.com", "Other Ada"))

    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(raised.value) == "EMAIL_TAKEN"
    assert await outbox_rows(users_service) == 1


async def test_create_user_retry_returns_first_user(
    users: UserStub, users_service: Service
) -> None:
    first = await users.CreateUser(create_request(request_id="retry-1"))

    second = await users.CreateUser(create_request(request_id="retry-1"))

    assert second.user == first.user
    assert await outbox_rows(users_service) == 1


async def test_request_id_reused_for_other_request(users: UserStub) -> None:
    await users.CreateUser(create_request("ada@example.com", request_id="same-key"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.CreateUser(create_request("grace@example.com", request_id="same-key"))

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(raised.value) == "REQUEST_ID_REUSED"


async def test_get_user_unknown_id_not_found(users: UserStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.GetUser(user_service_pb2.GetUserRequest(id="00000000-0000-4000-8000-000000000000"))

    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_user_malformed_id_invalid(users: UserStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.GetUser(user_service_pb2.GetUserRequest(id="42"))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in field_violations(raised.value)


async def test_list_users_pages_through_all(users: UserStub) -> None:
    for index in range(5):
        await users.CreateUser(create_request(f"user{index}@example.com", f"User {index}"))

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await users.ListUsers(user_service_pb2.ListUsersRequest(page_size=2, page_token=token))
        seen.extend(user.email for user in page.users)
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert seen == [f"user{index}@example.com" for index in range(5)]
    assert pages == 3


async def test_list_users_negative_page_size_invalid(users: UserStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.ListUsers(user_service_pb2.ListUsersRequest(page_size=-1))

    assert "page_size" in field_violations(raised.value)


async def test_list_users_garbage_token_invalid(users: UserStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.ListUsers(user_service_pb2.ListUsersRequest(page_token="garbage!"))

    assert "page_token" in field_violations(raised.value)


async def test_update_user_changes_fields_and_publishes(
    users: UserStub, nats_client: NATS
) -> None:
    created = await users.CreateUser(create_request())
    subscription = await nats_client.jetstream().subscribe(
        "tidings.users.user.updated", ordered_consumer=True
    )
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=created.user.id, display_name="Countess")
    )
    request.update_mask.paths.append("display_name")

    response = await users.UpdateUser(request)
    message = await subscription.next_msg(timeout=10)

    assert response.user.display_name == "Countess"
    assert response.user.revision == 2
    assert list(user_events_pb2.UserUpdated.FromString(message.data).changed_fields.paths) == [
        "display_name"
    ]


async def test_update_user_without_change_publishes_nothing(
    users: UserStub, users_service: Service
) -> None:
    created = await users.CreateUser(create_request())
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=created.user.id, display_name="Ada")
    )
    request.update_mask.paths.append("display_name")

    response = await users.UpdateUser(request)

    assert response.user.revision == 1
    assert await outbox_rows(users_service) == 1


@pytest.mark.parametrize(("paths", "field"), [([], "update_mask"), (["id"], "update_mask")])
async def test_update_user_bad_mask_invalid(
    users: UserStub, users_service: Service, paths: list[str], field: str
) -> None:
    created = await users.CreateUser(create_request())
    request = user_service_pb2.UpdateUserRequest(user=user_pb2.User(id=created.user.id))
    request.update_mask.paths.extend(paths)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.UpdateUser(request)

    assert field in field_violations(raised.value)
    assert await outbox_rows(users_service) == 1


async def test_update_user_taken_email_already_exists(users: UserStub) -> None:
    await users.CreateUser(create_request("ada@example.com"))
    grace = await users.CreateUser(create_request("grace@example.com", "Grace"))
    request = user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=grace.user.id, email="ADA@example.com")
    )
    request.update_mask.paths.append("email")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.UpdateUser(request)

    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_delete_user_removes_and_publishes(users: UserStub, nats_client: NATS) -> None:
    created = await users.CreateUser(create_request())
    subscription = await nats_client.jetstream().subscribe(
        "tidings.users.user.deleted", ordered_consumer=True
    )

    await users.DeleteUser(user_service_pb2.DeleteUserRequest(id=created.user.id))
    message = await subscription.next_msg(timeout=10)

    assert user_events_pb2.UserDeleted.FromString(message.data).user_id == created.user.id
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await users.GetUser(user_service_pb2.GetUserRequest(id=created.user.id))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_user_retry_with_request_id_succeeds(users: UserStub) -> None:
    created = await users.CreateUser(create_request())
    request = user_service_pb2.DeleteUserRequest(id=created.user.id, request_id="delete-1")
    await users.DeleteUser(request)

    response = await users.DeleteUser(request)

    assert response == user_service_pb2.DeleteUserResponse()


async def test_events_of_one_user_keep_their_order(users: UserStub, nats_client: NATS) -> None:
    subscription = await nats_client.jetstream().subscribe("tidings.users.>", ordered_consumer=True)
    created = await users.CreateUser(create_request())
    for index in range(3):
        request = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=created.user.id, display_name=f"Ada {index}")
        )
        request.update_mask.paths.append("display_name")
        await users.UpdateUser(request)
    await users.DeleteUser(user_service_pb2.DeleteUserRequest(id=created.user.id))

    subjects = [(await subscription.next_msg(timeout=10)).subject for _ in range(5)]

    assert subjects == [
        "tidings.users.user.created",
        "tidings.users.user.updated",
        "tidings.users.user.updated",
        "tidings.users.user.updated",
        "tidings.users.user.deleted",
    ]


async def test_oversized_event_rejected_before_commit(
    users: UserStub, users_service: Service, nats_client: NATS
) -> None:
    from services.runtime.errors import InvalidArgument
    from services.runtime.events import Event

    runtime = users_service.runtime
    huge = user_pb2.User(id="u-1", display_name="x" * (2 * 1024 * 1024))

    with pytest.raises(InvalidArgument) as raised:
        async with runtime.database.transaction() as tx:
            await runtime.outbox.add(tx, [Event("tidings.users.user.updated",
                                                user_events_pb2.UserUpdated(user=huge), "u-1")])

    assert "NATS accepts at most" in raised.value.violations[0].description
    assert await outbox_rows(users_service) == 0
    assert runtime.nats.is_connected
    await settle_with_one_good_call(users, nats_client)
    assert await stream_messages(nats_client) == 1
