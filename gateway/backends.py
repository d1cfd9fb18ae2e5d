"""Channels to the gRPC services: load balancing, retries, deadlines, TLS.

gRPC itself balances calls with ``round_robin`` over every address of a
backend, skipping replicas that are down. It also retries methods without
side effects, throttled by a token budget per channel. Both are set in the
channel's service config. The gateway adds what gRPC lacks: a circuit
breaker per backend.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from gateway.routes import Route
from gateway.settings import GatewaySettings
from services.runtime.clients import read_setting_file


class BackendConfigError(ValueError):
    """A backend address list the gateway cannot dial; raised at start."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def target_of(backend: str, addresses: str) -> str:
    """Return the gRPC target for a comma-separated list of ``host:port`` replicas.

    One address is dialled through DNS, which also balances over every
    record of a name (a Kubernetes headless Service). Several addresses must
    be IP literals, given to gRPC's static ``ipv4:``/``ipv6:`` resolver.
    """
    replicas = [address.strip() for address in addresses.split(",") if address.strip()]
    if not replicas:
        raise BackendConfigError(f"backend {backend!r} has no address; give host:port")
    for address in replicas:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise BackendConfigError(f"backend {backend!r} address {address!r} is not host:port")
    if len(replicas) == 1:
        return f"dns:///{replicas[0]}"
    hosts = [address.rpartition(":")[0] for address in replicas]
    if not all(_is_ip(host) for host in hosts):
        raise BackendConfigError(
            f"backend {backend!r} lists several replicas by name ({addresses!r}); list IP addresses, "
            "or give one DNS name that resolves to every replica"
        )
    scheme = "ipv6" if hosts[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(replicas)}"


def service_config(routes: Iterable[Route], settings: GatewaySettings) -> dict[str, Any]:
    """Build the gRPC service config of one backend's channel."""
    retried = [
        {"service": route.grpc_method.strip("/").split("/")[0], "method": route.grpc_method.split("/")[-1]}
        for route in routes
        if route.no_side_effects
    ]
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retried and settings.retry_attempts > 1:
        config["methodConfig"] = [{
            "name": retried,
            "retryPolicy": {
                "maxAttempts": settings.retry_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
        # A budget, not a count: once failures drain the tokens, retries stop
        # until successes refill them, so a down backend gets no retry storm.
        config["retryThrottling"] = {
            "maxTokens": settings.retry_budget_tokens,
            "tokenRatio": settings.retry_budget_ratio,
        }
    return config


def _read(path: Path | None, setting: str) -> bytes | None:
    return None if path is None else read_setting_file(path, setting)


def channel_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    """Return TLS (or mTLS) credentials toward the services, or None for plaintext."""
    if settings.backend_ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.backend_ca_file, "TIDINGS_GATEWAY_BACKEND_CA_FILE"),
        private_key=_read(settings.backend_key_file, "TIDINGS_GATEWAY_BACKEND_KEY_FILE"),
        certificate_chain=_read(settings.backend_cert_file, "TIDINGS_GATEWAY_BACKEND_CERT_FILE"),
    )


def open_channel(
    backend: str, addresses: str, routes: Iterable[Route], settings: GatewaySettings
) -> grpc.aio.Channel:
    """Open the traced channel of one backend with its balancing and retry config."""
    target = target_of(backend, addresses)
    options = [
        ("grpc.service_config", json.dumps(service_config(routes, settings))),
        ("grpc.enable_retries", 1),
        # Replicas that went away are tried again soon after they come back.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    credentials = channel_credentials(settings)
    interceptors = aio_client_interceptors()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
