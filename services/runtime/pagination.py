"""Opaque page tokens for keyset pagination (AIP-158).

A token contains the sort key of the last item returned and a hash of the
request's filter fields, so a token sent with other filters is rejected
instead of silently returning the wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from services.runtime.validation import Violations


def _filter_hash(filters: dict[str, Any]) -> str:
    encoded = json.dumps(filters, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def encode_page_token(after: int, filters: dict[str, Any] | None = None) -> str:
    """Return the token for the page that follows the item with sort key ``after``."""
    body = json.dumps({"a": after, "f": _filter_hash(filters or {})}).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_page_token(
    violations: Violations, field: str, token: str, filters: dict[str, Any] | None = None
) -> int | None:
    """Return the sort key a token continues after, or None for the first page."""
    if not token:
        return None
    after: object = None
    digest: object = None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = body["a"]
        digest = body["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    if not isinstance(after, int) or isinstance(after, bool) or not isinstance(digest, str):
        violations.add(field, "is not a token returned by this method; send it unchanged")
        return None
    if digest != _filter_hash(filters or {}):
        violations.add(field, "belongs to a request with other parameters; start from page one")
        return None
    return after
