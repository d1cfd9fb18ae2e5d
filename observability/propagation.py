"""W3C trace context and baggage carried in NATS message headers.

NATS header names are case-sensitive on the wire, but publishers in other
languages may capitalise them (``Traceparent``), so lookups ignore case.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter


class _HeaderGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            lowered = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == lowered), None)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


def inject_context(headers: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write ``traceparent``, ``tracestate`` and ``baggage`` for context into headers.

    Args:
        headers: NATS message headers, changed in place.
        context: Context to write; the current one when omitted.
    """
    propagate.inject(headers, context=context)


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """Read the trace context from headers.

    A missing or invalid ``traceparent`` yields a context without a parent, so
    the next span starts a new trace, as the W3C Trace Context rules require.
    """
    return propagate.extract(headers or {}, getter=_GETTER)
