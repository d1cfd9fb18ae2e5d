"""Unit tests of services/runtime/pagination.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from services.runtime.pagination import decode_page_token, encode_page_token
from services.runtime.validation import Violations

NOT_OUR_TOKEN = "is not a token returned by this method; send it unchanged"
OTHER_PARAMETERS = "belongs to a request with other parameters; start from page one"


def _token_of(body: bytes) -> str:
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def _body_of(token: str) -> dict[str, Any]:
    padded = token + "=" * (-len(token) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


def test_page_token_round_trip() -> None:
    token = encode_page_token(1234)
    violations = Violations()

    after = decode_page_token(violations, "page_token", token)

    assert after == 1234
    assert violations.items == []


def test_page_token_round_trip_with_filters() -> None:
    filters = {"email_domain": "example.com", "active": True}
    token = encode_page_token(7, filters)
    violations = Violations()
    same_filters = {"active": True, "email_domain": "example.com"}

    after = decode_page_token(violations, "page_token", token, same_filters)

    assert after == 7
    assert violations.items == []


def test_page_token_is_url_safe() -> None:
    token = encode_page_token(2**62, {"query": "?&/+= ~"})

    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_page_token_empty_means_first_page() -> None:
    violations = Violations()

    after = decode_page_token(violations, "page_token", "")

    assert after is None
    assert violations.items == []


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage!", id="not-base64-json"),
        pytest.param("a", id="bad-base64-length"),
        pytest.param(_token_of(b"[1, 2]"), id="json-list"),
        pytest.param(_token_of(b"null"), id="json-null"),
        pytest.param(_token_of(b'{"a": 1}'), id="missing-filter-hash"),
        pytest.param(_token_of(b"\xff\xfe\x00"), id="not-utf8"),
    ],
)
def test_page_token_garbage_rejected(token: str) -> None:
    violations = Violations()

    after = decode_page_token(violations, "page_token", token)

    assert after is None
    assert len(violations.items) == 1
    assert violations.items[0].field == "page_token"
    assert violations.items[0].description == NOT_OUR_TOKEN


def test_page_token_other_filters_rejected() -> None:
    token = encode_page_token(7, {"email_domain": "example.com"})
    violations = Violations()

    after = decode_page_token(violations, "page_token", token, {"email_domain": "example.org"})

    assert after is None
    assert len(violations.items) == 1
    assert violations.items[0].field == "page_token"
    assert violations.items[0].description == OTHER_PARAMETERS


def test_page_token_filters_dropped_rejected() -> None:
    token = encode_page_token(7, {"email_domain": "example.com"})
    violations = Violations()

    after = decode_page_token(violations, "page_token", token)

    assert after is None
    assert len(violations.items) == 1


def test_page_token_non_integer_key_rejected() -> None:
    body = _body_of(encode_page_token(7))
    body["a"] = "7"
    token = _token_of(json.dumps(body).encode())
    violations = Violations()

    after = decode_page_token(violations, "page_token", token)

    assert after is None
    assert len(violations.items) == 1
