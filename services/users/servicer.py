"""gRPC UserService: validates requests, changes users and writes their events."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from sqlalchemy.exc import IntegrityError

from services.runtime.events import Event
from services.runtime.idempotency import retry_once_on_conflict
from services.runtime.pagination import decode_page_token, encode_page_token
from services.runtime.service import Runtime
from services.runtime.validation import (
    Violations,
    check_email,
    check_id,
    check_page_size,
    check_request_id,
    check_text,
    check_update_mask,
)
from services.users import store
from tidings.users.v1 import user_events_pb2, user_service_pb2, user_service_pb2_grpc

logger = logging.getLogger(__name__)

MAX_DISPLAY_NAME_LENGTH = 100
UPDATABLE_FIELDS = ("email", "display_name")

SUBJECT_CREATED = "tidings.users.user.created"
SUBJECT_UPDATED = "tidings.users.user.updated"
SUBJECT_DELETED = "tidings.users.user.deleted"

ResponseT = TypeVar("ResponseT", bound=Message)


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    """Implements tidings.users.v1.UserService."""

    def __init__(self, runtime: Runtime) -> None:
        self._database = runtime.database
        self._outbox = runtime.outbox
        self._request_log = runtime.request_log

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.CreateUserResponse:
        violations = Violations()
        email = check_email(violations, "user.email", request.user.email)
        display_name = check_text(
            violations, "user.display_name", request.user.display_name,
            max_length=MAX_DISPLAY_NAME_LENGTH,
        )
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        async def create() -> user_service_pb2.CreateUserResponse:
            async with self._database.transaction() as tx:
                replayed = await self._request_log.replay(
                    tx, "CreateUser", request, user_service_pb2.CreateUserResponse
                )
                if replayed is not None:
                    return replayed
                user = await store.insert_user(tx, str(uuid.uuid4()), email, display_name)
                await self._outbox.add(tx, [
                    Event(SUBJECT_CREATED, user_events_pb2.UserCreated(user=user), user.id)
                ])
                response = user_service_pb2.CreateUserResponse(user=user)
                await self._request_log.record(tx, "CreateUser", request, response)
            logger.info("user created", extra={"user_id": user.id})
            return response

        return await retry_once_on_conflict(create, _email_taken(email))

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        violations = Violations()
        user_id = check_id(violations, "id", request.id)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            row = await store.get_user(tx, user_id)
        return user_service_pb2.GetUserResponse(user=store.to_message(row))

    async def ListUsers(
        self, request: user_service_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.ListUsersResponse:
        violations = Violations()
        page_size = check_page_size(violations, "page_size", request.page_size)
        after = decode_page_token(violations, "page_token", request.page_token)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            rows = await store.list_users(tx, after, page_size + 1)

        response = user_service_pb2.ListUsersResponse(
            users=[store.to_message(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = encode_page_token(rows[page_size - 1].seq)
        return response

    async def UpdateUser(
        self, request: user_service_pb2.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.UpdateUserResponse:
        violations = Violations()
        user_id = check_id(violations, "user.id", request.user.id)
        requested = check_update_mask(violations, list(request.update_mask.paths), UPDATABLE_FIELDS)
        check_request_id(violations, "request_id", request.request_id)
        values: dict[str, str] = {}
        if "email" in requested:
            values["email"] = check_email(violations, "user.email", request.user.email)
        if "display_name" in requested:
            values["display_name"] = check_text(
                violations, "user.display_name", request.user.display_name,
                max_length=MAX_DISPLAY_NAME_LENGTH,
            )
        violations.raise_if_any()

        async def apply() -> user_service_pb2.UpdateUserResponse:
            async with self._database.transaction() as tx:
                replayed = await self._request_log.replay(
                    tx, "UpdateUser", request, user_service_pb2.UpdateUserResponse
                )
                if replayed is not None:
                    return replayed
                current = await store.get_user(tx, user_id)
                changes = {k: v for k, v in values.items() if getattr(current, k) != v}
                row = await store.update_user(tx, user_id, changes) if changes else current
                user = store.to_message(row)
                if changes:
                    event = user_events_pb2.UserUpdated(
                        user=user, changed_fields=field_mask_pb2.FieldMask(paths=sorted(changes))
                    )
                    await self._outbox.add(tx, [Event(SUBJECT_UPDATED, event, user.id)])
                response = user_service_pb2.UpdateUserResponse(user=user)
                await self._request_log.record(tx, "UpdateUser", request, response)
            logger.info("user updated", extra={"user_id": user_id, "changed": sorted(changes)})
            return response

        return await retry_once_on_conflict(apply, _email_taken(values.get("email", "")))

    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.DeleteUserResponse:
        violations = Violations()
        user_id = check_id(violations, "id", request.id)
        check_request_id(violations, "request_id", request.request_id)
        violations.raise_if_any()

        async def remove() -> user_service_pb2.DeleteUserResponse:
            async with self._database.transaction() as tx:
                replayed = await self._request_log.replay(
                    tx, "DeleteUser", request, user_service_pb2.DeleteUserResponse
                )
                if replayed is not None:
                    return replayed
                row = await store.get_user(tx, user_id)
                await store.delete_user(tx, user_id)
                event = user_events_pb2.UserDeleted(user_id=user_id, email=row.email)
                await self._outbox.add(tx, [Event(SUBJECT_DELETED, event, user_id)])
                response = user_service_pb2.DeleteUserResponse()
                await self._request_log.record(tx, "DeleteUser", request, response)
            logger.info("user deleted", extra={"user_id": user_id})
            return response

        return await retry_once_on_conflict(remove)


def _email_taken(email: str) -> Callable[[IntegrityError], Exception]:
    """Map a second unique-key conflict of a create or update to ALREADY_EXISTS for email."""
    return lambda exc: store.translate_integrity_error(exc, email)
