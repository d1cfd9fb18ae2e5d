"""gRPC client channels with tracing: every call gets a CLIENT span and a traceparent."""

from __future__ import annotations

from pathlib import Path

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.runtime.config import Settings
from services.runtime.errors import ConfigurationError


def read_setting_file(path: Path, variable: str) -> bytes:
    """Return the bytes of a file a setting names, or raise ConfigurationError naming both."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {variable}={str(path)!r}: {exc.strerror}") from exc


def client_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """Return mTLS credentials for calls between services, or None when TLS is off.

    A service with TIDINGS_TLS_CERT_FILE presents that certificate as a
    client too, and trusts servers signed by TIDINGS_TLS_CLIENT_CA_FILE (one
    CA for the whole system) or by the system roots when that is unset.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    root = None
    if settings.tls_client_ca_file is not None:
        root = read_setting_file(settings.tls_client_ca_file, "TIDINGS_TLS_CLIENT_CA_FILE")
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=read_setting_file(settings.tls_key_file, "TIDINGS_TLS_KEY_FILE"),
        certificate_chain=read_setting_file(settings.tls_cert_file, "TIDINGS_TLS_CERT_FILE"),
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Return the gRPC server's TLS credentials (mTLS with a client CA), or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = read_setting_file(settings.tls_client_ca_file, "TIDINGS_TLS_CLIENT_CA_FILE")
    key = read_setting_file(settings.tls_key_file, "TIDINGS_TLS_KEY_FILE")
    chain = read_setting_file(settings.tls_cert_file, "TIDINGS_TLS_CERT_FILE")
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def traced_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """Open a grpc.aio channel to address whose calls carry the current trace.

    The channel is plaintext unless credentials are given (see client_credentials).
    """
    if credentials is None:
        return grpc.aio.insecure_channel(address, interceptors=aio_client_interceptors())
    return grpc.aio.secure_channel(address, credentials, interceptors=aio_client_interceptors())


def outgoing_timeout(context: grpc.aio.ServicerContext, default: float) -> float:
    """Return the timeout for a call made while serving context.

    It is the caller's remaining deadline when that is shorter than default,
    so a downstream call never outlives the request that caused it.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, min(default, remaining))
