"""Request validation that collects every field violation before failing."""

from __future__ import annotations

import re
import uuid

from services.runtime.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_EMAIL_LENGTH = 254
MAX_REQUEST_ID_LENGTH = 128

_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


class Violations:
    """Accumulates field violations; ``raise_if_any`` ends the call with all of them."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Record one invalid field."""
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        """Raise InvalidArgument listing every recorded violation, if there are any."""
        if self.items:
            raise InvalidArgument(self.items)


def check_text(
    violations: Violations, field: str, value: str, *, max_length: int, required: bool = True
) -> str:
    """Check a free-text field and return it with surrounding whitespace trimmed."""
    trimmed = value.strip()
    if not trimmed:
        if required:
            violations.add(field, "is required; send a non-empty value")
        return trimmed
    if len(trimmed) > max_length:
        violations.add(field, f"is {len(trimmed)} characters long; the maximum is {max_length}")
    elif any(ord(char) < 0x20 or ord(char) == 0x7F for char in trimmed):
        violations.add(field, "contains control characters; remove them")
    return trimmed


def check_email(violations: Violations, field: str, value: str) -> str:
    """Check an email address and return it trimmed, with the domain lower-cased."""
    trimmed = value.strip()
    if not trimmed:
        violations.add(field, "is required; send an address such as ada@example.com")
        return trimmed
    if len(trimmed) > MAX_EMAIL_LENGTH:
        violations.add(
            field, f"is {len(trimmed)} characters long; the maximum is {MAX_EMAIL_LENGTH}"
        )
        return trimmed
    if not _EMAIL.fullmatch(trimmed):
        violations.add(field, f"{trimmed!r} is not an email address such as ada@example.com")
        return trimmed
    local, _, domain = trimmed.rpartition("@")
    return f"{local}@{domain.lower()}"


def check_id(violations: Violations, field: str, value: str) -> str:
    """Check that a resource id is a UUID and return it in canonical lower-case form."""
    if not value:
        violations.add(field, "is required; send the id returned when the resource was created")
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        violations.add(field, f"{value[:64]!r} is not a UUID such as {uuid.UUID(int=1)}")
        return value


def check_request_id(violations: Violations, field: str, value: str) -> None:
    """Check an optional client request id: 1 to 128 printable ASCII characters."""
    if not value:
        return
    if len(value) > MAX_REQUEST_ID_LENGTH:
        violations.add(
            field, f"is {len(value)} characters long; the maximum is {MAX_REQUEST_ID_LENGTH}"
        )
    elif not _PRINTABLE_ASCII.fullmatch(value):
        violations.add(field, "must be printable ASCII without spaces, such as a UUID")


def check_page_size(violations: Violations, field: str, value: int) -> int:
    """Return the effective page size: the default for 0, at most MAX_PAGE_SIZE."""
    if value < 0:
        violations.add(field, f"is {value}; send 0 for the default or a value up to {MAX_PAGE_SIZE}")
        return DEFAULT_PAGE_SIZE
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def check_range(violations: Violations, field: str, value: int, minimum: int, maximum: int) -> None:
    """Check that an integer field is within minimum..maximum, both included."""
    if not minimum <= value <= maximum:
        violations.add(field, f"is {value}; send a value from {minimum} to {maximum}")


def check_update_mask(violations: Violations, paths: list[str], allowed: tuple[str, ...]) -> set[str]:
    """Check an update mask and return the allowed paths it names."""
    field_list = ", ".join(allowed)
    if not paths:
        violations.add("update_mask", f"is required; list the fields to change: {field_list}")
    for path in paths:
        if path not in allowed:
            violations.add("update_mask", f"path {path!r} cannot be updated; use {field_list}")
    return {path for path in paths if path in allowed}
