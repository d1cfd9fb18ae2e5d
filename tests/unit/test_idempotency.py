"""Unit tests of fingerprint() in services/runtime/idempotency.py."""

from __future__ import annotations

import re

from services.runtime.idempotency import fingerprint
from tidings.users.v1 import user_pb2, user_service_pb2


def _create_request(
    email: str = "ada@example.com", request_id: str = "r-1"
) -> user_service_pb2.CreateUserRequest:
    return user_service_pb2.CreateUserRequest(
        user=user_pb2.User(email=email, display_name="Ada Lovelace"), request_id=request_id
    )


def test_fingerprint_is_sha256_hex() -> None:
    digest = fingerprint(_create_request())

    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_fingerprint_same_request_same_value() -> None:
    first = fingerprint(_create_request())

    second = fingerprint(_create_request())

    assert first == second


def test_fingerprint_ignores_request_id() -> None:
    first = fingerprint(_create_request(request_id="r-1"))

    second = fingerprint(_create_request(request_id="r-2"))

    assert first == second


def test_fingerprint_request_id_unset_matches() -> None:
    with_id = fingerprint(_create_request(request_id="r-1"))

    without_id = fingerprint(_create_request(request_id=""))

    assert with_id == without_id


def test_fingerprint_differs_on_other_field() -> None:
    first = fingerprint(_create_request(email="ada@example.com"))

    second = fingerprint(_create_request(email="grace@example.com"))

    assert first != second


def test_fingerprint_leaves_request_unchanged() -> None:
    request = _create_request(request_id="r-1")

    fingerprint(request)

    assert request.request_id == "r-1"
