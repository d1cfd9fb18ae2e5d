"""Unit tests of services/runtime/validation.py."""

from __future__ import annotations

import pytest

from services.runtime.errors import FieldViolation, InvalidArgument
from services.runtime.validation import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Violations,
    check_email,
    check_id,
    check_page_size,
    check_request_id,
    check_text,
)


def test_email_valid_accepted() -> None:
    violations = Violations()

    result = check_email(violations, "user.email", "ada@example.com")

    assert result == "ada@example.com"
    assert violations.items == []


def test_email_surrounding_whitespace_trimmed() -> None:
    violations = Violations()

    result = check_email(violations, "user.email", "  ada@example.com\n")

    assert result == "ada@example.com"
    assert violations.items == []


def test_email_domain_lower_cased() -> None:
    violations = Violations()

    result = check_email(violations, "user.email", "ada@Mail.EXAMPLE.com")

    assert result == "ada@mail.example.com"


def test_email_local_part_case_kept() -> None:
    violations = Violations()

    result = check_email(violations, "user.email", "Ada.Lovelace@EXAMPLE.COM")

    assert result.split("@")[0] == "Ada.Lovelace"


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("ada.example.com", id="missing-at"),
        pytest.param("ada@localhost", id="no-dot-in-domain"),
        pytest.param("ada lovelace@example.com", id="space-in-local-part"),
        pytest.param("ada@exa mple.com", id="space-in-domain"),
        pytest.param("ada@@example.com", id="two-at-signs"),
        pytest.param("@example.com", id="empty-local-part"),
        pytest.param("ada@example..com", id="empty-domain-label"),
        pytest.param("ada@example.com.", id="trailing-dot"),
    ],
)
def test_email_invalid_format_rejected(address: str) -> None:
    violations = Violations()

    check_email(violations, "user.email", address)

    assert len(violations.items) == 1
    assert violations.items[0].field == "user.email"
    assert "is not an email address" in violations.items[0].description


def test_email_empty_is_required() -> None:
    violations = Violations()

    check_email(violations, "user.email", "   ")

    assert len(violations.items) == 1
    assert violations.items[0].description.startswith("is required")


def test_email_254_characters_accepted() -> None:
    address = "a" * 64 + "@" + "b" * 185 + ".com"
    violations = Violations()

    check_email(violations, "user.email", address)

    assert len(address) == 254
    assert violations.items == []


def test_email_over_254_characters_rejected() -> None:
    address = "a" * 64 + "@" + "b" * 186 + ".com"
    violations = Violations()

    check_email(violations, "user.email", address)

    assert len(violations.items) == 1
    assert violations.items[0].description == "is 255 characters long; the maximum is 254"


def test_text_returns_trimmed_value() -> None:
    violations = Violations()

    result = check_text(violations, "user.display_name", "  Ada Lovelace \t", max_length=100)

    assert result == "Ada Lovelace"
    assert violations.items == []


def test_text_blank_required_rejected() -> None:
    violations = Violations()

    result = check_text(violations, "user.display_name", " \t ", max_length=100)

    assert result == ""
    assert violations.items == [FieldViolation("user.display_name", "is required; send a non-empty value")]


def test_text_blank_optional_accepted() -> None:
    violations = Violations()

    result = check_text(violations, "user.bio", "   ", max_length=100, required=False)

    assert result == ""
    assert violations.items == []


def test_text_at_max_length_accepted() -> None:
    violations = Violations()

    check_text(violations, "user.display_name", "x" * 100, max_length=100)

    assert violations.items == []


def test_text_too_long_names_length() -> None:
    violations = Violations()

    check_text(violations, "user.display_name", "x" * 101, max_length=100)

    assert len(violations.items) == 1
    assert violations.items[0].description == "is 101 characters long; the maximum is 100"


def test_text_length_counted_after_trim() -> None:
    violations = Violations()

    check_text(violations, "user.display_name", "  " + "x" * 100 + "  ", max_length=100)

    assert violations.items == []


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Ada\x00Lovelace", id="nul"),
        pytest.param("Ada\nLovelace", id="newline"),
        pytest.param("Ada\tLovelace", id="tab"),
        pytest.param("Ada\x1bLovelace", id="escape"),
        pytest.param("Ada\x7fLovelace", id="delete"),
    ],
)
def test_text_control_characters_rejected(value: str) -> None:
    violations = Violations()

    check_text(violations, "user.display_name", value, max_length=100)

    assert len(violations.items) == 1
    assert violations.items[0].description == "contains control characters; remove them"


def test_text_non_ascii_letters_accepted() -> None:
    violations = Violations()

    check_text(violations, "user.display_name", "Zoë Ångström 李", max_length=100)

    assert violations.items == []


def test_id_returns_canonical_lower_case() -> None:
    violations = Violations()

    result = check_id(violations, "id", "0F8FAD5B-D9CB-469F-A165-70867728950E")

    assert result == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert violations.items == []


def test_id_without_hyphens_canonicalised() -> None:
    violations = Violations()

    result = check_id(violations, "id", "0f8fad5bd9cb469fa16570867728950e")

    assert result == "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_id_invalid_rejected() -> None:
    violations = Violations()

    result = check_id(violations, "id", "user-42")

    assert result == "user-42"
    assert len(violations.items) == 1
    assert violations.items[0].field == "id"
    assert "'user-42' is not a UUID" in violations.items[0].description


def test_id_invalid_value_shortened_in_message() -> None:
    violations = Violations()

    check_id(violations, "id", "z" * 500)

    assert "z" * 65 not in violations.items[0].description


def test_id_empty_is_required() -> None:
    violations = Violations()

    result = check_id(violations, "id", "")

    assert result == ""
    assert len(violations.items) == 1
    assert violations.items[0].description.startswith("is required")


def test_request_id_empty_accepted() -> None:
    violations = Violations()

    check_request_id(violations, "request_id", "")

    assert violations.items == []


def test_request_id_128_characters_accepted() -> None:
    violations = Violations()

    check_request_id(violations, "request_id", "r" * 128)

    assert violations.items == []


def test_request_id_too_long_rejected() -> None:
    violations = Violations()

    check_request_id(violations, "request_id", "r" * 129)

    assert violations.items == [FieldViolation("request_id", "is 129 characters long; the maximum is 128")]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("retry 1", id="space"),
        pytest.param("retry\x001", id="nul"),
        pytest.param("retry\n", id="newline"),
        pytest.param("réessai", id="non-ascii"),
    ],
)
def test_request_id_non_printable_rejected(value: str) -> None:
    violations = Violations()

    check_request_id(violations, "request_id", value)

    assert len(violations.items) == 1
    assert violations.items[0].description.startswith("must be printable ASCII")


def test_page_size_negative_rejected() -> None:
    violations = Violations()

    result = check_page_size(violations, "page_size", -1)

    assert result == DEFAULT_PAGE_SIZE
    assert len(violations.items) == 1
    assert violations.items[0].field == "page_size"
    assert violations.items[0].description.startswith("is -1;")


def test_page_size_zero_means_default() -> None:
    violations = Violations()

    result = check_page_size(violations, "page_size", 0)

    assert result == 50
    assert violations.items == []


def test_page_size_in_range_kept() -> None:
    violations = Violations()

    result = check_page_size(violations, "page_size", 1000)

    assert result == 1000


def test_page_size_above_max_coerced() -> None:
    violations = Violations()

    result = check_page_size(violations, "page_size", 1001)

    assert result == MAX_PAGE_SIZE
    assert violations.items == []


def test_violations_none_raises_nothing() -> None:
    violations = Violations()

    violations.raise_if_any()

    assert violations.items == []


def test_violations_raise_lists_every_violation() -> None:
    violations = Violations()
    check_email(violations, "user.email", "not-an-address")
    check_text(violations, "user.display_name", "", max_length=100)

    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()

    fields = [violation.field for violation in raised.value.violations]
    assert fields == ["user.email", "user.display_name"]
    assert "user.email: " in raised.value.message
    assert "user.display_name: is required" in raised.value.message
