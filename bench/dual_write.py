"""The users service with a naive dual write, a baseline for the outbox (``python -m bench.dual_write``).

CreateUser runs the same validation and transaction as the real service, but
instead of writing the event to the outbox it publishes the event itself after
the commit and awaits JetStream's ack before it returns. That is the usual
alternative to an outbox, and it can lose the event if the process dies
between the commit and the publish. Everything else (settings, health,
tracing, the notifications consumer downstream) is the real runtime.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import grpc

from observability.propagation import inject_context
from services.runtime.events import cloudevent_headers
from services.runtime.service import Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import USERS
from services.runtime.validation import Violations, check_email, check_request_id, check_text
from services.users import store
from services.users.servicer import MAX_DISPLAY_NAME_LENGTH, SUBJECT_CREATED, UserServicer
from tidings.users.v1 import user_events_pb2, user_service_pb2, user_service_pb2_grpc


class DualWriteUserServicer(UserServicer):
    """UserService whose CreateUser publishes inline instead of through the outbox."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._runtime = runtime
        self._js = runtime.nats.jetstream()

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

        async with self._runtime.database.transaction() as tx:
            replayed = await self._runtime.request_log.replay(
                tx, "CreateUser", request, user_service_pb2.CreateUserResponse
            )
            if replayed is not None:
                return replayed
            user = await store.insert_user(tx, str(uuid.uuid4()), email, display_name)
            response = user_service_pb2.CreateUserResponse(user=user)
            await self._runtime.request_log.record(tx, "CreateUser", request, response)

        event_id = str(uuid.uuid4())
        headers = cloudevent_headers(
            event_id=event_id, source="/tidings/users", event_type="tidings.users.v1.UserCreated",
            time=datetime.now(UTC), subject=user.id,
        )
        inject_context(headers)
        body = user_events_pb2.UserCreated(user=user).SerializeToString()
        await self._js.publish(SUBJECT_CREATED, body, headers=headers)
        return response


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind the dual-write UserService to the runtime."""
    name = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
    binding = user_service_pb2_grpc.add_UserServiceServicer_to_server
    return [(binding, DualWriteUserServicer(runtime), name)]


SPEC = ServiceSpec(name="users", metadata=store.metadata, servicers=servicers, streams=(USERS,))


if __name__ == "__main__":
    run(SPEC)
