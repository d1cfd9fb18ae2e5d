"""Unit tests of gateway/asyncapi.py and the committed gateway/api/asyncapi.json."""

from __future__ import annotations

import importlib
import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor

from gateway.asyncapi import build_asyncapi, event_subject
from gateway.openapi import build_openapi
from gateway.schemas import load_proto_comments
from services.runtime.events import cloudevent_headers
from tidings.events.v1 import options_pb2
from tidings.users.v1 import user_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
SCRIPT = ROOT / "scripts" / "generate_api_docs.py"


def _event_messages_from_protos() -> list[Descriptor]:
    """Return every top-level message of the *_events.proto files, found by file name."""
    messages: list[Descriptor] = []
    for path in sorted(PROTOS.glob("tidings/*/v1/*_events.proto")):
        module_name = str(path.relative_to(PROTOS).with_suffix("")).replace("/", ".") + "_pb2"
        module = importlib.import_module(module_name)
        messages.extend(module.DESCRIPTOR.message_types_by_name.values())
    return messages


EVENT_MESSAGES = _event_messages_from_protos()


def _subject(message: Descriptor) -> str:
    subject: str = message.GetOptions().Extensions[options_pb2.subject]
    return subject


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
    return build_asyncapi(comments)


def _channel_of(document: dict[str, Any], message: Descriptor) -> dict[str, Any]:
    for channel in document["channels"].values():
        if message.name in channel["messages"]:
            return dict(channel)
    raise AssertionError(f"no channel carries {message.full_name}")


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_asyncapi_version(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"


def test_asyncapi_info_notes_protobuf_wire(document: dict[str, Any]) -> None:
    description = document["info"]["description"]

    assert "protobuf on the wire" in description
    assert "proto3 JSON" in description


def test_asyncapi_nats_server(document: dict[str, Any]) -> None:
    server = document["servers"]["nats"]

    assert server["protocol"] == "nats"
    assert server["host"] == "localhost:4222"


def test_asyncapi_one_channel_per_event(document: dict[str, Any]) -> None:
    assert len(document["channels"]) == len(EVENT_MESSAGES)


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_asyncapi_channel_address_is_subject(document: dict[str, Any], message: Descriptor) -> None:
    assert _channel_of(document, message)["address"] == _subject(message)


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_asyncapi_headers_name_message(document: dict[str, Any], message: Descriptor) -> None:
    headers = document["components"]["messages"][message.full_name]["headers"]["properties"]

    assert headers["ce-type"]["const"] == message.full_name
    assert headers["ce-dataschema"]["const"] == f"proto:{message.full_name}"
    assert headers["ce-specversion"]["const"] == "1.0"
    assert headers["content-type"]["const"] == "application/protobuf"


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_asyncapi_content_type_protobuf(document: dict[str, Any], message: Descriptor) -> None:
    assert document["components"]["messages"][message.full_name]["contentType"] == "application/protobuf"


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_asyncapi_receive_operation(document: dict[str, Any], message: Descriptor) -> None:
    operation = document["operations"][f"receive{message.name}"]
    channel = _resolve(document, operation["channel"]["$ref"])

    assert operation["action"] == "receive"
    assert channel["address"] == _subject(message)
    assert operation["messages"] == [
        {"$ref": f"{operation['channel']['$ref']}/messages/{message.name}"}
    ]


def test_asyncapi_required_headers(document: dict[str, Any]) -> None:
    headers = document["components"]["messages"]["tidings.users.v1.UserCreated"]["headers"]

    assert set(headers["required"]) == {
        "ce-id",
        "ce-source",
        "ce-type",
        "ce-specversion",
        "ce-time",
        "ce-subject",
        "ce-dataschema",
        "content-type",
        "Nats-Msg-Id",
    }
    assert "traceparent" in headers["properties"]


def test_asyncapi_required_headers_match_publisher(document: dict[str, Any]) -> None:
    published = cloudevent_headers(
        event_id="id", source="/tidings/users", event_type="t", time=datetime.now(UTC), subject="s"
    )
    headers = document["components"]["messages"]["tidings.users.v1.UserCreated"]["headers"]

    assert set(headers["required"]) == set(published)


def test_asyncapi_payload_refers_to_schema(document: dict[str, Any]) -> None:
    payload = document["components"]["messages"]["tidings.users.v1.UserCreated"]["payload"]

    assert payload == {"$ref": "#/components/schemas/tidings.users.v1.UserCreated"}


def test_asyncapi_refs_resolve(document: dict[str, Any]) -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for item in node for ref in refs(item)]
        return []

    for ref in refs(document):
        assert _resolve(document, ref) is not None, ref


def test_asyncapi_payload_schema_shared_with_openapi(
    document: dict[str, Any], comments: dict[str, str]
) -> None:
    openapi_user = build_openapi(comments)["components"]["schemas"]["tidings.users.v1.User"]

    assert document["components"]["schemas"]["tidings.users.v1.User"] == openapi_user


def test_asyncapi_payload_int64_as_string(document: dict[str, Any]) -> None:
    payment_requested = document["components"]["schemas"]["tidings.orders.v1.PaymentRequested"]
    amount = payment_requested["properties"]["amountCents"]

    assert amount["type"] == "string"
    assert amount["format"] == "int64"


def test_asyncapi_payload_field_mask_string(document: dict[str, Any]) -> None:
    user_updated = document["components"]["schemas"]["tidings.users.v1.UserUpdated"]

    assert user_updated["properties"]["changedFields"]["type"] == "string"


def test_event_subject_missing_option_raises() -> None:
    with pytest.raises(ValueError, match="has no subject"):
        event_subject(user_pb2.User.DESCRIPTOR)


def test_asyncapi_build_deterministic(comments: dict[str, str]) -> None:
    first = json.dumps(build_asyncapi(comments), sort_keys=True)
    second = json.dumps(build_asyncapi(comments), sort_keys=True)

    assert first == second


def test_asyncapi_committed_file_fresh(comments: dict[str, str]) -> None:
    script = _load_script()
    committed = (ROOT / "gateway" / "api" / "asyncapi.json").read_text(encoding="utf-8")

    assert committed == script.render(build_asyncapi(comments)), (
        "gateway/api/asyncapi.json is stale: run `python scripts/generate_api_docs.py` and commit the result"
    )
