"""gRPC NotificationService: lists the notifications stored for a user."""

from __future__ import annotations

import grpc

from services.notifications import store
from services.runtime.pagination import decode_page_token, encode_page_token
from services.runtime.service import Runtime
from services.runtime.validation import Violations, check_id, check_page_size
from tidings.notifications.v1 import notification_service_pb2, notification_service_pb2_grpc


class NotificationServicer(notification_service_pb2_grpc.NotificationServiceServicer):
    """Implements tidings.notifications.v1.NotificationService."""

    def __init__(self, runtime: Runtime) -> None:
        self._database = runtime.database

    async def ListNotifications(
        self,
        request: notification_service_pb2.ListNotificationsRequest,
        context: grpc.aio.ServicerContext,
    ) -> notification_service_pb2.ListNotificationsResponse:
        violations = Violations()
        user_id = check_id(violations, "user_id", request.user_id)
        page_size = check_page_size(violations, "page_size", request.page_size)
        filters = {"user_id": user_id}
        after = decode_page_token(violations, "page_token", request.page_token, filters)
        violations.raise_if_any()

        async with self._database.transaction() as tx:
            rows = await store.list_for_user(tx, user_id, after, page_size + 1)

        response = notification_service_pb2.ListNotificationsResponse(
            notifications=[store.to_message(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = encode_page_token(rows[page_size - 1].seq, filters)
        return response
