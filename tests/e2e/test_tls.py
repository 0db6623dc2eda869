"""TLS and mTLS on a real daemon, with certificates made in the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio

from daemon.client import ComputeClient
from tests.e2e.cluster import PeerFactory
from tests.e2e.guests import examples_config

pytestmark = pytest.mark.e2e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):  # type: ignore[no-untyped-def]
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, ca=True)
    _write(directory, "ca", ca_key, ca)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, name, key, _cert(name, key, (ca.subject, ca_key)))
    return directory


def _creds(pki: Path, *, with_client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if with_client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if with_client_cert else None,
    )


async def test_mtls_serves_clients_with_a_certificate_and_refuses_others(
    peers: PeerFactory, pki: Path
) -> None:
    good = _creds(pki, with_client_cert=True)
    peer = await asyncio.to_thread(
        peers.start,
        config=examples_config(),
        credentials=good,
        ANVIL_TLS_CERT_FILE=str(pki / "server.pem"),
        ANVIL_TLS_KEY_FILE=str(pki / "server.key"),
        ANVIL_TLS_CLIENT_CA_FILE=str(pki / "ca.pem"),
    )
    target = peer.address
    async with ComputeClient(target, token=peer.token, credentials=good) as client:
        caps = await client.capabilities("text:wordcount")
        assert [c.capability for c in caps] == ["text:wordcount"]
    no_cert = _creds(pki, with_client_cert=False)
    async with ComputeClient(target, token=peer.token, credentials=no_cert) as client:
        with pytest.raises(aio.AioRpcError) as info:
            await client.capabilities()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    async with ComputeClient(target, token=peer.token) as plaintext:
        with pytest.raises(aio.AioRpcError) as info:
            await plaintext.capabilities()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_tls_without_client_certificates_serves_any_verified_client(
    peers: PeerFactory, pki: Path
) -> None:
    """Server-only TLS: the channel is encrypted and the server verified; clients
    prove who they are with their bearer token alone."""
    server_only = _creds(pki, with_client_cert=False)
    peer = await asyncio.to_thread(
        peers.start,
        config=examples_config(),
        credentials=server_only,
        ANVIL_TLS_CERT_FILE=str(pki / "server.pem"),
        ANVIL_TLS_KEY_FILE=str(pki / "server.key"),
    )
    async with ComputeClient(peer.address, token=peer.token, credentials=server_only) as client:
        submitted = await client.submit("text:wordcount")
        final = await client.wait(submitted.job_id)
        assert final.error == "" and b'"words": 0' in final.output
    async with ComputeClient(peer.address, credentials=server_only) as anonymous:
        with pytest.raises(aio.AioRpcError) as info:
            await anonymous.capabilities()
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with ComputeClient(peer.address, token=peer.token) as plaintext:
        with pytest.raises(aio.AioRpcError) as info:
            await plaintext.capabilities()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
