"""Unit tests of gateway/openapi.py and the committed gateway/api/openapi.json."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2

from gateway.openapi import build_openapi, openapi_path
from gateway.routes import required_scope
from gateway.schemas import load_proto_comments
from tidings.orders.v1 import order_pb2, order_service_pb2
from tidings.users.v1 import user_service_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
SCRIPT = ROOT / "scripts" / "generate_api_docs.py"
SCHEMAS = "#/components/schemas/"


def _annotated_methods() -> list[MethodDescriptor]:
    """Return every RPC with a google.api.http rule, found from the *_service.proto files."""
    methods: list[MethodDescriptor] = []
    for path in sorted(PROTOS.glob("tidings/*/v1/*_service.proto")):
        module_name = str(path.relative_to(PROTOS).with_suffix("")).replace("/", ".") + "_pb2"
        module = importlib.import_module(module_name)
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(
                method for method in service.methods if method.GetOptions().HasExtension(annotations_pb2.http)
            )
    return methods


ANNOTATED_METHODS = _annotated_methods()


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def comments() -> dict[str, str]:
    return load_proto_comments(PROTOS)


@pytest.fixture(scope="module")
def document(comments: dict[str, str]) -> dict[str, Any]:
    return build_openapi(comments)


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for http_method, operation in item.items():
            yield path, http_method, operation


def _operation_by_id(document: dict[str, Any], operation_id: str) -> tuple[str, str, dict[str, Any]]:
    for path, http_method, operation in _operations(document):
        if operation["operationId"] == operation_id:
            return path, http_method, operation
    raise AssertionError(f"no operation {operation_id}")


def _shape(path: str) -> str:
    """Return path with its variables blanked, so `{id}` and `{user.id}` compare equal."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openapi_version(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"


def test_openapi_info_title_and_version(document: dict[str, Any]) -> None:
    assert document["info"]["title"]
    assert document["info"]["version"] == "v1"


def test_openapi_annotated_methods_found() -> None:
    assert len(ANNOTATED_METHODS) >= 18


@pytest.mark.parametrize("method", ANNOTATED_METHODS, ids=lambda method: method.full_name)
def test_openapi_rpc_has_operation(document: dict[str, Any], method: MethodDescriptor) -> None:
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    expected_method = rule.WhichOneof("pattern")
    expected_path = getattr(rule, expected_method)

    path, http_method, _ = _operation_by_id(document, f"{method.containing_service.name}_{method.name}")

    assert http_method == expected_method
    assert _shape(path) == _shape(expected_path)


@pytest.mark.parametrize("method", ANNOTATED_METHODS, ids=lambda method: method.full_name)
def test_openapi_rpc_security_scope(document: dict[str, Any], method: MethodDescriptor) -> None:
    _, _, operation = _operation_by_id(document, f"{method.containing_service.name}_{method.name}")

    assert operation["security"] == [{"bearerAuth": [required_scope(method)]}]


def test_openapi_operation_ids_unique(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in _operations(document)]

    assert len(ids) == len(set(ids))


def test_openapi_nested_path_variable_shares_path(document: dict[str, Any]) -> None:
    path, _, operation = _operation_by_id(document, "UserService_UpdateUser")
    parameter = operation["parameters"][0]

    assert path == "/v1/users/{id}"
    assert parameter["name"] == "id"
    assert parameter["description"] == "Sets `user.id` of the request."


def test_openapi_custom_verb_path(document: dict[str, Any]) -> None:
    path, http_method, _ = _operation_by_id(document, "OrderService_CancelOrder")

    assert path == "/v1/orders/{id}:cancel"
    assert http_method == "post"


def test_openapi_path_params_declared_and_required(document: dict[str, Any]) -> None:
    for path, http_method, operation in _operations(document):
        variables = re.findall(r"\{([^}]+)\}", path)
        path_parameters = [p for p in operation.get("parameters", []) if p["in"] == "path"]

        assert [p["name"] for p in path_parameters] == variables, f"{http_method} {path}"
        assert all(p["required"] is True for p in path_parameters), f"{http_method} {path}"


def test_openapi_get_has_no_request_body(document: dict[str, Any]) -> None:
    for path, http_method, operation in _operations(document):
        if http_method in ("get", "delete"):
            assert "requestBody" not in operation, f"{http_method} {path}"


def test_openapi_list_query_parameters(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "UserService_ListUsers")
    query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}

    assert sorted(query) == ["pageSize", "pageToken"]
    assert query["pageSize"]["schema"] == {"type": "integer", "format": "int32"}


def test_openapi_field_body_rest_in_query(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "UserService_CreateUser")
    query = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]

    assert query == ["requestId"]
    assert body_schema["$ref"] == SCHEMAS + "tidings.users.v1.User-Input"


def test_openapi_update_mask_query_string(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "UserService_UpdateUser")
    update_mask = next(p for p in operation["parameters"] if p["name"] == "updateMask")

    assert update_mask["in"] == "query"
    assert update_mask["schema"] == {"type": "string"}
    assert "lowerCamelCase" in update_mask["description"]


def test_openapi_star_body_excludes_path_fields(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "PaymentService_TopUp")
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]

    assert sorted(body_schema["properties"]) == ["amountCents", "requestId"]
    assert body_schema["additionalProperties"] is False


def test_openapi_star_body_has_no_query(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "OrderService_PlaceOrder")
    query = [p for p in operation.get("parameters", []) if p["in"] == "query"]

    assert query == []


def test_openapi_int64_as_string(document: dict[str, Any]) -> None:
    revision = _schema(document, "tidings.users.v1.User")["properties"]["revision"]

    assert revision["type"] == "string"
    assert revision["format"] == "int64"


def test_openapi_int32_as_integer(document: dict[str, Any]) -> None:
    quantity = _schema(document, "tidings.orders.v1.LineItem")["properties"]["quantity"]

    assert quantity["type"] == "integer"
    assert quantity["format"] == "int32"


def test_openapi_enum_value_names(document: dict[str, Any]) -> None:
    state = _schema(document, "tidings.orders.v1.OrderState")

    assert state["type"] == "string"
    assert state["enum"] == [value.name for value in order_pb2.OrderState.DESCRIPTOR.values]


def test_openapi_enum_field_refers_to_enum(document: dict[str, Any]) -> None:
    state = _schema(document, "tidings.orders.v1.Order")["properties"]["state"]

    assert state["$ref"] == SCHEMAS + "tidings.orders.v1.OrderState"


def test_openapi_timestamp_date_time(document: dict[str, Any]) -> None:
    create_time = _schema(document, "tidings.users.v1.User")["properties"]["createTime"]

    assert create_time["type"] == "string"
    assert create_time["format"] == "date-time"


def test_openapi_json_names_camel_case(document: dict[str, Any]) -> None:
    properties = _schema(document, "tidings.users.v1.User")["properties"]

    assert "displayName" in properties
    assert "display_name" not in properties


def test_openapi_repeated_as_array(document: dict[str, Any]) -> None:
    line_items = _schema(document, "tidings.orders.v1.Order")["properties"]["lineItems"]

    assert line_items["type"] == "array"
    assert line_items["items"] == {"$ref": SCHEMAS + "tidings.orders.v1.LineItem"}


def test_openapi_request_schema_rejects_unknown_fields(document: dict[str, Any]) -> None:
    assert _schema(document, "tidings.users.v1.User-Input")["additionalProperties"] is False


def test_openapi_response_schema_open(document: dict[str, Any]) -> None:
    assert "additionalProperties" not in _schema(document, "tidings.users.v1.User")


def test_openapi_responses_success_and_status(document: dict[str, Any]) -> None:
    for path, http_method, operation in _operations(document):
        default_schema = operation["responses"]["default"]["content"]["application/json"]["schema"]

        assert "200" in operation["responses"], f"{http_method} {path}"
        assert default_schema == {"$ref": SCHEMAS + "google.rpc.Status"}, f"{http_method} {path}"


def test_openapi_success_response_message(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "OrderService_GetOrder")
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]

    assert schema == {"$ref": SCHEMAS + "tidings.orders.v1.GetOrderResponse"}


def test_openapi_status_schema_fields(document: dict[str, Any]) -> None:
    status = _schema(document, "google.rpc.Status")

    assert sorted(status["properties"]) == ["code", "details", "message"]
    assert status["properties"]["details"]["items"]["required"] == ["@type"]


def test_openapi_refs_resolve(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for ref in set(_refs(document)):
        assert ref.startswith(SCHEMAS), ref
        assert ref.removeprefix(SCHEMAS) in schemas, ref


def test_openapi_bearer_scheme(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"]["bearerAuth"]

    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    assert scheme["bearerFormat"] == "JWT"


def test_openapi_every_operation_secured(document: dict[str, Any]) -> None:
    for path, http_method, operation in _operations(document):
        assert list(operation["security"][0]) == ["bearerAuth"], f"{http_method} {path}"


def test_openapi_summary_from_proto_comment(document: dict[str, Any]) -> None:
    _, _, operation = _operation_by_id(document, "UserService_GetUser")

    assert operation["summary"] == "Returns one user"
    assert operation["description"].endswith("Requires the scope `users:read`.")


def test_openapi_without_comments_has_no_summary() -> None:
    document = build_openapi()
    _, _, operation = _operation_by_id(document, "UserService_GetUser")

    assert "summary" not in operation


def test_openapi_events_stream(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/events"]["get"]
    parameters = {(p["in"], p["name"]): p for p in operation["parameters"]}

    assert operation["security"] == [{"bearerAuth": ["events:read"]}]
    assert parameters[("query", "subject")]["required"] is True
    assert parameters[("query", "start")]["schema"]["enum"] == ["new", "all"]
    assert ("header", "Last-Event-ID") in parameters
    assert ("query", "last_event_id") in parameters
    assert "text/event-stream" in operation["responses"]["200"]["content"]


def test_required_scope_read_for_no_side_effects() -> None:
    method = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].methods_by_name["GetUser"]

    assert required_scope(method) == "users:read"


def test_required_scope_write_otherwise() -> None:
    service = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]

    assert required_scope(service.methods_by_name["CancelOrder"]) == "orders:write"


def test_required_scope_rejects_other_package() -> None:
    method = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]

    with pytest.raises(ValueError, match=re.escape("tidings.<context>.<version>")):
        required_scope(method)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("/v1/users/{user.id}", ("/v1/users/{user.id}", ["user.id"])),
        ("/v1/orders/{id}:cancel", ("/v1/orders/{id}:cancel", ["id"])),
        ("/v1/users/{user_id=*}/wallet:topUp", ("/v1/users/{user_id}/wallet:topUp", ["user_id"])),
        ("/v1/products", ("/v1/products", [])),
    ],
)
def test_openapi_path_template_conversion(template: str, expected: tuple[str, list[str]]) -> None:
    assert openapi_path(template) == expected


@pytest.mark.parametrize("template", ["v1/users", "/v1/{name=shelves/*}", "/v1/**", "/v1//users"])
def test_openapi_path_template_unsupported(template: str) -> None:
    with pytest.raises(ValueError, match=r"must start with|not supported"):
        openapi_path(template)


def test_openapi_build_deterministic(comments: dict[str, str]) -> None:
    first = json.dumps(build_openapi(comments), sort_keys=True)
    second = json.dumps(build_openapi(comments), sort_keys=True)

    assert first == second


def test_openapi_committed_file_fresh(comments: dict[str, str]) -> None:
    script = _load_script()
    committed = (ROOT / "gateway" / "api" / "openapi.json").read_text(encoding="utf-8")

    assert committed == script.render(build_openapi(comments)), (
        "gateway/api/openapi.json is stale: run `python scripts/generate_api_docs.py` and commit the result"
    )


def test_generate_api_docs_check_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False, cwd=ROOT
    )

    assert result.returncode == 0, result.stderr


def test_generate_api_docs_check_names_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _load_script()
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "OUTPUT", tmp_path / "gateway" / "api")
    monkeypatch.setattr(sys, "argv", ["generate_api_docs.py", "--check"])
    (tmp_path / "gateway" / "api").mkdir(parents=True)
    (tmp_path / "gateway" / "api" / "openapi.json").write_text("{}\n", encoding="utf-8")

    exit_code = script.main()
    errors = capsys.readouterr().err

    assert exit_code == 1
    assert "gateway/api/openapi.json is stale: run `python scripts/generate_api_docs.py`" in errors
    assert "gateway/api/asyncapi.json is missing" in errors
