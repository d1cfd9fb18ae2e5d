"""HTTPS at the gateway and mutual TLS between the gateway and the services."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.app import Gateway
from gateway.main import server_ssl_context
from gateway.settings import GatewaySettings
from services.runtime.cli.embedded_nats import free_port
from services.runtime.config import Settings
from tests.integration.gateway_fixtures import gateway_settings, running_system, token
from tidings.users.v1 import user_service_pb2, user_service_pb2_grpc


@dataclass(frozen=True)
class Pki:
    """A CA and the files of the certificates it signed for this test."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return path


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, subject: str, *, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("tidings test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server, server_key = _issue(ca_key, ca_name, "127.0.0.1", server=True)
    client, client_key = _issue(ca_key, ca_name, "gateway", server=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "client.pem").write_bytes(client.public_bytes(pem))
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=_write_key(directory / "server.key", server_key),
        client_cert=directory / "client.pem",
        client_key=_write_key(directory / "client.key", client_key),
    )


@pytest.fixture
def tls_settings(settings: Settings, pki: Pki) -> Settings:
    return settings.model_copy(update={
        "tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_client_ca_file": pki.ca,
    })


@pytest.fixture
async def https_url(tls_settings: Settings, pki: Pki) -> AsyncIterator[str]:
    gateway: GatewaySettings = gateway_settings(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
        backend_ca_file=pki.ca, backend_cert_file=pki.client_cert, backend_key_file=pki.client_key,
    )
    front = Gateway(gateway, tls_settings)
    runner = web.AppRunner(front.application())
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ssl_context(gateway))
    async with running_system(tls_settings, ["users", "orders"]):
        await site.start()
        try:
            yield f"https://127.0.0.1:{port}"
        finally:
            await runner.cleanup()
            await front.close()


async def test_gateway_serves_https_and_calls_services_over_mtls(https_url: str, pki: Pki) -> None:
    trust = ssl.create_default_context(cafile=str(pki.ca))
    async with aiohttp.ClientSession() as session, session.get(
        f"{https_url}/v1/users", headers={"Authorization": f"Bearer {token()}"}, ssl=trust
    ) as reply:
        status = reply.status

    assert status == 200


async def test_orders_calls_users_over_mtls(https_url: str, pki: Pki) -> None:
    trust = ssl.create_default_context(cafile=str(pki.ca))
    order = {"userId": "8f14e45f-ceea-467f-a0e6-0c8a1b2c3d4e",
             "lineItems": [{"productId": "8f14e45f-ceea-467f-a0e6-0c8a1b2c3d4f", "quantity": 1}]}
    async with aiohttp.ClientSession() as session, session.post(
        f"{https_url}/v1/orders", json=order, headers={"Authorization": f"Bearer {token()}"}, ssl=trust
    ) as reply:
        body = await reply.json()

    # NOT_FOUND comes from the users service, so the call between services got through.
    assert reply.status == 404, body
    assert body["code"] == 5, body


async def test_service_rejects_client_without_certificate(
    tls_settings: Settings, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    async with running_system(tls_settings, ["users"]), grpc.aio.secure_channel(
        tls_settings.address_of("users"), credentials
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await user_service_pb2_grpc.UserServiceStub(channel).ListUsers(
                user_service_pb2.ListUsersRequest(), timeout=5
            )

    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
