"""TLS material for a federation: a private CA, the coordinator's server certificate, node certificates.

Identity model (like OpenFL): every group node holds a certificate issued by the federation's CA; the
coordinator requires it in the TLS handshake (mutual TLS) and maps the certificate's identity to a node
name through its allow-list (`pluralfed.auth.AllowList`).

Certificate layout (EC P-256 keys, SHA-256 signatures):

* CA: ``CN=<ca name>``, BasicConstraints CA:true pathlen 0, KeyUsage keyCertSign+cRLSign.
* Coordinator: ``CN=<name>``, SubjectAltName = the given DNS names / IP addresses (the names clients dial),
  ExtendedKeyUsage serverAuth.
* Node: ``CN=<node_id>`` and SubjectAltName ``URI:pluralfed://node/<node_id>``, ExtendedKeyUsage clientAuth.
  The *identity* the coordinator trusts is the URI SAN: only node certificates carry it, so no other
  certificate of the same CA can be taken for a node (gRPC's TLS also rejects a client certificate
  without clientAuth in the handshake; the URI is defence in depth). The CN repeats the id for humans and
  for tools that only show the subject.

Files: a CA directory holds ``ca.pem`` + ``ca.key``; every party's directory holds ``ca.pem`` (the CA
certificate, to verify the peer), ``cert.pem`` and ``key.pem`` (mode 0600). The CA key never leaves the CA
directory.

Revocation: the CA keeps a CRL it signs, ``crl.pem`` in its directory (`revoke_certificates`). gRPC's
Python API takes no CRL, so servers check it themselves, call by call, by the serial number of the
verified client certificate (`load_revocation_list`, `peer_serial`; `pluralfed.auth.RevocationWatch`).

Connecting by IP address when the coordinator's certificate only names a DNS host: either issue the
server certificate with the IP as a SAN (``--san 10.0.0.5``; preferred), or have the client check the
certificate against the DNS name with the channel option ``grpc.ssl_target_name_override`` (see
`channel_options` / `secure_channel`: ``secure_channel("10.0.0.5:50051", files,
server_name_override="coordinator.example.org")``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pluralfed.errors import InputError

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CRL_FILE = "crl.pem"  # in the CA folder: the certificates the CA has revoked

NODE_URI_PREFIX = "pluralfed://node/"
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_PATTERN = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")

# Issued certificates start a little in the past so a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
EXPIRY_WARNING = dt.timedelta(days=30)
TARGET_NAME_OVERRIDE_OPTION = "grpc.ssl_target_name_override"

PathLike = str | os.PathLike[str]
Role = Literal["server", "client"]


@dataclass(frozen=True)
class TlsFiles:
    """The three files one party needs: the CA certificate to verify peers, its own cert and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: PathLike) -> TlsFiles:
        """The standard layout ``<dir>/ca.pem, cert.pem, key.pem`` written by `pluralfed certs`."""
        d = Path(directory)
        return cls(ca=d / CA_CERT_FILE, cert=d / CERT_FILE, key=d / KEY_FILE)

    def server_credentials(self) -> grpc.ServerCredentials:
        return load_server_credentials(self.cert, self.key, self.ca)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return load_channel_credentials(self.cert, self.key, self.ca)


@dataclass(frozen=True)
class CaFiles:
    """A CA directory: its certificate (to distribute) and its key (to keep)."""

    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: PathLike) -> CaFiles:
        d = Path(directory)
        return cls(cert=d / CA_CERT_FILE, key=d / CA_KEY_FILE)


# --------------------------------------------------------------------------------------------------
# validation of names


def validate_node_id(node_id: str, *, where: str = "node id") -> str:
    """A node id is a certificate CN, a URI path segment and a directory name: keep it to a safe charset."""
    if not isinstance(node_id, str) or not node_id:
        raise InputError(f"{where}: empty node id")
    if NODE_ID_PATTERN.fullmatch(node_id) is None:
        raise InputError(
            f"{where}: invalid node id {node_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return node_id


def parse_san(value: str) -> x509.GeneralName:
    """One SubjectAltName: an IP address if it parses as one (``[::1]`` too), else a DNS name."""
    text = value.strip()
    if not text:
        raise InputError("SAN: empty name")
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return x509.IPAddress(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    if len(text) > 253 or _DNS_PATTERN.fullmatch(text) is None:
        raise InputError(f"SAN: {value!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(text.rstrip(".").lower())


# --------------------------------------------------------------------------------------------------
# writing files


def _write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write atomically (temp file + rename) with `mode` from the start, so a key is never readable by
    others, not even briefly, and a crash never leaves a half-written file. Without `force`, never
    replaces an existing file (hard-link publishing fails if the name exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise InputError(
                    f"{path} already exists; refusing to overwrite (use --force)"
                ) from None
            except OSError:  # file system without hard links: check, then rename
                if path.exists():
                    raise InputError(
                        f"{path} already exists; refusing to overwrite (use --force)"
                    ) from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable too, so a crash cannot lose a key just reported written."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_no_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Check every target before writing any, so a refusal never leaves a half-issued directory."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise InputError(
            f"refusing to overwrite existing file(s): {', '.join(existing)} (use --force)"
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # gRPC cannot read encrypted keys; protect with file mode instead
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_ca_copy(ca_cert_pem: bytes, path: Path, force: bool) -> None:
    """Each party's directory gets the CA certificate; an identical existing copy is fine."""
    if path.exists() and path.read_bytes() == ca_cert_pem:
        return
    _write_file(path, ca_cert_pem, mode=0o644, force=force)


# --------------------------------------------------------------------------------------------------
# issuing


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# the last moment a certificate or CRL date can name (GeneralizedTime and `datetime` both end here)
LAST_DATE = dt.datetime.max.replace(tzinfo=dt.UTC)


def days_problem(days: int) -> str | None:
    """What is wrong with `days` of validity from now, or None: at least 1, and ending by
    9999-12-31, the last date a certificate can hold."""
    if days < 1:
        return f"must be at least 1, got {days}"
    latest = (LAST_DATE - _now()).days
    if days > latest:
        return (
            f"{days} days from now is past {LAST_DATE:%Y-%m-%d}, the last date a certificate can "
            f"hold; give at most {latest}"
        )
    return None


def check_days(days: int, what: str = "days") -> int:
    """`days`, or an InputError naming `what` (see `days_problem`). Callers check before writing
    anything, so that a bad value never leaves half a federation behind (a CA, no certificates)."""
    problem = days_problem(days)
    if problem is not None:
        raise InputError(f"{what}: {problem}")
    return days


def _days_after(moment: dt.datetime, days: int, what: str) -> dt.datetime:
    """`moment` + `days`, with `check_days`'s InputError rather than an OverflowError."""
    check_days(days, what)
    try:
        return moment + dt.timedelta(days=days)
    except OverflowError:  # defensive: check_days read the clock after `moment` was taken
        raise InputError(f"{what}: {days} days from now is past {LAST_DATE:%Y-%m-%d}") from None


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    start = _aware(not_before) if not_before is not None else _now() - CLOCK_SKEW
    end = (
        _aware(not_after) if not_after is not None else _days_after(_now(), days, "validity: days")
    )
    if end <= start:
        raise InputError(
            f"validity: not_after {end:%Y-%m-%d %H:%M} is not after {start:%Y-%m-%d %H:%M}"
        )
    return start, end


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(
    out_dir: PathLike,
    common_name: str = "pluralfed CA",
    days: int = 3650,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> CaFiles:
    """Create the federation's CA: ``ca.pem`` (give to every party) and ``ca.key`` (mode 0600, keep)."""
    if not common_name.strip() or len(common_name) > 64:
        raise InputError(f"CA name: must be 1-64 characters, got {common_name!r}")
    files = CaFiles.from_dir(out_dir)
    check_no_overwrite([files.cert, files.key], force)
    start, end = _validity(days, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_file(files.key, _key_pem(key), mode=0o600, force=force)
    _write_file(files.cert, _cert_pem(cert), mode=0o644, force=force)
    log.debug("created CA %r in %s (valid until %s)", common_name, out_dir, _fmt(end))
    return files


def _load_ca(ca_dir: PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    files = CaFiles.from_dir(ca_dir)
    if not files.key.is_file():
        raise InputError(
            f"CA key not found at {files.key}: pass the directory made by `pluralfed certs init` "
            "(the CA key is kept only there)"
        )
    cert_pem = _read(files.cert, "CA certificate")
    certs = _parse_certs(cert_pem, files.cert, "CA certificate")
    cert = certs[0]
    key = _parse_key(_read(files.key, "CA key"), files.key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{files.key}: CA key is not an EC key")
    _check_key_matches(cert, key, files.cert, files.key)
    _check_is_ca(cert, files.cert)
    _check_current(cert, files.cert, "CA certificate")
    return cert, key, _cert_pem(cert)


def _issue_leaf(
    ca_dir: PathLike,
    out_dir: PathLike,
    *,
    common_name: str,
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    force: bool,
) -> TlsFiles:
    files = TlsFiles.from_dir(out_dir)
    check_no_overwrite([files.cert, files.key], force)
    ca_cert, ca_key, ca_pem = _load_ca(ca_dir)
    if not force and files.ca.exists() and files.ca.read_bytes() != ca_pem:
        raise InputError(
            f"{files.ca} already exists and holds a different CA certificate than {ca_dir}; "
            "refusing to overwrite (use --force)"
        )
    start, end = _validity(days, not_before, not_after)
    if not_after is None and end > ca_cert.not_valid_after_utc:
        log.warning(
            "certificate for %r would outlive the CA; ending it with the CA on %s",
            common_name,
            _fmt(ca_cert.not_valid_after_utc),
        )
        end = ca_cert.not_valid_after_utc
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_file(files.key, _key_pem(key), mode=0o600, force=force)
    _write_file(files.cert, _cert_pem(cert), mode=0o644, force=force)
    _write_ca_copy(ca_pem, files.ca, force)
    return files


def issue_server_cert(
    ca_dir: PathLike,
    out_dir: PathLike,
    name: str,
    sans: Sequence[str],
    days: int = 825,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> TlsFiles:
    """The coordinator's certificate: clients check the name they dial against `sans`, so list every
    DNS name and IP address they use. Writes ``cert.pem``, ``key.pem`` and ``ca.pem`` into `out_dir`."""
    validate_node_id(name, where="server name")
    if not sans:
        raise InputError("server SANs: give at least one DNS name or IP address clients will dial")
    general_names: list[x509.GeneralName] = []
    for value in sans:
        parsed = parse_san(value)
        if parsed not in general_names:
            general_names.append(parsed)
    files = _issue_leaf(
        ca_dir,
        out_dir,
        common_name=name,
        sans=general_names,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
        not_before=not_before,
        not_after=not_after,
        force=force,
    )
    log.debug("issued server certificate %r for %s in %s", name, ", ".join(sans), out_dir)
    return files


def node_uri(node_id: str) -> str:
    return f"{NODE_URI_PREFIX}{node_id}"


def issue_node_cert(
    ca_dir: PathLike,
    out_dir: PathLike,
    node_id: str,
    days: int = 825,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> TlsFiles:
    """A group node's client certificate: identity ``URI:pluralfed://node/<node_id>`` (and CN=node_id).
    Writes ``cert.pem``, ``key.pem`` and ``ca.pem`` into `out_dir`."""
    validate_node_id(node_id)
    files = _issue_leaf(
        ca_dir,
        out_dir,
        common_name=node_id,
        sans=[x509.UniformResourceIdentifier(node_uri(node_id))],
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        days=days,
        not_before=not_before,
        not_after=not_after,
        force=force,
    )
    log.debug("issued node certificate %r in %s", node_id, out_dir)
    return files


# --------------------------------------------------------------------------------------------------
# revocation: a CRL signed by the federation's CA, checked by the coordinator on every call


@dataclass(frozen=True)
class RevocationList:
    """The serial numbers that a federation's CA has revoked, from a CRL it signed."""

    path: Path
    serials: frozenset[int]
    this_update: dt.datetime
    next_update: dt.datetime | None

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials


def _parse_crl(data: bytes, path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise InputError(
            f"revocation list {path}: not a PEM CRL (no valid X509 CRL block); "
            "make it with `pluralfed certs revoke`"
        ) from None


def _check_crl(
    crl: x509.CertificateRevocationList,
    cas: Sequence[x509.Certificate],
    crl_path: Path,
    ca_path: Path,
) -> None:
    """The CRL must be signed by the federation's CA: a list anyone could write would let them
    lock nodes out (or, replacing a real one, let revoked nodes back in)."""
    for ca in cas:
        key = ca.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            continue
        if crl.issuer == ca.subject and crl.is_signature_valid(key):
            return
    raise InputError(
        f"revocation list {crl_path} (issuer {crl.issuer.rfc4514_string()}) is not signed by the "
        f"CA in {ca_path}: use the crl.pem that `pluralfed certs revoke` wrote in that CA's folder"
    )


def load_revocation_list(
    crl_path: PathLike, ca_path: PathLike, in_force: RevocationList | None = None
) -> RevocationList:
    """Read and verify a CRL against the CA certificate the server trusts (its ``ca.pem``).

    A CRL past its next update is still enforced (revocations must not lapse), with a warning.
    With `in_force` (a reload), a list the CA signed before that one is refused: an old copy put
    back (a restored backup) would otherwise let every certificate revoked since back in."""
    crl_file, ca_file = Path(crl_path), Path(ca_path)
    crl = _parse_crl(_read(crl_file, "revocation list"), crl_file)
    cas = _parse_certs(_read(ca_file, "CA certificate"), ca_file, "CA certificate")
    _check_crl(crl, cas, crl_file, ca_file)
    if in_force is not None and crl.last_update_utc < in_force.this_update:
        raise InputError(
            f"revocation list {crl_file} was signed {_fmt(crl.last_update_utc)}, before the one "
            f"in force ({_fmt(in_force.this_update)}): an older list is not taken back"
        )
    next_update = crl.next_update_utc
    if next_update is not None and _now() > next_update:
        log.warning(
            "revocation list %s was due for renewal on %s; still enforced. Renew it with "
            "`pluralfed certs revoke --ca DIR` (no certificate: re-signs the same list)",
            crl_file,
            _fmt(next_update),
        )
    return RevocationList(
        path=crl_file,
        serials=frozenset(r.serial_number for r in crl),
        this_update=crl.last_update_utc,
        next_update=next_update,
    )


def parse_serial(text: str) -> int:
    """A certificate serial number as `pluralfed certs show` prints it (hex, colons allowed)."""
    digits = text.strip().replace(":", "").lower().removeprefix("0x")
    try:
        serial = int(digits, 16)
    except ValueError:
        raise InputError(f"serial {text!r} is not a hexadecimal number") from None
    if not 0 < serial < 1 << 159:  # RFC 5280: positive, at most 20 octets
        raise InputError(f"serial {text!r} is out of range for a certificate serial number")
    return serial


def revoke_certificates(
    ca_dir: PathLike,
    certs: Sequence[PathLike] = (),
    serials: Sequence[int] = (),
    *,
    days: int = 30,
) -> tuple[Path, list[int]]:
    """Add certificates (files of this CA, or bare serial numbers) to the CA's revocation list
    ``<ca_dir>/crl.pem`` and sign it again, valid `days` more days. Returns the CRL's path and the
    serials newly revoked; already revoked ones are kept as they were (same revocation date).
    Nothing is written when a certificate is unreadable or from another CA."""
    check_days(days)
    ca_cert, ca_key, _ = _load_ca(ca_dir)
    files = CaFiles.from_dir(ca_dir)
    crl_path = files.cert.parent / CRL_FILE
    revoked: dict[int, dt.datetime] = {}
    if crl_path.exists():
        old = _parse_crl(_read(crl_path, "revocation list"), crl_path)
        _check_crl(old, [ca_cert], crl_path, files.cert)
        revoked = {r.serial_number: r.revocation_date_utc for r in old}
    wanted = list(serials)
    for cert_path in certs:
        p = Path(cert_path)
        cert = _parse_certs(_read(p, "certificate"), p, "certificate")[0]
        _check_chain(cert, [ca_cert], p, files.cert)
        wanted.append(cert.serial_number)
    now = _now()
    next_update = _days_after(now, days, "days")
    added = [s for s in dict.fromkeys(wanted) if s not in revoked]
    revoked.update({s: now for s in added})
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
    )
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_file(crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644, force=True)
    for serial in added:
        log.info("revoked certificate serial %x in %s", serial, crl_path)
    return crl_path, added


# --------------------------------------------------------------------------------------------------
# loading and validating


def _fmt(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: Path, what: str) -> bytes:
    shown = path if path.is_absolute() else f"{path} (relative to {Path.cwd()})"
    try:
        if not path.exists():
            raise InputError(f"{what} file not found: {shown}")
        if not path.is_file():
            raise InputError(f"{what} path is not a regular file: {shown}")
        return path.read_bytes()
    except PermissionError:  # the file's, or a folder's on the way to it (exists() raises too)
        raise InputError(
            f"{what} file is not readable (permission denied) by this process (uid "
            f"{os.getuid()}): {shown}"
        ) from None
    except OSError as err:
        raise InputError(f"{what} file could not be read: {shown}: {err.strerror}") from None


def _parse_certs(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InputError(
            f"{what} file {path}: not a PEM certificate (no valid CERTIFICATE block)"
        ) from None
    if not certs:
        raise InputError(f"{what} file {path}: contains no certificate")
    return certs


def _parse_key(data: bytes, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InputError(
            f"private key file {path}: the key is encrypted; gRPC needs an unencrypted key "
            "(protect it with file permissions 0600 instead)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise InputError(f"private key file {path}: not a PEM private key ({err})") from None


def _spki(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_key_matches(
    cert: x509.Certificate, key: PrivateKeyTypes, cert_path: Path, key_path: Path
) -> None:
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise InputError(
            f"private key {key_path} does not match the certificate {cert_path} "
            "(they were not issued together)"
        )


def _check_current(
    cert: x509.Certificate, path: Path, what: str, now: dt.datetime | None = None
) -> None:
    now = now or _now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise InputError(
            f"{what} {path} is not valid yet: valid from {_fmt(start)} until {_fmt(end)}, "
            f"now is {_fmt(now)} (check the clock)"
        )
    if now > end:
        raise InputError(
            f"{what} {path} has expired: valid from {_fmt(start)} until {_fmt(end)}, "
            f"now is {_fmt(now)} (issue a new one)"
        )
    if end - now < EXPIRY_WARNING:
        log.warning("%s %s expires soon, on %s", what, path, _fmt(end))


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InputError(f"CA certificate file {path}: {cert.subject.rfc4514_string()} is not a CA")


def _check_chain(
    cert: x509.Certificate, cas: Sequence[x509.Certificate], cert_path: Path, ca_path: Path
) -> None:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise InputError(
        f"certificate {cert_path} (issuer {cert.issuer.rfc4514_string()}) was not issued by the CA in "
        f"{ca_path} ({', '.join(ca.subject.rfc4514_string() for ca in cas)}): "
        "use the ca.pem of the same federation"
    )


def _check_eku(cert: x509.Certificate, path: Path, role: Role) -> None:
    wanted = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    label = "serverAuth" if role == "server" else "clientAuth"
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if wanted not in usages:
        hint = "a coordinator certificate (`pluralfed certs server`)"
        if role == "client":
            hint = "a node certificate (`pluralfed certs node`)"
        raise InputError(
            f"certificate {path} lacks ExtendedKeyUsage {label}: a {role} needs {hint}"
        )


def _warn_key_permissions(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "private key %s is readable by group/others (mode %o); run: chmod 600 %s",
            path,
            mode,
            path,
        )


@dataclass(frozen=True)
class _Material:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate


def _load_validated(cert: PathLike, key: PathLike, ca: PathLike, role: Role) -> _Material:
    cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
    ca_pem = _read(ca_path, "CA certificate")
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    cas = _parse_certs(ca_pem, ca_path, "CA certificate")
    leaf = _parse_certs(cert_pem, cert_path, "certificate")[0]
    private_key = _parse_key(key_pem, key_path)
    _warn_key_permissions(key_path)
    _check_key_matches(leaf, private_key, cert_path, key_path)
    for ca_cert in cas:
        _check_is_ca(ca_cert, ca_path)
    _check_chain(leaf, cas, cert_path, ca_path)
    _check_current(leaf, cert_path, "certificate")
    for ca_cert in cas:
        _check_current(ca_cert, ca_path, "CA certificate")
    _check_eku(leaf, cert_path, role)
    return _Material(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, cert=leaf)


def load_server_credentials(cert: PathLike, key: PathLike, ca: PathLike) -> grpc.ServerCredentials:
    """Validated mutual-TLS credentials for the coordinator: clients must present a certificate issued
    by `ca` (require_client_auth), or the handshake fails before any handler runs."""
    material = _load_validated(cert, key, ca, "server")
    return grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_pem)],
        root_certificates=material.ca_pem,
        require_client_auth=True,
    )


def load_channel_credentials(
    cert: PathLike, key: PathLike, ca: PathLike
) -> grpc.ChannelCredentials:
    """Validated credentials for a group node: trusts only `ca` for the server, presents the node cert."""
    material = _load_validated(cert, key, ca, "client")
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_pem,
    )


def channel_options(server_name_override: str | None = None) -> list[tuple[str, str]]:
    """gRPC channel options to verify the server certificate against `server_name_override` instead of
    the host in the target (e.g. dialing an IP whose certificate only names a DNS host)."""
    if not server_name_override:
        return []
    return [(TARGET_NAME_OVERRIDE_OPTION, server_name_override)]


def secure_channel(
    target: str,
    files: TlsFiles,
    *,
    server_name_override: str | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A mutual-TLS channel to the coordinator from a node's `TlsFiles`."""
    return grpc.secure_channel(
        target,
        files.channel_credentials(),
        options=[*channel_options(server_name_override), *options],
    )


def http_proxy_for(host: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The HTTP proxy gRPC itself would use to reach `host`, as its URL, or None.

    gRPC reads grpc_proxy, then https_proxy, then http_proxy, and skips hosts listed in
    no_grpc_proxy or no_proxy (names, domain suffixes, or `*`); the node's own certificate check
    must take the same path as its gRPC connection."""
    env = os.environ if environ is None else environ

    def get(*names: str) -> str:
        for name in names:
            value = env.get(name) or env.get(name.upper())
            if value:
                return value.strip()
        return ""

    proxy = get("grpc_proxy", "https_proxy", "http_proxy")
    if not proxy:
        return None
    bypass = get("no_grpc_proxy", "no_proxy")
    name = host.strip("[]").lower()
    for entry in (e.strip().lower() for e in bypass.split(",")):
        if entry == "*" or (
            entry and (name == entry.lstrip(".") or name.endswith("." + entry.lstrip(".")))
        ):
            return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to host:port, through an HTTP CONNECT tunnel when gRPC would use a
    proxy for it (`http_proxy_for`)."""
    proxy = http_proxy_for(host)
    if proxy is None:
        return socket.create_connection((host, port), timeout=timeout_s)
    url = urllib.parse.urlsplit(proxy)
    if url.scheme != "http" or not url.hostname:
        raise OSError(f"proxy {proxy!r}: only http:// proxies are supported")
    sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout_s)
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if url.username is not None:
            credentials = f"{urllib.parse.unquote(url.username)}:"
            credentials += urllib.parse.unquote(url.password or "")
            token = base64.b64encode(credentials.encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            part = sock.recv(4096)
            if not part or len(reply) > 16384:
                raise OSError(f"proxy {url.hostname}:{url.port}: no answer to CONNECT")
            reply += part
        status = reply.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] != ["200"]:
            raise OSError(f"proxy {url.hostname}:{url.port} refused CONNECT {target}: {status}")
        return sock
    except BaseException:
        sock.close()
        raise


class ServerCheckFailed(OSError):
    """The TLS handshake that checks the server's certificate did not complete: until it does,
    the server counts as unreachable (failing open would let anyone who can reset that one
    connection past the check)."""


def revocation_check_context(files: TlsFiles) -> ssl.SSLContext:
    """The TLS client context of `check_server_not_revoked` (the node's CA, certificate and
    key), built once when the node starts, as gRPC reads its files once: a file rotated or
    removed while the node runs then breaks neither."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        raise InputError(
            f"cannot load {files.ca}, {files.cert} and {files.key} for the revocation check: {err}"
        ) from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


def check_server_not_revoked(
    address: str,
    files: TlsFiles | ssl.SSLContext,
    revocations: RevocationList,
    *,
    server_name: str | None = None,
    timeout_s: float = 10.0,
) -> int:
    """The server's certificate serial, checked against the CA's revocation list.

    gRPC's Python client takes no CRL and never shows the server's certificate, so the node
    makes a TLS handshake of its own (Python's ssl: the same CA, client certificate and expected
    name, the same HTTP proxy) and looks the certificate's serial up in the list. Raises
    InputError for a revoked certificate, ServerCheckFailed when the handshake cannot complete.
    `files` may be the context `revocation_check_context` made of them.

    Limit: this handshake is not the connection gRPC then makes. Someone on the network path
    who holds the revoked certificate's key can let this check reach the real coordinator and
    answer gRPC's own connection himself. The check stops a revoked coordinator at the address
    the node dials, not such an active attacker; against one, re-issue the federation's CA.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = files if isinstance(files, ssl.SSLContext) else revocation_check_context(files)
    try:
        with (
            _connect(host, int(port), timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name or host) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
    except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
        raise ServerCheckFailed(
            f"cannot check the certificate of the coordinator at {address}: {err}"
        ) from None
    if der is None:
        raise ServerCheckFailed(f"the coordinator at {address} showed no certificate")
    serial = x509.load_der_x509_certificate(der).serial_number
    if revocations.is_revoked(serial):
        raise InputError(
            f"the coordinator at {address} presents a certificate that the CA has revoked "
            f"(serial {serial:x}, in {revocations.path}): refusing to connect to it"
        )
    return serial


# --------------------------------------------------------------------------------------------------
# identity on the server side


def _values(auth_context: Mapping[str, Iterable[bytes]], key: str) -> list[str]:
    out = []
    for raw in auth_context.get(key, ()) or ():
        try:
            out.append(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
        except UnicodeDecodeError:
            continue
    return out


def identity_from_auth_context(
    auth_context: Mapping[str, Iterable[bytes]], *, allow_common_name: bool = False
) -> str | None:
    """The node id a verified client certificate proves, from gRPC's ``context.auth_context()``.

    Only a TLS peer counts. The identity is the ``pluralfed://node/<id>`` URI SAN (only node
    certificates carry it), read from the certificate itself: a DNS or e-mail SAN that spells the
    same text is not an identity (gRPC lists every kind of SAN together). Exactly one distinct
    such SAN is required. With `allow_common_name`, a certificate without it falls back to its
    subject CN (for externally issued node certificates). Returns None when there is no usable
    identity.
    """
    if "ssl" not in _values(auth_context, "transport_security_type"):
        return None
    cert = peer_certificate(auth_context)
    uris = _uri_sans(cert) if cert is not None else tuple(_values(auth_context, "peer_uri"))
    ids = {uri[len(NODE_URI_PREFIX) :] for uri in uris if uri.startswith(NODE_URI_PREFIX)}
    if len(ids) > 1:
        log.warning("client certificate carries several node identities %s; refusing", sorted(ids))
        return None
    if ids:
        (node_id,) = ids
        return node_id if NODE_ID_PATTERN.fullmatch(node_id) else None
    if allow_common_name:
        names = set(_values(auth_context, "x509_common_name"))
        if len(names) == 1:
            (name,) = names
            return name if NODE_ID_PATTERN.fullmatch(name) else None
    return None


def peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> x509.Certificate | None:
    """The verified client certificate (gRPC's ``x509_pem_cert``), or None."""
    pems = auth_context.get("x509_pem_cert") or ()
    for pem in pems:
        return _certificate_of_pem(bytes(pem))
    return None


def peer_serial(auth_context: Mapping[str, Iterable[bytes]]) -> int | None:
    """The serial number of the verified client certificate, or None."""
    cert = peer_certificate(auth_context)
    return None if cert is None else cert.serial_number


@functools.lru_cache(maxsize=1024)
def _certificate_of_pem(pem: bytes) -> x509.Certificate | None:
    # every call of a connection brings the same certificate: parse it once
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def _uri_sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    return tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))


# --------------------------------------------------------------------------------------------------
# inspection


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, colon-separated hex (as `openssl x509 -fingerprint -sha256`)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _san_strings(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in sans:
        if isinstance(name, x509.DNSName):
            out.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"IP:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            out.append(f"URI:{name.value}")
        else:
            out.append(f"{type(name).__name__}:{name.value}")
    return out


def describe_certificate(path: PathLike) -> str:
    """Human-readable summary of every certificate in a PEM file (for `pluralfed certs show`),
    or of a revocation list (`crl.pem`)."""
    p = Path(path)
    data = _read(p, "certificate")
    if b"-----BEGIN X509 CRL-----" in data:
        return _describe_crl(_parse_crl(data, p), p)
    certs = _parse_certs(data, p, "certificate")
    now = _now()
    blocks = []
    for cert in certs:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        status = "valid" if start <= now <= end else ("NOT YET VALID" if now < start else "EXPIRED")
        try:
            ekus = [
                getattr(oid, "_name", oid.dotted_string)
                for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            ]
        except x509.ExtensionNotFound:
            ekus = []
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        node_ids = [
            s[len("URI:" + NODE_URI_PREFIX) :]
            for s in _san_strings(cert)
            if s.startswith("URI:" + NODE_URI_PREFIX)
        ]
        lines = [
            f"file:        {p}",
            f"subject:     {cert.subject.rfc4514_string()}",
            f"issuer:      {cert.issuer.rfc4514_string()}",
            f"serial:      {cert.serial_number:x}",
            f"CA:          {'yes' if is_ca else 'no'}",
            f"SANs:        {', '.join(_san_strings(cert)) or '(none)'}",
            f"key usage:   {', '.join(ekus) or '(any)'}",
            f"node id:     {', '.join(node_ids) or '(none)'}",
            f"not before:  {_fmt(start)}",
            f"not after:   {_fmt(end)}",
            f"status:      {status}",
            f"SHA-256:     {fingerprint(cert)}",
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _describe_crl(crl: x509.CertificateRevocationList, path: Path) -> str:
    next_update = crl.next_update_utc
    overdue = next_update is not None and _now() > next_update
    lines = [
        f"file:        {path}",
        "kind:        revocation list (CRL)",
        f"issuer:      {crl.issuer.rfc4514_string()}",
        f"this update: {_fmt(crl.last_update_utc)}",
        f"next update: {_fmt(next_update) if next_update else '(none)'}"
        + ("  OVERDUE: renew with `pluralfed certs revoke --ca DIR`" if overdue else ""),
        f"revoked:     {len(crl)}",
    ]
    for entry in sorted(crl, key=lambda e: e.revocation_date_utc):
        lines.append(f"  serial {entry.serial_number:x}  since {_fmt(entry.revocation_date_utc)}")
    return "\n".join(lines)


def resolve_tls_files(
    who: str, tls_dir: Path | None, ca: Path | None, cert: Path | None, key: Path | None
) -> TlsFiles:
    """A service's TLS files from a folder (ca.pem, cert.pem, key.pem), single paths overriding."""
    base = TlsFiles.from_dir(tls_dir) if tls_dir is not None else None
    ca = ca or (base.ca if base else None)
    cert = cert or (base.cert if base else None)
    key = key or (base.key if base else None)
    if ca is None or cert is None or key is None:
        raise InputError(
            f"{who} config: mutual TLS needs tls_dir (with ca.pem, cert.pem, key.pem) or "
            "tls_ca, tls_cert and tls_key; plain text only with insecure = true"
        )
    return TlsFiles(ca=ca, cert=cert, key=key)
