"""TLS material: issuance, file modes, every load-validation error, identity extraction, `certs` CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_tls_key_usage import handshake

import pluralfed.pki as pki_module
from pluralfed import tls
from pluralfed.commands import certs
from pluralfed.errors import InputError
from pluralfed.pki import create_ca, fingerprint, issue_node_cert, issue_server_cert, parse_san

NOW = dt.datetime.now(dt.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, coordinator (localhost, 127.0.0.1, ::1), node-a, plus a second CA with its own node."""
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    issue_server_cert(
        root / "ca", root / "server", "coordinator", ["localhost", "127.0.0.1", "::1"]
    )
    issue_node_cert(root / "ca", root / "node-a", "node-a")
    create_ca(root / "other-ca", common_name="other CA")
    issue_node_cert(root / "other-ca", root / "other-node", "node-a")
    return root


# --------------------------------------------------------------------------------------------------
# issuance


def test_create_ca(pki: Path) -> None:
    cert = load_cert(pki / "ca" / "ca.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pluralfed CA"
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert mode(pki / "ca" / "ca.key") == 0o600
    assert mode(pki / "ca" / "ca.pem") == 0o644
    days = (cert.not_valid_after_utc - NOW).days
    assert 3648 <= days <= 3650
    assert not list((pki / "ca").glob(".*tmp")), "temporary files left behind"


def test_the_ca_may_sign_only_leaf_certificates(pki: Path) -> None:
    """The CA's BasicConstraints, critical, allow no CA below it (path length 0): a CA
    certificate issued from it by mistake would not be trusted to issue node certificates."""
    ext = load_cert(pki / "ca" / "ca.pem").extensions.get_extension_for_class(x509.BasicConstraints)
    assert ext.critical and ext.value.ca and ext.value.path_length == 0


@pytest.mark.parametrize(
    ("cert_file", "signs"),
    [("ca/ca.pem", True), ("server/cert.pem", False), ("node-a/cert.pem", False)],
)
def test_key_usage_is_signing_certificates_and_crls_for_the_ca_and_handshakes_for_leaves(
    pki: Path, cert_file: str, signs: bool
) -> None:
    """The CA's key signs certificates and revocation lists (a verifier that checks cRLSign
    would refuse every CRL of a CA without it); a leaf's key only signs handshakes (a leaf
    claiming keyCertSign is refused by strict TLS stacks, RFC 5280 4.2.1.3)."""
    ext = load_cert(pki / cert_file).extensions.get_extension_for_class(x509.KeyUsage)
    usage = ext.value
    assert ext.critical
    assert (usage.key_cert_sign, usage.crl_sign, usage.digital_signature) == (
        signs,
        signs,
        not signs,
    )
    assert not (usage.key_encipherment or usage.content_commitment or usage.key_agreement)


def test_create_ca_refuses_to_overwrite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    create_ca(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(InputError, match=r"ca\.key\); refusing to overwrite.*--force") as err:
        create_ca(tmp_path)
    assert f"certs node --ca {tmp_path} --out DIR --id NEW_ID" in str(err.value)
    assert "--force would make a NEW CA" in str(err.value)
    assert (tmp_path / "ca.key").read_bytes() == key_before
    with caplog.at_level(logging.WARNING, logger="pluralfed.pki"):
        create_ca(tmp_path, force=True)
    assert "certificates the old CA issued no longer work" in caplog.text
    assert (tmp_path / "ca.key").read_bytes() != key_before
    assert mode(tmp_path / "ca.key") == 0o600


def test_server_cert_sans_and_eku(pki: Path) -> None:
    cert = load_cert(pki / "server" / "cert.pem")
    ca = load_cert(pki / "ca" / "ca.pem")
    cert.verify_directly_issued_by(ca)
    names = sans(cert)
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (pki / "server" / "ca.pem").read_bytes() == (pki / "ca" / "ca.pem").read_bytes()
    assert mode(pki / "server" / "key.pem") == 0o600
    assert not (pki / "server" / "ca.key").exists()
    assert (cert.not_valid_after_utc - NOW).days in (824, 825)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("localhost", x509.DNSName("localhost")),
        ("Coordinator.Example.ORG", x509.DNSName("coordinator.example.org")),
        ("*.example.org", x509.DNSName("*.example.org")),
        # a fully qualified name's trailing dot is dropped: the same name as without it, so
        # given both ways it is listed once (gRPC's own check accepts either form)
        ("coordinator.example.org.", x509.DNSName("coordinator.example.org")),
        ("10.0.0.5", x509.IPAddress(ipaddress.ip_address("10.0.0.5"))),
        ("[::1]", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("fe80::1", x509.IPAddress(ipaddress.ip_address("fe80::1"))),
    ],
)
def test_parse_san(value: str, expected: x509.GeneralName) -> None:
    assert parse_san(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "under_score.example",
        "a b",
        "-lead.example",
        "x" * 64 + ".org",
        # labels of 63 characters, but 255 in all: over DNS's 253, no client dials it
        ".".join(["x" * 63] * 4),
    ],
)
def test_parse_san_rejects(value: str) -> None:
    with pytest.raises(InputError, match="SAN"):
        parse_san(value)


def test_server_cert_needs_sans(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="at least one"):
        issue_server_cert(pki / "ca", tmp_path, "coordinator", [])


def test_node_cert_identity(pki: Path) -> None:
    cert = load_cert(pki / "node-a" / "cert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-a"
    assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "pluralfed://node/node-a"
    ]
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(pki / "node-a" / "key.pem") == 0o600


@pytest.mark.parametrize("node_id", ["", "a/b", "../x", ".hidden", "-x", "a b", "x" * 65, "é"])
def test_node_id_validated(pki: Path, tmp_path: Path, node_id: str) -> None:
    with pytest.raises(InputError, match="node id"):
        issue_node_cert(pki / "ca", tmp_path, node_id)
    assert not (tmp_path / "key.pem").exists()


def test_node_id_64_chars_ok(pki: Path, tmp_path: Path) -> None:
    issue_node_cert(pki / "ca", tmp_path, "n" * 64)


def test_issue_needs_ca_key(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"CA key not found at .*server/ca\.key"):
        issue_node_cert(pki / "server", tmp_path, "node-z")


def test_issue_refuses_to_overwrite(pki: Path, tmp_path: Path) -> None:
    issue_node_cert(pki / "ca", tmp_path, "node-z")
    before = (tmp_path / "key.pem").read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        issue_node_cert(pki / "ca", tmp_path, "node-z")
    assert (tmp_path / "key.pem").read_bytes() == before
    # a ca.pem from another federation in the target directory is not silently replaced either
    other = tmp_path / "fresh"
    other.mkdir()
    (other / "ca.pem").write_bytes((pki / "other-ca" / "ca.pem").read_bytes())
    with pytest.raises(InputError, match="different CA"):
        issue_node_cert(pki / "ca", other, "node-z")
    assert not (other / "key.pem").exists()


def test_backdated_issuance(pki: Path, tmp_path: Path) -> None:
    start, end = NOW - dt.timedelta(days=10), NOW - dt.timedelta(days=1)
    issue_node_cert(pki / "ca", tmp_path, "old", not_before=start, not_after=end)
    cert = load_cert(tmp_path / "cert.pem")
    assert abs(cert.not_valid_before_utc - start) < dt.timedelta(seconds=1)
    assert abs(cert.not_valid_after_utc - end) < dt.timedelta(seconds=1)
    with pytest.raises(InputError, match="not after"):
        issue_node_cert(pki / "ca", tmp_path / "x", "x", not_before=end, not_after=start)


def test_a_validity_that_ends_as_it_starts_is_refused(pki: Path, tmp_path: Path) -> None:
    """not_after must be after not_before: a certificate valid for no time at all would be
    written and then refused by every peer, with "expired" as the only clue."""
    with pytest.raises(InputError, match="is not after"):
        issue_node_cert(pki / "ca", tmp_path, "n", not_before=NOW, not_after=NOW)
    assert not (tmp_path / "cert.pem").exists()


def test_a_server_name_given_twice_is_in_the_certificate_once(pki: Path, tmp_path: Path) -> None:
    """SANs are compared as parsed (DNS names in lower case): `--san localhost --san LOCALHOST`
    gives one name, not a certificate listing it twice."""
    issue_server_cert(
        pki / "ca", tmp_path, "coordinator", ["localhost", "LOCALHOST", "127.0.0.1", "127.0.0.1"]
    )
    names = sans(load_cert(tmp_path / "cert.pem"))
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_leaf_does_not_outlive_ca(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca", days=30)
    issue_node_cert(tmp_path / "ca", tmp_path / "n", "n", days=825)
    ca, leaf = load_cert(tmp_path / "ca" / "ca.pem"), load_cert(tmp_path / "n" / "cert.pem")
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc


def test_expired_ca_cannot_issue(tmp_path: Path) -> None:
    create_ca(
        tmp_path / "ca", not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1)
    )
    with pytest.raises(InputError, match="has expired"):
        issue_node_cert(tmp_path / "ca", tmp_path / "n", "n")


def test_a_certificate_starts_a_few_minutes_before_it_is_issued(pki: Path, tmp_path: Path) -> None:
    """A peer whose clock runs a little behind the CA's must accept a certificate issued just
    now: every certificate starts CLOCK_SKEW (5 minutes) in the past, the CA's too. One that
    started at the moment of issue would be refused as not yet valid by a peer whose clock is
    a minute slow, for that minute."""
    issued = dt.datetime.now(dt.UTC)
    create_ca(tmp_path / "ca")
    issue_node_cert(tmp_path / "ca", tmp_path / "n", "n")
    for path in (tmp_path / "ca" / "ca.pem", tmp_path / "n" / "cert.pem"):
        early = issued - load_cert(path).not_valid_before_utc
        assert dt.timedelta(minutes=4) < early < dt.timedelta(minutes=6), (path, early)


def test_renewing_into_a_folder_that_keeps_the_same_ca_certificate_needs_no_force(
    pki: Path, tmp_path: Path
) -> None:
    """A node's certificate renewed into its folder (the old cert.pem and key.pem moved away,
    ca.pem of the same CA left in place) is written without --force: an identical ca.pem is
    kept, not refused as a file in the way."""
    issue_node_cert(pki / "ca", tmp_path, "node-r")
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    (tmp_path / "cert.pem").unlink()
    (tmp_path / "key.pem").unlink()
    issue_node_cert(pki / "ca", tmp_path, "node-r")
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem
    tls.TlsFiles.from_dir(tmp_path).channel_credentials()


def test_a_file_written_after_the_check_for_existing_files_is_not_replaced(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs into the same folder at once: each checks for existing files before it makes
    its key, so the other's files may appear after the check. The write itself never replaces
    a file without --force (it publishes by hard link), so one run's key is never swapped in
    under the other's certificate. The early check is skipped here, as if it came too soon."""
    issue_node_cert(pki / "ca", tmp_path, "node-z")
    before = {name: (tmp_path / name).read_bytes() for name in ("cert.pem", "key.pem")}
    monkeypatch.setattr(pki_module, "check_no_overwrite", lambda paths, force: None)
    with pytest.raises(InputError, match=r"key\.pem already exists; refusing to overwrite"):
        issue_node_cert(pki / "ca", tmp_path, "node-z")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_create_ca_refuses_a_folder_whose_ca_key_was_moved_away(tmp_path: Path) -> None:
    """A CA folder whose key is kept offline still holds ca.pem: `certs init` there is refused
    before anything is written, not left half done (a new ca.key beside the old ca.pem, which
    no longer matches it)."""
    create_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").rename(tmp_path / "offline.key")
    cert_before = (tmp_path / "ca" / "ca.pem").read_bytes()
    with pytest.raises(InputError, match=r"ca\.pem\); refusing to overwrite it"):
        create_ca(tmp_path / "ca")
    assert not (tmp_path / "ca" / "ca.key").exists()
    assert (tmp_path / "ca" / "ca.pem").read_bytes() == cert_before


def test_issuing_from_a_ca_folder_whose_key_is_not_its_certificates_is_refused(
    pki: Path, tmp_path: Path
) -> None:
    """A CA folder whose ca.key is not the key of its ca.pem (another CA's key copied in) would
    sign certificates that no party accepts, each handshake failing later as "not issued by the
    CA": the issue is refused at once, naming both files, and nothing is written."""
    create_ca(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_bytes((pki / "other-ca" / "ca.key").read_bytes())
    with pytest.raises(InputError, match=r"ca\.key does not match the certificate .*ca\.pem"):
        issue_node_cert(tmp_path / "ca", tmp_path / "n", "n")
    assert not (tmp_path / "n").exists()


def test_a_ca_name_over_64_characters_is_refused_before_writing(tmp_path: Path) -> None:
    """X.509 caps a Common Name at 64 characters: a longer --ca-name is an input error naming
    the option's value, before anything is written (not a ValueError traceback from the
    certificate library)."""
    with pytest.raises(InputError, match="CA name: must be 1-64 characters"):
        run("init", "--out", str(tmp_path / "ca"), "--ca-name", "x" * 65)
    assert not (tmp_path / "ca").exists()
    assert run("init", "--out", str(tmp_path / "ca"), "--ca-name", "x" * 64) == 0


@pytest.mark.parametrize("old_first", [True, False], ids=["old-first", "new-first"])
def test_a_bundle_of_two_cas_of_the_same_name_verifies_each_ones_certificates(
    tmp_path: Path, old_first: bool
) -> None:
    """Moving to a new CA, every party trusts the old and the new one for a while (one ca.pem
    holding both), and two CAs made with the default name share their subject. Each
    certificate names its CA's key (AuthorityKeyIdentifier), so the TLS stack picks the right
    one: without the extension (tried with it left out), BoringSSL took the first CA of the
    name and failed the handshake on its signature. A real mutual-TLS handshake, with gRPC's own credentials."""
    create_ca(tmp_path / "old")
    create_ca(tmp_path / "new")
    issue_server_cert(tmp_path / "new", tmp_path / "srv", "coordinator", ["127.0.0.1"])
    issue_node_cert(tmp_path / "new", tmp_path / "node", "node-a")
    old, new = ((tmp_path / name / "ca.pem").read_bytes() for name in ("old", "new"))
    for party in ("srv", "node"):
        (tmp_path / party / "ca.pem").write_bytes(old + new if old_first else new + old)
    server = tls.TlsFiles.from_dir(tmp_path / "srv")
    assert handshake(server, tls.TlsFiles.from_dir(tmp_path / "node"))


# --------------------------------------------------------------------------------------------------
# loading with validation


def test_load_valid(pki: Path) -> None:
    server = tls.TlsFiles.from_dir(pki / "server")
    node = tls.TlsFiles.from_dir(pki / "node-a")
    assert isinstance(server.server_credentials(), grpc.ServerCredentials)
    assert isinstance(node.channel_credentials(), grpc.ChannelCredentials)
    assert isinstance(
        tls.load_server_credentials(server.cert, server.key, server.ca), grpc.ServerCredentials
    )
    assert isinstance(
        tls.load_channel_credentials(str(node.cert), str(node.key), str(node.ca)),
        grpc.ChannelCredentials,
    )


@pytest.mark.parametrize("missing", ["ca", "cert", "key"])
def test_load_missing_file(pki: Path, tmp_path: Path, missing: str) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    gone = tmp_path / "gone.pem"
    paths = {"ca": files.ca, "cert": files.cert, "key": files.key, missing: gone}
    with pytest.raises(InputError, match=rf"file not found: {gone}"):
        tls.load_channel_credentials(paths["cert"], paths["key"], paths["ca"])


def test_load_directory_instead_of_file(pki: Path, tmp_path: Path) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    with pytest.raises(InputError, match=rf"not a regular file: {tmp_path}"):
        tls.load_channel_credentials(tmp_path, files.key, files.ca)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable(pki: Path, tmp_path: Path) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    key = tmp_path / "key.pem"
    key.write_bytes(files.key.read_bytes())
    key.chmod(0)
    with pytest.raises(InputError, match=rf"not readable.*{key}"):
        tls.load_channel_credentials(files.cert, key, files.ca)


@pytest.mark.parametrize("which", ["ca", "cert"])
def test_load_garbage_certificate(pki: Path, tmp_path: Path, which: str) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    cert, ca = (bad, files.ca) if which == "cert" else (files.cert, bad)
    with pytest.raises(InputError, match=rf"{bad}: not a PEM certificate"):
        tls.load_channel_credentials(cert, files.key, ca)
    bad.write_text("hello\n")
    with pytest.raises(InputError, match=rf"{bad}: not a PEM certificate"):
        tls.load_channel_credentials(cert, files.key, ca)


def test_load_garbage_key(pki: Path, tmp_path: Path) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    bad = tmp_path / "key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    with pytest.raises(InputError, match=rf"private key file {bad}: not a PEM private key"):
        tls.load_channel_credentials(files.cert, bad, files.ca)


def test_load_encrypted_key(pki: Path, tmp_path: Path) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    enc = tmp_path / "key.pem"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    enc.chmod(0o600)
    with pytest.raises(InputError, match="encrypted"):
        tls.load_channel_credentials(files.cert, enc, files.ca)


def test_load_key_mismatch(pki: Path) -> None:
    node, server = tls.TlsFiles.from_dir(pki / "node-a"), tls.TlsFiles.from_dir(pki / "server")
    with pytest.raises(InputError, match=rf"private key {server.key} does not match .*{node.cert}"):
        tls.load_channel_credentials(node.cert, server.key, node.ca)


def test_load_expired(pki: Path, tmp_path: Path) -> None:
    issue_node_cert(
        pki / "ca",
        tmp_path,
        "node-old",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=2),
    )
    files = tls.TlsFiles.from_dir(tmp_path)
    expected_end = (NOW - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    with pytest.raises(InputError, match=rf"{files.cert} has expired: .*until {expected_end}"):
        files.channel_credentials()


def test_load_not_yet_valid(pki: Path, tmp_path: Path) -> None:
    issue_node_cert(
        pki / "ca",
        tmp_path,
        "node-future",
        not_before=NOW + dt.timedelta(days=2),
        not_after=NOW + dt.timedelta(days=30),
    )
    files = tls.TlsFiles.from_dir(tmp_path)
    expected_start = (NOW + dt.timedelta(days=2)).strftime("%Y-%m-%d")
    with pytest.raises(InputError, match=rf"not valid yet: valid from {expected_start}"):
        files.channel_credentials()


def test_load_wrong_ca(pki: Path) -> None:
    other = tls.TlsFiles.from_dir(pki / "other-node")
    ours = pki / "ca" / "ca.pem"
    with pytest.raises(InputError, match=rf"{other.cert} .*was not issued by the CA in {ours}"):
        tls.load_channel_credentials(other.cert, other.key, ours)


def test_a_ca_of_the_same_name_but_another_key_is_said_to_be_so(tmp_path: Path) -> None:
    """Two federations made with the default CA name: the refusal named the issuer and the CA
    alike, and read as a contradiction (operator review, session 20)."""
    create_ca(tmp_path / "ours")
    create_ca(tmp_path / "theirs")
    issue_node_cert(tmp_path / "theirs", tmp_path / "node", "node-a")
    node = tls.TlsFiles.from_dir(tmp_path / "node")
    with pytest.raises(InputError, match="the same name, but another CA key"):
        tls.load_channel_credentials(node.cert, node.key, tmp_path / "ours" / "ca.pem")


def test_load_ca_file_is_not_a_ca(pki: Path) -> None:
    node = tls.TlsFiles.from_dir(pki / "node-a")
    with pytest.raises(InputError, match=rf"CA certificate file {node.cert}: .* is not a CA"):
        tls.load_channel_credentials(node.cert, node.key, node.cert)


def test_load_wrong_eku(pki: Path) -> None:
    node, server = tls.TlsFiles.from_dir(pki / "node-a"), tls.TlsFiles.from_dir(pki / "server")
    with pytest.raises(InputError, match=rf"{node.cert} lacks ExtendedKeyUsage serverAuth"):
        tls.load_server_credentials(node.cert, node.key, node.ca)
    with pytest.raises(InputError, match=rf"{server.cert} lacks ExtendedKeyUsage clientAuth"):
        tls.load_channel_credentials(server.cert, server.key, server.ca)


def test_load_warns_on_readable_key(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = tls.TlsFiles.from_dir(pki / "node-a")
    key = tmp_path / "key.pem"
    key.write_bytes(files.key.read_bytes())
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pluralfed.tls"):
        tls.load_channel_credentials(files.cert, key, files.ca)
    assert any(
        "readable by group/others" in r.message and str(key) in r.message for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pluralfed.tls"):
        files.channel_credentials()
    assert not caplog.records


def test_channel_options() -> None:
    assert tls.channel_options(None) == []
    assert tls.channel_options("coordinator.example.org") == [
        ("grpc.ssl_target_name_override", "coordinator.example.org")
    ]


# --------------------------------------------------------------------------------------------------
# identity from grpc's auth context


def ctx(**values: list[bytes]) -> dict[str, list[bytes]]:
    return {"transport_security_type": [b"ssl"], **values}


def test_identity_from_uri_san() -> None:
    auth = ctx(
        x509_common_name=[b"node-a"],
        x509_subject_alternative_name=[b"pluralfed://node/node-a"],
        peer_uri=[b"pluralfed://node/node-a"],
    )
    assert tls.identity_from_auth_context(auth) == "node-a"


def _cert_with_sans(*names: x509.GeneralName) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_identity_is_only_a_uri_san_of_the_certificate() -> None:
    """gRPC lists DNS, e-mail and URI SANs together: a DNS or e-mail SAN spelling a node's URI
    (which an external CA may sign) must not make its holder that node."""
    spelled = "pluralfed://node/node-a"
    for other in (x509.DNSName(spelled), x509.RFC822Name(spelled)):
        pem = _cert_with_sans(other)
        auth = ctx(x509_pem_cert=[pem], x509_subject_alternative_name=[spelled.encode()])
        assert tls.identity_from_auth_context(auth) is None, other
    real = _cert_with_sans(x509.UniformResourceIdentifier(spelled), x509.DNSName("node-a.example"))
    auth = ctx(x509_pem_cert=[real], x509_subject_alternative_name=[spelled.encode()])
    assert tls.identity_from_auth_context(auth) == "node-a"


def test_identity_is_only_a_uri_of_the_node_scheme() -> None:
    """Another URI SAN is no identity, even one whose tail is a node id at the same offset
    ("https://evil.com/" is as long as "pluralfed://node/"); next to a node URI it is ignored."""
    foreign = x509.UniformResourceIdentifier("https://evil.com/node-a")
    auth = ctx(x509_pem_cert=[_cert_with_sans(foreign)])
    assert tls.identity_from_auth_context(auth) is None
    both = _cert_with_sans(x509.UniformResourceIdentifier("pluralfed://node/node-b"), foreign)
    assert tls.identity_from_auth_context(ctx(x509_pem_cert=[both])) == "node-b"


def test_two_common_names_are_no_identity_even_where_a_common_name_may_be() -> None:
    """With allow_common_name, a certificate without a node URI is known by its one subject
    CN; one with two (gRPC lists both) names nobody in particular: refused, not either."""
    auth = ctx(x509_common_name=[b"node-a", b"node-b"])
    assert tls.identity_from_auth_context(auth, allow_common_name=True) is None
    same = ctx(x509_common_name=[b"node-a", b"node-a"])
    assert tls.identity_from_auth_context(same, allow_common_name=True) == "node-a"


def test_a_node_uri_outranks_the_common_name_where_a_common_name_may_be() -> None:
    """allow_common_name is a fallback for certificates without a node URI: one that has it is
    that node, whatever its subject CN says (here node-a)."""
    pem = _cert_with_sans(x509.UniformResourceIdentifier("pluralfed://node/node-b"))
    auth = ctx(x509_pem_cert=[pem], x509_common_name=[b"node-a"])
    assert tls.identity_from_auth_context(auth, allow_common_name=True) == "node-b"
    assert tls.identity_from_auth_context(auth) == "node-b"


def test_identity_needs_tls() -> None:
    auth = {
        "transport_security_type": [b"insecure"],
        "peer_uri": [b"pluralfed://node/a"],
    }
    assert tls.identity_from_auth_context(auth) is None
    assert tls.identity_from_auth_context({}) is None


def test_identity_ignores_dns_sans_and_cn_by_default() -> None:
    auth = ctx(x509_common_name=[b"node-a"], peer_uri=[])
    assert tls.identity_from_auth_context(auth) is None
    assert tls.identity_from_auth_context(auth, allow_common_name=True) == "node-a"


def test_identity_ambiguous_or_invalid() -> None:
    two = ctx(peer_uri=[b"pluralfed://node/a", b"pluralfed://node/b"])
    assert tls.identity_from_auth_context(two) is None
    bad = ctx(peer_uri=[b"pluralfed://node/../etc"])
    assert tls.identity_from_auth_context(bad) is None
    assert (
        tls.identity_from_auth_context(ctx(x509_common_name=[b"a b"]), allow_common_name=True)
        is None
    )


# --------------------------------------------------------------------------------------------------
# the `pluralfed certs` command


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="pluralfed")
    certs.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    return int(args.func(args))


def test_cli_init_server_node_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("init", "--out", str(tmp_path / "ca"), "--ca-name", "Test CA", "--days", "100") == 0
    ca = load_cert(tmp_path / "ca" / "ca.pem")
    assert ca.subject.rfc4514_string() == "CN=Test CA"
    assert run(
        "server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"),
        "--name", "coord", "--san", "localhost", "--san", "127.0.0.1,coord.example.org",
    ) == 0  # fmt: skip
    srv = load_cert(tmp_path / "srv" / "cert.pem")
    assert sans(srv).get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert run(
        "node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"),
        "--id", "n1", "--id", "n2", "--ids", "n3,n4",
    ) == 0  # fmt: skip
    for node_id in ("n1", "n2", "n3", "n4"):
        files = tls.TlsFiles.from_dir(tmp_path / "nodes" / node_id)
        files.channel_credentials()
        assert mode(files.key) == 0o600
    capsys.readouterr()
    assert (
        run("show", str(tmp_path / "srv" / "cert.pem"), str(tmp_path / "nodes" / "n3" / "cert.pem"))
        == 0
    )
    out = capsys.readouterr().out
    assert "subject:     CN=coord" in out
    assert "DNS:localhost, IP:127.0.0.1, DNS:coord.example.org" in out
    assert "URI:pluralfed://node/n3" in out and "node id:     n3" in out
    assert "status:      valid (dates only: revocation not checked, see --ca)" in out
    assert fingerprint(srv) in out and len(fingerprint(srv)) == 95
    # with the CA folder, the status says whether the CA revoked it (before, a revoked
    # certificate showed "valid"; walkthrough review, session 17)
    n3 = str(tmp_path / "nodes" / "n3" / "cert.pem")
    assert run("show", n3, "--ca", str(tmp_path / "ca")) == 0
    assert "status:      valid (not revoked in" in capsys.readouterr().out
    assert run("revoke", "--ca", str(tmp_path / "ca"), "--cert", n3) == 0
    assert run("show", n3, "--ca", str(tmp_path / "ca")) == 0
    assert f"status:      REVOKED (in {tmp_path / 'ca' / 'crl.pem'})" in capsys.readouterr().out
    # a mistyped folder, or another CA, is no all-clear (diff review, session 17)
    with pytest.raises(InputError, match="not a CA folder"):
        run("show", n3, "--ca", str(tmp_path / "typo"))
    run("init", "--out", str(tmp_path / "other-ca"))
    capsys.readouterr()
    assert run("show", n3, "--ca", str(tmp_path / "other-ca")) == 0
    assert "status:      NOT ISSUED by the CA of" in capsys.readouterr().out


def test_cli_show_ca_must_be_the_folder_with_the_revocation_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node's or the coordinator's folder holds a copy of ca.pem but not the CA's crl.pem:
    `--ca` on it called a revoked certificate "valid (not revoked)" (inputs review, L6)."""
    out = tmp_path / "pki"
    run("federation", "--out", str(out), "--nodes", "node-a,node-b")
    cert = str(out / "nodes" / "node-b" / "cert.pem")
    run("revoke", "--ca", str(out / "ca"), "--cert", cert)
    capsys.readouterr()
    for party in (out / "nodes" / "node-b", out / "coordinator"):
        with pytest.raises(InputError, match=r"not the CA's: its ca\.pem is a copy") as err:
            run("show", cert, "--ca", str(party))
        assert str(party) in str(err.value) and "ca.key and crl.pem" in str(err.value)
    assert capsys.readouterr().out == ""
    # ca.pem alone (no key, no list): the status does not claim "not revoked"
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "ca.pem").write_bytes((out / "ca" / "ca.pem").read_bytes())
    assert run("show", cert, "--ca", str(tmp_path / "copy")) == 0
    shown = capsys.readouterr().out
    assert "revocations unknown" in shown and "not revoked" not in shown
    assert "status:      valid (revocation unknown: no crl.pem in" in shown
    assert run("show", cert, "--ca", str(out / "ca")) == 0
    assert "status:      REVOKED (in" in capsys.readouterr().out
    # the CA's own folder before any revocation: nothing revoked, truly
    run("init", "--out", str(tmp_path / "ca2"))
    run("node", "--ca", str(tmp_path / "ca2"), "--out", str(tmp_path / "n"), "--id", "x")
    capsys.readouterr()
    assert run("show", str(tmp_path / "n" / "x" / "cert.pem"), "--ca", str(tmp_path / "ca2")) == 0
    shown = capsys.readouterr().out
    assert "this CA has revoked no certificate" in shown and "valid (not revoked in" in shown


def test_cli_show_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`certs show ... | head` ended in a BrokenPipeError traceback; now as SIGPIPE ends other
    tools: no output on stderr, exit status 141. The reader is gone before the command writes."""
    run("federation", "--out", str(tmp_path / "pki"), "--nodes", "a")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pluralfed.cli", "certs", "show"]
            + [str(path) for path in sorted((tmp_path / "pki").rglob("cert.pem"))],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 128 + signal.SIGPIPE, done.stderr


def test_cli_node_all_or_nothing(tmp_path: Path) -> None:
    run("init", "--out", str(tmp_path / "ca"))
    run("node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"), "--id", "n2")
    with pytest.raises(InputError, match=r"n2/cert\.pem"):
        run(
            "node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"), "--ids", "n1,n2"
        )
    assert not (tmp_path / "nodes" / "n1").exists()
    with pytest.raises(InputError, match="given twice"):
        run(
            "node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"), "--ids", "n5,n5"
        )
    with pytest.raises(InputError, match="at least one"):
        run("node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"))


def test_cli_show_expired_and_garbage(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issue_node_cert(
        pki / "ca",
        tmp_path,
        "old",
        not_before=NOW - dt.timedelta(days=3),
        not_after=NOW - dt.timedelta(days=1),
    )
    run("show", str(tmp_path / "cert.pem"))
    assert "status:      EXPIRED" in capsys.readouterr().out
    with pytest.raises(InputError, match="not a PEM certificate"):
        run("show", str(tmp_path / "key.pem"))


def test_cli_show_says_not_yet_valid_and_which_is_a_ca(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate whose validity starts later is NOT YET VALID (a CA or peer clock ahead, or
    a certificate issued for later), not EXPIRED, which sends the operator to renew it; and the
    CA line tells the CA's certificate from a party's."""
    issue_node_cert(
        pki / "ca",
        tmp_path,
        "later",
        not_before=NOW + dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=3),
    )
    assert run("show", str(tmp_path / "cert.pem"), str(pki / "ca" / "ca.pem")) == 0
    later, ca = capsys.readouterr().out.split("\n\n")
    assert "status:      NOT YET VALID" in later and "EXPIRED" not in later
    assert "CA:          no" in later
    assert "CA:          yes" in ca and "status:      valid" in ca


def test_cli_federation_layout(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    assert (
        run(
            "federation",
            "--out",
            str(out),
            "--nodes",
            "node-a,node-b",
            "--nodes",
            "node-c",
            "--san",
            "localhost",
        )
        == 0
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "ca/ca.key", "ca/ca.pem",
        "coordinator/ca.pem", "coordinator/cert.pem", "coordinator/key.pem",
        "nodes/node-a/ca.pem", "nodes/node-a/cert.pem", "nodes/node-a/key.pem",
        "nodes/node-b/ca.pem", "nodes/node-b/cert.pem", "nodes/node-b/key.pem",
        "nodes/node-c/ca.pem", "nodes/node-c/cert.pem", "nodes/node-c/key.pem",
    ]  # fmt: skip
    assert list(out.rglob("ca.key")) == [out / "ca" / "ca.key"]
    assert all(mode(k) == 0o600 for k in out.rglob("key.pem"))
    assert mode(out / "ca" / "ca.key") == 0o600
    tls.TlsFiles.from_dir(out / "coordinator").server_credentials()
    for node_id in ("node-a", "node-b", "node-c"):
        tls.TlsFiles.from_dir(out / "nodes" / node_id).channel_credentials()
        cert = load_cert(out / "nodes" / node_id / "cert.pem")
        assert sans(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
            f"pluralfed://node/{node_id}"
        ]
    coord = load_cert(out / "coordinator" / "cert.pem")
    assert sans(coord).get_values_for_type(x509.DNSName) == ["localhost"]
    assert coord.subject.rfc4514_string() == "CN=coordinator"


def test_cli_lists_skip_empty_items_and_spaces(tmp_path: Path) -> None:
    """`--nodes "a, b,"`: a space after a comma, or a trailing comma, names no extra node."""
    out = tmp_path / "fed"
    assert run("federation", "--out", str(out), "--nodes", " a, b,", "--san", "localhost,") == 0
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["a", "b"]
    coord = load_cert(out / "coordinator" / "cert.pem")
    assert sans(coord).get_values_for_type(x509.DNSName) == ["localhost"]


@pytest.mark.parametrize("action", ["server", "federation"])
def test_cli_coordinator_certificate_names_localhost_by_default(
    action: str, tmp_path: Path
) -> None:
    """Without --san the coordinator's certificate is for localhost and 127.0.0.1, as the help
    says: a node on the same machine dials either."""
    if action == "server":
        run("init", "--out", str(tmp_path / "ca"))
        run("server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "coordinator"))
    else:
        run("federation", "--out", str(tmp_path), "--nodes", "a")
    coord = sans(load_cert(tmp_path / "coordinator" / "cert.pem"))
    assert coord.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in coord.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_cli_default_validity_of_each_certificate(tmp_path: Path) -> None:
    """As the help says: a CA for 3650 days, the coordinator's and the nodes' for 825."""

    def days_left(path: Path) -> int:
        return (load_cert(path).not_valid_after_utc - NOW).days

    run("federation", "--out", str(tmp_path / "fed"), "--nodes", "a")
    assert days_left(tmp_path / "fed" / "ca" / "ca.pem") in (3649, 3650)
    assert days_left(tmp_path / "fed" / "coordinator" / "cert.pem") in (824, 825)
    assert days_left(tmp_path / "fed" / "nodes" / "a" / "cert.pem") in (824, 825)
    run("init", "--out", str(tmp_path / "ca"))
    run("server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"))
    run("node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"), "--id", "b")
    assert days_left(tmp_path / "srv" / "cert.pem") in (824, 825)
    assert days_left(tmp_path / "nodes" / "b" / "cert.pem") in (824, 825)


def test_cli_init_makes_a_ten_year_ca_named_pluralfed_ca_by_default(tmp_path: Path) -> None:
    """As `certs init --help` says: without options the CA is "pluralfed CA", valid 3650 days
    (the federation action's CA had these pinned, `init`'s own not)."""
    run("init", "--out", str(tmp_path / "ca"))
    ca = load_cert(tmp_path / "ca" / "ca.pem")
    assert ca.subject.rfc4514_string() == "CN=pluralfed CA"
    assert (ca.not_valid_after_utc - NOW).days in (3649, 3650)


def test_cli_server_and_node_certificates_last_the_days_given(tmp_path: Path) -> None:
    """--days reaches the certificates `server` and `node` issue, not only their default."""
    run("init", "--out", str(tmp_path / "ca"))
    run("server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"), "--days", "40")
    run(
        "node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "n"), "--id", "a",
        "--days", "50",
    )  # fmt: skip
    for path, days in (
        (tmp_path / "srv" / "cert.pem", 40),
        (tmp_path / "n" / "a" / "cert.pem", 50),
    ):
        assert (load_cert(path).not_valid_after_utc - NOW).days in (days - 1, days), path


def test_cli_server_certificate_is_named_coordinator_by_default(tmp_path: Path) -> None:
    """Without --name the server certificate's Common Name is "coordinator", as its help says."""
    run("init", "--out", str(tmp_path / "ca"))
    run("server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"))
    assert load_cert(tmp_path / "srv" / "cert.pem").subject.rfc4514_string() == "CN=coordinator"


def test_cli_server_replaces_its_certificate_only_with_force(tmp_path: Path) -> None:
    """A second `certs server` into the same folder is refused and changes nothing; with
    --force it issues a new certificate and key."""
    run("init", "--out", str(tmp_path / "ca"))
    server = ["server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv")]
    run(*server)
    before = (tmp_path / "srv" / "key.pem").read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        run(*server)
    assert (tmp_path / "srv" / "key.pem").read_bytes() == before
    assert run(*server, "--force") == 0
    assert (tmp_path / "srv" / "key.pem").read_bytes() != before
    tls.TlsFiles.from_dir(tmp_path / "srv").server_credentials()


def test_cli_federation_folders_are_the_owners_only(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    run("federation", "--out", str(out), "--nodes", "a,b")
    for folder in (out, out / "ca", out / "coordinator", out / "nodes", out / "nodes" / "a"):
        assert mode(folder) == 0o700, folder


def test_cli_federation_refuses_a_bad_server_name_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--server-name"):
        run("federation", "--out", str(tmp_path / "f"), "--nodes", "a", "--server-name", "a/b")
    assert not (tmp_path / "f").exists()


def test_cli_node_all_or_nothing_counts_a_key_left_alone(tmp_path: Path) -> None:
    """A key.pem without its cert.pem (a half-copied folder) is refused too, before any node's
    files are written."""
    run("init", "--out", str(tmp_path / "ca"))
    (tmp_path / "nodes" / "n2").mkdir(parents=True)
    (tmp_path / "nodes" / "n2" / "key.pem").write_text("a key kept elsewhere\n")
    with pytest.raises(InputError, match=r"n2/key\.pem"):
        run(
            "node", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "nodes"), "--ids", "n1,n2"
        )
    assert not (tmp_path / "nodes" / "n1").exists()


def test_cli_federation_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    run("federation", "--out", str(out), "--nodes", "a,b")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # re-run to add a partner: the refusal says how to add one, and what --force would do
    # (it advised only "use --force", which makes a new CA; walkthrough review L3)
    with pytest.raises(InputError, match="refusing to overwrite") as err:
        run("federation", "--out", str(out), "--nodes", "a,b,c")
    message = str(err.value)
    assert f"pluralfed certs node --ca {out / 'ca'} --out {out / 'nodes'} --ids c" in message
    assert "--force would make a NEW CA: every certificate issued so far" in message
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "a refused run must not write anything"
    run("federation", "--out", str(out), "--nodes", "a,b", "--force")
    assert (out / "ca" / "ca.key").read_bytes() != before[out / "ca" / "ca.key"]
    tls.TlsFiles.from_dir(out / "nodes" / "a").channel_credentials()  # consistent with the new CA


def test_cli_federation_rejects_bad_input_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="node id"):
        run("federation", "--out", str(tmp_path / "f"), "--nodes", "good,bad/id")
    with pytest.raises(InputError, match="SAN"):
        run("federation", "--out", str(tmp_path / "f"), "--nodes", "a", "--san", "not a name")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("action", ["init", "server", "node", "show", "federation"])
def test_cli_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(action, "--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if action != "show":
        assert "--force" in out and "--days" in out
    if action in ("init", "federation"):
        assert "makes a NEW CA" in " ".join(out.split())
    if action == "federation":
        assert "nodes/<id>/" in out and "[allow_list]" in out


@pytest.mark.parametrize(
    ("argv", "missing"),
    [(("federation", "--nodes", "a"), "--out"), (("show",), "FILE")],
)
def test_cli_a_missing_required_argument_is_a_usage_error(
    argv: tuple[str, ...], missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`certs federation` without --out, or `certs show` without a file, is refused by the
    parser (exit 2, naming what is missing), not run with nothing to write or show."""
    with pytest.raises(SystemExit) as exit_:
        run(*argv)
    assert exit_.value.code == 2
    assert f"the following arguments are required: {missing}" in capsys.readouterr().err


def test_cli_every_option_has_help() -> None:
    parser = argparse.ArgumentParser(prog="pluralfed")
    subparsers = parser.add_subparsers()
    certs.register(subparsers)
    certs_parser = subparsers.choices["certs"]
    actions_parser = next(
        a for a in certs_parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, sub in actions_parser.choices.items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"certs {name} {action.option_strings or action.dest}: no help"


def test_cli_bad_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        run("init", "--out", str(tmp_path / "ca"), "--days", "0")
    assert exit_.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


def test_cli_days_that_is_not_a_whole_number_is_refused_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--days "ten" (or 1.5) is a usage error (exit 2) naming the value, before anything is
    written: not read as some default validity."""
    for text in ("ten", "1.5"):
        with pytest.raises(SystemExit) as exit_:
            run("init", "--out", str(tmp_path / "ca"), "--days", text)
        assert exit_.value.code == 2
        assert f"not an integer: {text!r}" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


def test_generated_key_is_p256(pki: Path) -> None:
    key = serialization.load_pem_private_key((pki / "node-a" / "key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert (pki / "node-a" / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    "given",
    [("ca",), ("cert",), ("key",), ("ca", "cert"), ("cert", "key"), ("ca", "key")],
)
def test_tls_files_without_a_folder_need_all_three_paths(
    tmp_path: Path, given: tuple[str, ...]
) -> None:
    """Without tls_dir each of tls_ca, tls_cert and tls_key must be set: two of three is a
    config mistake said at once, not a TlsFiles with a missing path that fails later."""
    paths = {
        name: (tmp_path / f"{name}.pem" if name in given else None)
        for name in ("ca", "cert", "key")
    }
    with pytest.raises(InputError, match=r"^node config: mutual TLS needs tls_dir"):
        tls.resolve_tls_files("node", None, paths["ca"], paths["cert"], paths["key"])
    # with the folder, any of them may override its file
    files = tls.resolve_tls_files(
        "node", tmp_path / "dir", paths["ca"], paths["cert"], paths["key"]
    )
    for name in ("ca", "cert", "key"):
        expected = tmp_path / (f"{name}.pem" if name in given else f"dir/{name}.pem")
        assert getattr(files, name) == expected


def test_an_expired_ca_in_the_ca_file_is_refused_naming_the_file(pki: Path, tmp_path: Path) -> None:
    """Every CA certificate the file holds must be current, not only the leaf: one of a bundle
    (an old CA kept next to the new one) that expired is said at load, with its end date."""
    create_ca(
        tmp_path / "old",
        not_before=NOW - dt.timedelta(days=9),
        not_after=NOW - dt.timedelta(days=1),
    )
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(
        (pki / "ca" / "ca.pem").read_bytes() + (tmp_path / "old" / "ca.pem").read_bytes()
    )
    node = tls.TlsFiles.from_dir(pki / "node-a")
    tls.load_channel_credentials(node.cert, node.key, node.ca)  # the control: its own CA file
    expected_end = (NOW - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    with pytest.raises(
        InputError, match=rf"^CA certificate {bundle} has expired: .*until {expected_end}"
    ):
        tls.load_channel_credentials(node.cert, node.key, bundle)


@pytest.mark.parametrize("key_mode", [0o640, 0o604, 0o600, 0o400])
def test_a_key_readable_by_its_group_alone_is_warned_about_too(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, key_mode: int
) -> None:
    """A key its owner's group may read (0640, common for a service account's files) is
    exposed as one others may read, and warned about; 0600 and 0400 are not."""
    files = tls.TlsFiles.from_dir(pki / "node-a")
    key = tmp_path / f"key-{key_mode:o}.pem"
    key.write_bytes(files.key.read_bytes())
    key.chmod(key_mode)
    with caplog.at_level(logging.WARNING, logger="pluralfed.tls"):
        tls.load_channel_credentials(files.cert, key, files.ca)
    warned = any("readable by group/others" in r.message for r in caplog.records)
    assert warned == bool(key_mode & 0o077)


@pytest.mark.parametrize(("days", "warned"), [(10, True), (60, False)])
def test_a_certificate_that_expires_within_a_month_is_warned_about_at_load(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, days: int, warned: bool
) -> None:
    """An operator gets a month to issue a new certificate before its node stops connecting."""
    issue_node_cert(pki / "ca", tmp_path / "n", f"node-{days}", days=days)
    files = tls.TlsFiles.from_dir(tmp_path / "n")
    with caplog.at_level(logging.WARNING, logger="pluralfed.tls"):
        files.channel_credentials()
    soon = [r.message for r in caplog.records if "expires soon" in r.message]
    assert len(soon) == int(warned)
    if warned:
        end = (NOW + dt.timedelta(days=days)).strftime("%Y-%m-%d")
        assert soon[0].startswith(f"certificate {files.cert} expires soon, on {end}")
