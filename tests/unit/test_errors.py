"""Unit tests of services/runtime/errors.py.

Each status is serialised and parsed again, as a client reads the
``grpc-status-details-bin`` trailer, before its details are unpacked.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.runtime.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    internal_status,
)


def _received_status(error: ServiceError) -> status_pb2.Status:
    """Return the status as a client parses it from the trailer bytes."""
    return status_pb2.Status.FromString(error.to_status().SerializeToString())


def _unpack(detail: any_pb2.Any, message_type: type) -> object:
    message = message_type()
    assert detail.Unpack(message), f"detail is a {detail.type_url}, not a {message_type.__name__}"
    return message


@pytest.fixture
def invalid_argument() -> InvalidArgument:
    return InvalidArgument(
        [
            FieldViolation("user.email", "is required; send an address such as ada@example.com"),
            FieldViolation("user.display_name", "is required; send a non-empty value"),
        ]
    )


def test_invalid_argument_status_code(invalid_argument: InvalidArgument) -> None:
    status = _received_status(invalid_argument)

    assert status.code == code_pb2.INVALID_ARGUMENT


def test_invalid_argument_status_message(invalid_argument: InvalidArgument) -> None:
    status = _received_status(invalid_argument)

    assert status.message == (
        "invalid request: user.email: is required; send an address such as ada@example.com; "
        "user.display_name: is required; send a non-empty value"
    )


def test_invalid_argument_detail_types(invalid_argument: InvalidArgument) -> None:
    status = _received_status(invalid_argument)

    type_names = [detail.TypeName() for detail in status.details]
    assert type_names == ["google.rpc.ErrorInfo", "google.rpc.BadRequest"]


def test_invalid_argument_error_info(invalid_argument: InvalidArgument) -> None:
    status = _received_status(invalid_argument)

    info = _unpack(status.details[0], error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "tidings.dev"


def test_invalid_argument_field_violations(invalid_argument: InvalidArgument) -> None:
    status = _received_status(invalid_argument)

    bad_request = _unpack(status.details[1], error_details_pb2.BadRequest)
    violations = [(v.field, v.description) for v in bad_request.field_violations]
    assert violations == [
        ("user.email", "is required; send an address such as ada@example.com"),
        ("user.display_name", "is required; send a non-empty value"),
    ]


def test_not_found_status_code() -> None:
    status = _received_status(NotFound("user 42 not found"))

    assert status.code == code_pb2.NOT_FOUND
    assert status.message == "user 42 not found"


def test_not_found_error_info() -> None:
    status = _received_status(NotFound("user 42 not found"))

    info = _unpack(status.details[0], error_details_pb2.ErrorInfo)
    assert len(status.details) == 1
    assert info.reason == "NOT_FOUND"
    assert info.domain == ERROR_DOMAIN


def test_already_exists_status_code() -> None:
    status = _received_status(AlreadyExists("email ada@example.com is taken"))

    assert status.code == code_pb2.ALREADY_EXISTS


def test_already_exists_error_info() -> None:
    status = _received_status(AlreadyExists("email ada@example.com is taken"))

    info = _unpack(status.details[0], error_details_pb2.ErrorInfo)
    assert info.reason == "ALREADY_EXISTS"


@pytest.mark.parametrize(
    ("error_class", "grpc_code", "rpc_code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
        (Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    ],
)
def test_error_class_codes_agree(
    error_class: type[ServiceError], grpc_code: grpc.StatusCode, rpc_code: int
) -> None:
    assert error_class.code is grpc_code
    assert grpc_code.value[0] == rpc_code


def test_service_error_custom_reason_and_metadata() -> None:
    error = FailedPrecondition(
        "request_id 'r1' was already used for a different request",
        reason="REQUEST_ID_REUSED",
        metadata={"request_id": "r1"},
    )

    status = _received_status(error)

    info = _unpack(status.details[0], error_details_pb2.ErrorInfo)
    assert status.code == code_pb2.FAILED_PRECONDITION
    assert info.reason == "REQUEST_ID_REUSED"
    assert dict(info.metadata) == {"request_id": "r1"}


def test_service_error_custom_reason_per_instance() -> None:
    FailedPrecondition("first", reason="REQUEST_ID_REUSED")

    second = FailedPrecondition("second")

    assert second.reason == "FAILED_PRECONDITION"


def test_internal_status_has_no_details() -> None:
    status = internal_status("internal error; quote trace id 0af7651916cd43dd8448eb211c80319c")

    assert status.code == code_pb2.INTERNAL
    assert list(status.details) == []
