"""Event subjects: the ``(tidings.events.v1.subject)`` option agrees with the publishing code."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from services.inventory import handlers as inventory_handlers
from services.orders import transitions as order_transitions
from services.payments import handlers as payment_handlers
from services.runtime.streams import ALL_STREAMS
from services.users import servicer as user_servicer
from tidings.events.v1 import options_pb2
from tidings.inventory.v1 import inventory_events_pb2
from tidings.orders.v1 import order_events_pb2
from tidings.payments.v1 import payment_events_pb2
from tidings.users.v1 import user_events_pb2

PROTOS = Path(__file__).resolve().parents[2] / "protos"
SUBJECT_FORMAT = re.compile(r"^tidings\.(?P<context>[a-z][a-z0-9_]*)\.[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")

# Each SUBJECT_* constant of the publishing modules and the message the
# module publishes on it.
PUBLISHED: list[tuple[ModuleType, str, type[Message]]] = [
    (user_servicer, "SUBJECT_CREATED", user_events_pb2.UserCreated),
    (user_servicer, "SUBJECT_UPDATED", user_events_pb2.UserUpdated),
    (user_servicer, "SUBJECT_DELETED", user_events_pb2.UserDeleted),
    (order_transitions, "SUBJECT_PLACED", order_events_pb2.OrderPlaced),
    (order_transitions, "SUBJECT_PAYMENT_REQUESTED", order_events_pb2.PaymentRequested),
    (order_transitions, "SUBJECT_CONFIRMED", order_events_pb2.OrderConfirmed),
    (order_transitions, "SUBJECT_REJECTED", order_events_pb2.OrderRejected),
    (order_transitions, "SUBJECT_CANCELLED", order_events_pb2.OrderCancelled),
    (inventory_handlers, "SUBJECT_RESERVED", inventory_events_pb2.StockReserved),
    (inventory_handlers, "SUBJECT_REJECTED", inventory_events_pb2.StockRejected),
    (inventory_handlers, "SUBJECT_RELEASED", inventory_events_pb2.StockReleased),
    (payment_handlers, "SUBJECT_CAPTURED", payment_events_pb2.PaymentCaptured),
    (payment_handlers, "SUBJECT_DECLINED", payment_events_pb2.PaymentDeclined),
    (payment_handlers, "SUBJECT_REFUNDED", payment_events_pb2.PaymentRefunded),
]
PUBLISHING_MODULES = sorted({module for module, _, _ in PUBLISHED}, key=lambda module: module.__name__)


def _subject_option(message: Descriptor) -> str | None:
    options = message.GetOptions()
    if not options.HasExtension(options_pb2.subject):
        return None
    subject: str = options.Extensions[options_pb2.subject]
    return subject


def _event_messages_from_protos() -> list[Descriptor]:
    """Return every top-level message of the *_events.proto files, found by file name, not by option."""
    messages: list[Descriptor] = []
    for path in sorted(PROTOS.glob("tidings/*/v1/*_events.proto")):
        module_name = str(path.relative_to(PROTOS).with_suffix("")).replace("/", ".") + "_pb2"
        module = importlib.import_module(module_name)
        messages.extend(module.DESCRIPTOR.message_types_by_name.values())
    return messages


EVENT_MESSAGES = _event_messages_from_protos()


def test_event_protos_found() -> None:
    assert len(EVENT_MESSAGES) >= len(PUBLISHED)


@pytest.mark.parametrize(
    ("module", "constant", "message_class"),
    PUBLISHED,
    ids=[f"{module.__name__}.{constant}" for module, constant, _ in PUBLISHED],
)
def test_subject_constant_equals_option(
    module: ModuleType, constant: str, message_class: type[Message]
) -> None:
    assert getattr(module, constant) == _subject_option(message_class.DESCRIPTOR)


@pytest.mark.parametrize("module", PUBLISHING_MODULES, ids=lambda module: module.__name__)
def test_subject_constants_all_checked(module: ModuleType) -> None:
    constants = {name for name in vars(module) if name.startswith("SUBJECT_")}
    checked = {constant for listed_module, constant, _ in PUBLISHED if listed_module is module}

    assert constants == checked


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_event_message_has_subject(message: Descriptor) -> None:
    assert _subject_option(message) is not None


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_event_subject_format(message: Descriptor) -> None:
    subject = _subject_option(message) or ""

    assert SUBJECT_FORMAT.match(subject), f"{subject!r} is not tidings.<context>.<entity>.<verb>"


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_event_subject_context_is_package_context(message: Descriptor) -> None:
    match = SUBJECT_FORMAT.match(_subject_option(message) or "")
    package_context = message.file.package.split(".")[1]

    assert match is not None
    assert match.group("context") == package_context


@pytest.mark.parametrize("message", EVENT_MESSAGES, ids=lambda message: message.full_name)
def test_event_subject_stored_by_context_stream(message: Descriptor) -> None:
    subject = _subject_option(message) or ""
    context = message.file.package.split(".")[1]
    stream_patterns = [pattern for stream in ALL_STREAMS for pattern in stream.subjects]

    assert f"tidings.{context}.>" in stream_patterns
    assert subject.startswith(f"tidings.{context}.")


def test_event_subjects_unique() -> None:
    subjects = [_subject_option(message) for message in EVENT_MESSAGES]

    assert len(subjects) == len(set(subjects))
