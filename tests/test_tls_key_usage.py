"""KeyUsage at load: `pluralfed.tls` refuses exactly the certificates that gRPC's TLS (BoringSSL)
refuses for their KeyUsage, each checked here by a real mutual-TLS handshake on loopback with
gRPC's own credentials, so the rule cannot drift from what the handshake does.

Before, such certificates passed every check and failed later under a wrong name: the
coordinator as "port in use", a node as "coordinator unreachable" or "not from the CA"
(inputs review, M2)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pluralfed import pki, tls
from pluralfed.errors import InputError

NOW = dt.datetime.now(dt.UTC)
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*bits: str) -> x509.KeyUsage:
    flags = dict.fromkeys(
        [
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
        ],
        False,
    )  # fmt: skip
    flags.update(dict.fromkeys(bits, True))
    return x509.KeyUsage(**flags)


@dataclass(frozen=True)
class Ca:
    folder: Path
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes


def _write(folder: Path, cert: x509.Certificate, key: Key, ca: Ca) -> tls.TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    files = tls.TlsFiles.from_dir(folder)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    files.ca.write_bytes((ca.folder / tls.CA_CERT_FILE).read_bytes())
    return files


def make_ca(folder: Path, usage: Sequence[str] | None) -> Ca:
    """A CA certificate with the KeyUsage bits `usage` (None: no KeyUsage extension)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"CA {folder.name}"))
        .issuer_name(_name(f"CA {folder.name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(_key_usage(*usage), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    folder.mkdir(parents=True)
    (folder / tls.CA_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / tls.CA_KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Ca(folder, cert, key)


def make_leaf(
    ca: Ca, folder: Path, role: tls.Role, usage: Sequence[str] | None, key: Key
) -> tls.TlsFiles:
    """A coordinator (server) or node (client) certificate as pluralfed's, but with the KeyUsage
    bits `usage` (None: no KeyUsage extension), marked non-critical: TLS enforces it anyway."""
    if role == "server":
        eku = ExtendedKeyUsageOID.SERVER_AUTH
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    else:
        eku = ExtendedKeyUsageOID.CLIENT_AUTH
        sans = [x509.UniformResourceIdentifier(tls.node_uri("node-a"))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(folder.name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(_key_usage(*usage), critical=False)
    return _write(folder, builder.sign(ca.key, hashes.SHA256()), key, ca)


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "rsa": rsa.generate_private_key(65537, 2048),
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation as `pluralfed certs` makes it (its CA, coordinator and node-a)."""
    root = tmp_path_factory.mktemp("fed")
    pki.create_ca(root / "ca")
    pki.issue_server_cert(root / "ca", root / "coordinator", "coordinator", ["127.0.0.1"])
    pki.issue_node_cert(root / "ca", root / "node-a", "node-a")
    return root


def _ca_of(folder: Path) -> Ca:
    cert = x509.load_pem_x509_certificate((folder / tls.CA_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((folder / tls.CA_KEY_FILE).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Ca(folder, cert, key)


def handshake(server: tls.TlsFiles, client: tls.TlsFiles) -> bool:
    """Whether a gRPC call over mutual TLS on loopback succeeds, with gRPC's credentials made
    straight from the files (no pluralfed check), to learn what BoringSSL itself accepts."""
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
            ),
        )
    )
    creds = grpc.ssl_server_credentials(
        [(server.key.read_bytes(), server.cert.read_bytes())],
        root_certificates=server.ca.read_bytes(),
        require_client_auth=True,
    )
    try:
        port = srv.add_secure_port("127.0.0.1:0", creds)
    except RuntimeError:  # BoringSSL refused the server's certificate as it loaded it
        return False
    if port == 0:
        return False
    srv.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=client.ca.read_bytes(),
            private_key=client.key.read_bytes(),
            certificate_chain=client.cert.read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
            try:
                echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/t.T/Echo")
                echo(b"hi", timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                return False
        return True
    finally:
        srv.stop(None)


def loads(files: tls.TlsFiles, role: tls.Role) -> InputError | None:
    """None if pluralfed takes the files for `role`, else its refusal."""
    try:
        if role == "server":
            files.server_credentials()
        else:
            files.channel_credentials()
    except InputError as err:
        return err
    return None


def test_pluralfeds_own_certificates_pass_and_connect(federation: Path) -> None:
    server = tls.TlsFiles.from_dir(federation / "coordinator")
    client = tls.TlsFiles.from_dir(federation / "node-a")
    assert loads(server, "server") is None and loads(client, "client") is None
    assert handshake(server, client)


@pytest.mark.parametrize("algorithm", ["ec", "rsa"])
@pytest.mark.parametrize(
    "usage",
    [
        None,
        ("digital_signature",),
        ("digital_signature", "key_encipherment"),
        ("key_encipherment",),
        ("key_agreement",),
        ("key_encipherment", "key_agreement"),
        ("key_cert_sign",),
        ("content_commitment",),
    ],
    ids=lambda usage: "no-KeyUsage" if usage is None else "+".join(usage),
)
@pytest.mark.parametrize("role", ["server", "client"])
def test_leaf_key_usage_refused_exactly_when_the_handshake_fails(
    federation: Path,
    keys: dict[str, Key],
    tmp_path: Path,
    role: tls.Role,
    usage: tuple[str, ...] | None,
    algorithm: str,
) -> None:
    """A leaf's KeyUsage must allow digitalSignature (or be absent), for either key type: RSA
    with keyEncipherment alone too, since gRPC's suites are all ECDHE (the key signs)."""
    leaf = make_leaf(_ca_of(federation / "ca"), tmp_path / "leaf", role, usage, keys[algorithm])
    good = tls.TlsFiles.from_dir(federation / ("node-a" if role == "server" else "coordinator"))
    connects = handshake(leaf, good) if role == "server" else handshake(good, leaf)
    refusal = loads(leaf, role)
    assert connects == (usage is None or "digital_signature" in usage)
    if connects:
        assert refusal is None
    else:
        assert refusal is not None, "gRPC refuses this certificate: pluralfed must say why at load"
        message = str(refusal)
        assert str(leaf.cert) in message and "without digitalSignature" in message
        assert "certs server" in message if role == "server" else "certs node" in message


@pytest.mark.parametrize(
    "usage",
    [None, ("key_cert_sign",), ("digital_signature", "crl_sign"), ("crl_sign",)],
    ids=lambda usage: "no-KeyUsage" if usage is None else "+".join(usage),
)
def test_ca_key_usage_refused_exactly_when_the_handshake_fails(
    keys: dict[str, Key], tmp_path: Path, usage: tuple[str, ...] | None
) -> None:
    """A CA whose KeyUsage lacks keyCertSign signs nothing TLS accepts; both parties refuse it
    at load, naming their ca.pem, and `pluralfed certs` refuses to issue with it."""
    ca = make_ca(tmp_path / "ca", usage)
    server = make_leaf(ca, tmp_path / "server", "server", ["digital_signature"], keys["ec"])
    client = make_leaf(ca, tmp_path / "client", "client", ["digital_signature"], keys["ec"])
    connects = handshake(server, client)
    assert connects == (usage is None or "key_cert_sign" in usage)
    parties: list[tuple[tls.TlsFiles, tls.Role]] = [(server, "server"), (client, "client")]
    for files, role in parties:
        refusal = loads(files, role)
        if connects:
            assert refusal is None
        else:
            assert refusal is not None
            assert str(files.ca) in str(refusal) and "without keyCertSign" in str(refusal)
    if not connects:
        with pytest.raises(InputError, match="without keyCertSign"):
            pki.issue_node_cert(ca.folder, tmp_path / "issued", "node-b")


def test_key_usage_names() -> None:
    usage = _key_usage("key_agreement", "decipher_only", "crl_sign")
    assert tls.key_usage_names(usage) == ["keyAgreement", "cRLSign", "decipherOnly"]
    assert tls.key_usage_names(_key_usage()) == []
