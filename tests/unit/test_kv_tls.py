"""The direct transport under TLS (Ray's TLS files), without Ray: mutual TLS, no downgrade,
the handshake deadline, and staying off when Ray's TLS files cannot be used."""

from __future__ import annotations

import datetime
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.kv.config import KVConfig
from app.kv.direct import AsyncDirectClient, DirectClient, DirectServer, Endpoint
from app.kv.protocol import Call
from app.kv.shard import Shard
from app.kv.tls import PLAIN, TransportTLS, ray_tls
from tests.unit.test_kv_direct import FakeHandle
from tests.unit.test_kv_direct_server import Member, Proxy, call, closed_by_peer, wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _issue(
    directory: Path, name: str, issuer: tuple[Any, Any] | None = None
) -> tuple[Any, Any, Path, Path]:
    """A key and certificate named `name`, signed by `issuer` (self-signed CA when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_cert, signer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    cert = builder.sign(signer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key, cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A cluster CA and a node certificate it signed; another CA's node certificate."""
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, ca_path, _ = _issue(directory, "cluster-ca")
    _, _, node_cert, node_key = _issue(directory, "node", (ca_cert, ca_key))
    other_cert, other_key, other_ca, _ = _issue(directory, "other-ca")
    _, _, rogue_cert, rogue_key = _issue(directory, "rogue", (other_cert, other_key))
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(node_cert),
        "RAY_TLS_SERVER_KEY": str(node_key),
        "RAY_TLS_CA_CERT": str(ca_path),
        "rogue_cert": str(rogue_cert),
        "rogue_key": str(rogue_key),
        "other_ca": str(other_ca),
    }


@pytest.fixture
def tls(pki: dict[str, str]) -> TransportTLS:
    found = ray_tls(pki)
    assert found.usable and found.server is not None and found.client is not None
    return found


@pytest.fixture
def server(tls: TransportTLS) -> Iterator[tuple[DirectServer, Member]]:
    member = Member()
    srv = DirectServer(member, "127.0.0.1", tls=tls.server, handshake_timeout_s=0.5)
    yield srv, member
    srv.close()


def client_for(endpoint: Endpoint, tls: TransportTLS) -> DirectClient:
    return DirectClient(5.0, fetch_endpoint=lambda handle: endpoint, retry_after_s=60, tls=tls)


def test_calls_go_over_mutual_tls(server: tuple[DirectServer, Member], tls: TransportTLS) -> None:
    srv, member = server
    assert srv.endpoint.tls
    client = client_for(srv.endpoint, tls)
    assert call(client, "echo", "over tls") == ("over tls",)
    assert call(client, "echo", "again") == ("again",)  # the pooled TLS connection
    assert len(srv._conns) == 1 and client.fallbacks == 0
    assert len(member.calls) == 2
    client.close()


def test_the_wire_carries_no_plain_text(
    server: tuple[DirectServer, Member], tls: TransportTLS
) -> None:
    srv, _ = server
    seen = bytearray()
    proxy = Proxy(srv.endpoint, seen)
    client = client_for(Endpoint(proxy.host, proxy.port, srv.endpoint.secret, tls=True), tls)
    assert call(client, "echo", "a very recognisable value") == ("a very recognisable value",)
    client.close()
    proxy.close()
    assert seen and b"recognisable" not in seen and b"APPKV" not in seen


def test_neither_side_downgrades(server: tuple[DirectServer, Member], tls: TransportTLS) -> None:
    srv, member = server
    plain_client = client_for(srv.endpoint, PLAIN)
    assert plain_client.send("h", "echo", (1,)) is None  # a TLS member: this client won't
    plain_member = DirectServer(member, "127.0.0.1")
    try:
        tls_client = client_for(plain_member.endpoint, tls)
        assert tls_client.send("h", "echo", (1,)) is None  # TLS required: not in plain text
    finally:
        plain_member.close()
    assert member.calls == [] and srv.failed_handshakes == 0  # refused without connecting


def test_a_client_without_a_cluster_certificate_is_refused(
    server: tuple[DirectServer, Member], tls: TransportTLS, pki: dict[str, str]
) -> None:
    srv, member = server
    rogue = TransportTLS.from_files(pki["rogue_cert"], pki["rogue_key"], pki["RAY_TLS_CA_CERT"])
    client = client_for(srv.endpoint, rogue)  # knows the secret, trusts the cluster CA
    assert client.send("h", "echo", (1,)) is None
    assert member.calls == [] and wait_for(lambda: srv.failed_handshakes == 1)


def test_a_server_without_a_cluster_certificate_is_refused(
    tls: TransportTLS, pki: dict[str, str]
) -> None:
    member = Member()
    rogue = TransportTLS.from_files(pki["rogue_cert"], pki["rogue_key"], pki["other_ca"])
    impostor = DirectServer(member, "127.0.0.1", tls=rogue.server)
    try:
        assert client_for(impostor.endpoint, tls).send("h", "echo", (1,)) is None
    finally:
        impostor.close()
    assert member.calls == []


def test_a_slow_tls_handshake_is_cut_off_at_the_deadline(
    server: tuple[DirectServer, Member],
) -> None:
    srv, _ = server
    with socket.create_connection((srv.endpoint.host, srv.endpoint.port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record header announcing 512 bytes
        started = time.monotonic()
        for _ in range(40):  # then one byte every 50 ms: 2 s, four times the deadline
            try:
                raw.sendall(b"\x01")
            except OSError:
                break
            time.sleep(0.05)
        assert closed_by_peer(raw)
        assert time.monotonic() - started < 1.5
    assert wait_for(lambda: srv._unauthenticated == 0 and not srv._conns)


def test_unusable_tls_files_keep_the_transport_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, server: tuple[DirectServer, Member]
) -> None:
    srv, _ = server
    env = {
        "RAY_USE_TLS": "true",
        "RAY_TLS_SERVER_CERT": str(tmp_path / "missing.crt"),
        "RAY_TLS_SERVER_KEY": str(tmp_path / "missing.key"),
        "RAY_TLS_CA_CERT": str(tmp_path / "missing-ca.crt"),
    }
    with caplog.at_level(logging.WARNING, logger="app.kv.tls"):
        broken = ray_tls(env)
    assert broken.required and not broken.usable
    assert "stays off" in caplog.text
    assert not ray_tls({"RAY_USE_TLS": "1"}).usable  # the files are not even named
    assert client_for(srv.endpoint, broken).send("h", "echo", (1,)) is None
    assert ray_tls({}) is PLAIN and ray_tls({"RAY_USE_TLS": "0"}) is PLAIN


async def test_the_async_client_speaks_tls_too(
    server: tuple[DirectServer, Member], tls: TransportTLS
) -> None:
    srv, member = server
    handle = FakeHandle(srv.endpoint)
    client = AsyncDirectClient(5.0, tls=tls)
    assert await client.call(Call(handle, "echo", ("async",))) == ("async",)
    assert handle.ray_calls == [] and member.calls == [("echo", ("async",))]
    plain = AsyncDirectClient(5.0, tls=PLAIN)
    assert await plain.call(Call(handle, "echo", (1,))) == ("via ray", "echo")
    client.close()
    plain.close()


def test_a_member_publishes_no_endpoint_when_ray_tls_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(tmp_path / "gone.crt"))
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(tmp_path / "gone.key"))
    monkeypatch.setenv("RAY_TLS_CA_CERT", str(tmp_path / "gone-ca.crt"))
    shard = Shard(0, "g0-m1", KVConfig())
    try:
        assert shard.endpoint() is None  # Ray calls only: never a plain-text socket
        assert shard._direct is None
    finally:
        shard.close()
