"""Unit tests of gateway/cors.py."""

from __future__ import annotations

import pytest

from gateway.cors import CorsPolicy
from gateway.settings import GatewaySettings

APP = "https://app.example"
OTHER = "https://evil.example"


@pytest.fixture
def policy() -> CorsPolicy:
    return CorsPolicy([APP], allow_credentials=False, max_age=600)


@pytest.fixture
def credentialed() -> CorsPolicy:
    return CorsPolicy([APP], allow_credentials=True, max_age=600)


@pytest.fixture
def wildcard() -> CorsPolicy:
    return CorsPolicy(["*"], allow_credentials=False, max_age=600)


def _allow_headers(headers: dict[str, str]) -> list[str]:
    return [name for name in headers if name.lower().startswith("access-control-allow-")]


def test_cors_preflight_allowed_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(APP, "POST", "Content-Type, Authorization")

    assert status == 204


def test_cors_preflight_allowed_echoes_origin(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "POST", "Content-Type")

    assert headers["Access-Control-Allow-Origin"] == APP


def test_cors_preflight_allowed_methods(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "PATCH", None)

    assert headers["Access-Control-Allow-Methods"] == "GET, POST, PATCH, DELETE"


def test_cors_preflight_allowed_headers_listed(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "GET", "Last-Event-ID")

    assert headers["Access-Control-Allow-Headers"] == (
        "Authorization, Content-Type, Last-Event-ID, traceparent, tracestate, Request-Timeout, X-Request-Id"
    )


def test_cors_preflight_max_age(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "GET", None)

    assert headers["Access-Control-Max-Age"] == "600"


def test_cors_preflight_no_credentials_header_by_default(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "GET", None)

    assert "Access-Control-Allow-Credentials" not in headers


def test_cors_preflight_credentials_header(credentialed: CorsPolicy) -> None:
    _, headers = credentialed.preflight(APP, "GET", "Authorization")

    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_preflight_credentials_echo_origin(credentialed: CorsPolicy) -> None:
    _, headers = credentialed.preflight(APP, "GET", "Authorization")

    assert headers["Access-Control-Allow-Origin"] == APP


def test_cors_preflight_disallowed_origin_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(OTHER, "GET", None)

    assert status == 403


def test_cors_preflight_disallowed_origin_no_allow_headers(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(OTHER, "GET", None)

    assert _allow_headers(headers) == []


def test_cors_preflight_missing_origin_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(None, "GET", None)

    assert status == 403


def test_cors_preflight_origin_other_port_rejected(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(APP + ":8443", "GET", None)

    assert status == 403


def test_cors_preflight_disallowed_method_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(APP, "PUT", None)

    assert status == 403


def test_cors_preflight_disallowed_method_no_allow_headers(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "PUT", None)

    assert _allow_headers(headers) == []


def test_cors_preflight_missing_method_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(APP, None, None)

    assert status == 403


def test_cors_preflight_method_case_sensitive(policy: CorsPolicy) -> None:
    # Browsers send "patch" unchanged and then compare it case-sensitively
    # with Access-Control-Allow-Methods, so allowing it here would not help.
    status, _ = policy.preflight(APP, "patch", None)

    assert status == 403


def test_cors_preflight_custom_methods() -> None:
    policy = CorsPolicy([APP], allowed_methods=["GET", "PUT"])

    status, _ = policy.preflight(APP, "PUT", None)

    assert status == 204


def test_cors_preflight_disallowed_header_status(policy: CorsPolicy) -> None:
    status, _ = policy.preflight(APP, "POST", "Content-Type, X-Debug")

    assert status == 403


def test_cors_preflight_disallowed_header_no_allow_headers(policy: CorsPolicy) -> None:
    _, headers = policy.preflight(APP, "POST", "Content-Type, X-Debug")

    assert _allow_headers(headers) == []


@pytest.mark.parametrize(
    "request_headers",
    [
        "authorization,content-type",
        "AUTHORIZATION, CONTENT-TYPE",
        "Traceparent, TRACESTATE, last-event-id, request-timeout",
    ],
)
def test_cors_preflight_header_names_case_insensitive(policy: CorsPolicy, request_headers: str) -> None:
    status, _ = policy.preflight(APP, "POST", request_headers)

    assert status == 204


def test_cors_preflight_configured_header_case_insensitive() -> None:
    policy = CorsPolicy([APP], allowed_headers=["X-API-VERSION"])

    status, _ = policy.preflight(APP, "GET", "x-api-version")

    assert status == 204


@pytest.mark.parametrize("request_headers", ["", " , ", "content-type,,authorization"])
def test_cors_preflight_empty_header_items_ignored(policy: CorsPolicy, request_headers: str) -> None:
    status, _ = policy.preflight(APP, "POST", request_headers)

    assert status == 204


def test_cors_preflight_configured_origin_case(policy: CorsPolicy) -> None:
    # Browsers serialise scheme and host in lower case.
    upper = CorsPolicy(["HTTPS://App.Example"])

    status, _ = upper.preflight(APP, "GET", None)

    assert status == 204


def test_cors_preflight_wildcard_origin(wildcard: CorsPolicy) -> None:
    _, headers = wildcard.preflight(OTHER, "GET", None)

    assert headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight_wildcard_status(wildcard: CorsPolicy) -> None:
    status, _ = wildcard.preflight(OTHER, "GET", None)

    assert status == 204


def test_cors_wildcard_with_credentials_rejected() -> None:
    with pytest.raises(ValueError, match="credentials cannot be combined with the origin"):
        CorsPolicy(["*"], allow_credentials=True)


def test_cors_mixed_wildcard_credentials_rejected() -> None:
    with pytest.raises(ValueError, match="List the allowed origins explicitly"):
        CorsPolicy([APP, "*"], allow_credentials=True)


def test_cors_negative_max_age_rejected() -> None:
    with pytest.raises(ValueError, match="max_age must be 0 or more seconds, got -1"):
        CorsPolicy([APP], max_age=-1)


@pytest.mark.parametrize(
    ("origin", "method", "request_headers"),
    [
        (APP, "POST", "Content-Type"),
        (OTHER, "POST", "Content-Type"),
        (APP, "PUT", None),
        (APP, "POST", "X-Debug"),
        (None, None, None),
    ],
)
def test_cors_preflight_vary_present(
    policy: CorsPolicy, origin: str | None, method: str | None, request_headers: str | None
) -> None:
    _, headers = policy.preflight(origin, method, request_headers)

    assert headers["Vary"] == "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def test_cors_response_allowed_origin(policy: CorsPolicy) -> None:
    headers = policy.response_headers(APP)

    assert headers["Access-Control-Allow-Origin"] == APP


def test_cors_response_exposed_headers(policy: CorsPolicy) -> None:
    headers = policy.response_headers(APP)

    assert headers["Access-Control-Expose-Headers"] == "Retry-After, traceparent, X-Request-Id"


def test_cors_response_custom_exposed_headers() -> None:
    policy = CorsPolicy([APP], exposed_headers=["ETag"])

    headers = policy.response_headers(APP)

    assert headers["Access-Control-Expose-Headers"] == "ETag"


def test_cors_response_no_exposed_headers() -> None:
    policy = CorsPolicy([APP], exposed_headers=[])

    headers = policy.response_headers(APP)

    assert "Access-Control-Expose-Headers" not in headers


def test_cors_response_no_credentials_by_default(policy: CorsPolicy) -> None:
    headers = policy.response_headers(APP)

    assert "Access-Control-Allow-Credentials" not in headers


def test_cors_response_credentials(credentialed: CorsPolicy) -> None:
    headers = credentialed.response_headers(APP)

    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_response_credentials_echo_origin(credentialed: CorsPolicy) -> None:
    headers = credentialed.response_headers(APP)

    assert headers["Access-Control-Allow-Origin"] == APP


def test_cors_response_wildcard_origin(wildcard: CorsPolicy) -> None:
    headers = wildcard.response_headers(OTHER)

    assert headers["Access-Control-Allow-Origin"] == "*"


def test_cors_response_allowed_vary(policy: CorsPolicy) -> None:
    headers = policy.response_headers(APP)

    assert headers["Vary"] == "Origin"


@pytest.mark.parametrize("origin", [OTHER, None])
def test_cors_response_disallowed_only_vary(policy: CorsPolicy, origin: str | None) -> None:
    headers = policy.response_headers(origin)

    assert headers == {"Vary": "Origin"}


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("OPTIONS", {"Origin": APP, "Access-Control-Request-Method": "POST"}, True),
        ("OPTIONS", {"origin": APP, "access-control-request-method": "POST"}, True),
        ("OPTIONS", {"Origin": APP}, False),
        ("OPTIONS", {"Access-Control-Request-Method": "POST"}, False),
        ("POST", {"Origin": APP, "Access-Control-Request-Method": "POST"}, False),
    ],
)
def test_cors_is_preflight(method: str, headers: dict[str, str], expected: bool) -> None:
    assert CorsPolicy.is_preflight(method, headers) is expected


def test_cors_from_settings_origins() -> None:
    settings = GatewaySettings(auth_enabled=False, cors_origins=(APP,), cors_allow_credentials=True)

    status, _ = CorsPolicy.from_settings(settings).preflight(APP, "GET", None)

    assert status == 204


def test_cors_from_settings_credentials() -> None:
    settings = GatewaySettings(auth_enabled=False, cors_origins=(APP,), cors_allow_credentials=True)

    headers = CorsPolicy.from_settings(settings).response_headers(APP)

    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_from_settings_max_age() -> None:
    settings = GatewaySettings(auth_enabled=False, cors_origins=(APP,), cors_max_age=30)

    _, headers = CorsPolicy.from_settings(settings).preflight(APP, "GET", None)

    assert headers["Access-Control-Max-Age"] == "30"


def test_cors_from_settings_no_origins() -> None:
    settings = GatewaySettings(auth_enabled=False)

    status, _ = CorsPolicy.from_settings(settings).preflight(APP, "GET", None)

    assert status == 403


def test_cors_from_settings_uses_configured_allowed_headers() -> None:
    settings = GatewaySettings(
        auth_enabled=False, cors_origins=(APP,), cors_allowed_headers=("Authorization", "X-Client")
    )

    _, headers = CorsPolicy.from_settings(settings).preflight(APP, "GET", "X-Client")

    assert headers["Access-Control-Allow-Headers"] == "Authorization, X-Client"


def test_cors_from_settings_uses_configured_exposed_headers() -> None:
    settings = GatewaySettings(auth_enabled=False, cors_origins=(APP,), cors_exposed_headers=("X-Total",))

    headers = CorsPolicy.from_settings(settings).response_headers(APP)

    assert headers["Access-Control-Expose-Headers"] == "X-Total"
