"""Field paths of the services' violations, renamed to the JSON names HTTP clients use."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2, status_pb2

from gateway.transcode import json_field_path, with_json_field_names
from tidings.orders.v1 import order_service_pb2
from tidings.users.v1 import user_service_pb2

CREATE_USER = user_service_pb2.CreateUserRequest.DESCRIPTOR
PLACE_ORDER = order_service_pb2.PlaceOrderRequest.DESCRIPTOR


@pytest.mark.parametrize(
    ("descriptor", "path", "expected"),
    [
        (CREATE_USER, "user.display_name", "user.displayName"),
        (CREATE_USER, "request_id", "requestId"),
        (CREATE_USER, "user.email", "user.email"),
        (PLACE_ORDER, "line_items[1].product_id", "lineItems[1].productId"),
        (CREATE_USER, "user.no_such_field.more_text", "user.no_such_field.more_text"),
        (CREATE_USER, "event", "event"),
        (CREATE_USER, "", ""),
    ],
)
def test_json_field_path_table(descriptor: Descriptor, path: str, expected: str) -> None:
    assert json_field_path(descriptor, path) == expected


def test_with_json_field_names_rewrites_bad_request() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="user.display_name", description="empty")
    status = status_pb2.Status(code=3)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))

    with_json_field_names(status, CREATE_USER)

    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == ["user.displayName"]


def test_with_json_field_names_keeps_other_details() -> None:
    status = status_pb2.Status(code=3)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="EMAIL_TAKEN"))

    with_json_field_names(status, CREATE_USER)

    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "EMAIL_TAKEN"


def _renamed(message: str, description: str) -> tuple[str, str]:
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="user.display_name", description=description
    )
    status = status_pb2.Status(code=3, message=message)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))

    with_json_field_names(status, CREATE_USER)

    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    return status.message, bad_request.field_violations[0].description


def test_json_field_names_in_message() -> None:
    message, _ = _renamed("invalid request: user.display_name: must not be empty", "must not be empty")

    assert message == "invalid request: user.displayName: must not be empty"


def test_json_field_names_in_description() -> None:
    _, description = _renamed("invalid", "user.display_name must not be empty")

    assert description == "user.displayName must not be empty"


def test_json_field_names_keep_longer_names() -> None:
    message, _ = _renamed("see user.display_name_hint and my.user.display_name", "empty")

    assert message == "see user.display_name_hint and my.user.display_name"
