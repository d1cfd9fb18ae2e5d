"""Errors of the Tidings runtime and their gRPC status codes.

    TidingsError
    ├── ConfigurationError      invalid setting at start; never sent to a client
    ├── PermanentEventError     raised by an event handler: retrying cannot help
    └── ServiceError            raised by handlers, sent as google.rpc.Status
        ├── InvalidArgument     INVALID_ARGUMENT with BadRequest field violations
        ├── NotFound            NOT_FOUND
        ├── AlreadyExists       ALREADY_EXISTS
        ├── FailedPrecondition  FAILED_PRECONDITION
        └── Unavailable         UNAVAILABLE (a dependency is down; retry later)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

# ErrorInfo.domain of every error Tidings services send (AIP-193).
ERROR_DOMAIN = "tidings.dev"


class TidingsError(Exception):
    """Base class of every error the Tidings runtime raises on purpose."""


class ConfigurationError(TidingsError):
    """A setting has an invalid value; the message names the variable and the fix."""


class PermanentEventError(TidingsError):
    """Raised by an event handler for an event that can never succeed.

    The consumer moves the event to the dead letters at once instead of
    spending its remaining deliveries on it.
    """


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: its path (``user.email``) and what is wrong."""

    field: str
    description: str


class ServiceError(TidingsError):
    """An error a handler raises to end a call with a specific status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """Return the google.rpc detail messages to pack into the status."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        """Build the google.rpc.Status sent in the ``grpc-status-details-bin`` trailer."""
        return status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )


class InvalidArgument(ServiceError):
    """The request has invalid fields; each one is listed as a field violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


class NotFound(ServiceError):
    """The resource named in the request does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """The request would create a second resource with a unique value already in use."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The resource is not in a state that allows the request."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    """A dependency is unreachable; the client may retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


def internal_status(message: str) -> status_pb2.Status:
    """Build the status for an unexpected failure, without any exception text."""
    return status_pb2.Status(code=code_pb2.INTERNAL, message=message)
