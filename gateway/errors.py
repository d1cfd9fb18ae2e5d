"""Error responses: google.rpc.Status as JSON, with gRPC codes mapped to HTTP statuses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiohttp import web
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

# The mapping google/rpc/code.proto documents for each code.
HTTP_STATUS_OF_CODE: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

# The code an HTTP error the gateway raises itself is reported with.
CODE_OF_HTTP_STATUS: dict[int, int] = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    413: code_pb2.INVALID_ARGUMENT,
    415: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    431: code_pb2.INVALID_ARGUMENT,
    499: code_pb2.CANCELLED,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.DEADLINE_EXCEEDED,
}

ERROR_DOMAIN = "tidings.dev"

JSON_CONTENT_TYPE = "application/json"

# Keys under which an error response keeps its message and reason for the request log.
ERROR_MESSAGE = web.ResponseKey("tidings_error_message", str)
ERROR_REASON = web.ResponseKey("tidings_error_reason", str)


def status_response(
    status: status_pb2.Status,
    *,
    http_status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Return status as its proto3 JSON form, with the HTTP status of its code.

    The response keeps the status's message and ErrorInfo reason under
    ERROR_MESSAGE and ERROR_REASON, for the gateway's request log.
    """
    body = json_format.MessageToJson(status, indent=None)
    response = web.Response(
        status=http_status or HTTP_STATUS_OF_CODE.get(status.code, 500),
        text=body,
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )
    response[ERROR_MESSAGE] = status.message
    response[ERROR_REASON] = _reason_of(status) or ""
    return response


def _reason_of(status: status_pb2.Status) -> str | None:
    """Return the reason of the status's ErrorInfo detail, or None without one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def _pack(messages: Iterable[Message]) -> list[any_pb2.Any]:
    packed = []
    for message in messages:
        item = any_pb2.Any()
        item.Pack(message)
        packed.append(item)
    return packed


def error_response(
    http_status: int,
    message: str,
    *,
    reason: str,
    details: Iterable[Message] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Return an error the gateway itself decided, as a google.rpc.Status body.

    reason becomes an ErrorInfo detail in the tidings.dev domain, so clients
    can branch on it without parsing message.
    """
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    status = status_pb2.Status(
        code=CODE_OF_HTTP_STATUS.get(http_status, code_pb2.UNKNOWN),
        message=message,
        details=_pack([info, *details]),
    )
    return status_response(status, http_status=http_status, headers=headers)


def bad_request(field: str, description: str) -> web.Response:
    """Return 400 naming the request field that is wrong and what is expected."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    return error_response(
        400,
        f"invalid request: {field}: {description}",
        reason="INVALID_ARGUMENT",
        details=[error_details_pb2.BadRequest(field_violations=[violation])],
    )
