"""Making a federation's TLS material, the operator's side (`pluralfed certs`): a private CA, the
coordinator's server certificate, node certificates and the CA's revocation list. The services only
read it, with `pluralfed.tls`, which never imports this module.

Certificate layout (EC P-256 keys, SHA-256 signatures):

* CA: ``CN=<ca name>``, BasicConstraints CA:true pathlen 0, KeyUsage keyCertSign+cRLSign.
* Coordinator: ``CN=<name>``, SubjectAltName = the given DNS names / IP addresses (the names clients dial),
  ExtendedKeyUsage serverAuth.
* Node: ``CN=<node_id>`` and SubjectAltName ``URI:pluralfed://node/<node_id>``, ExtendedKeyUsage clientAuth.
  The URI SAN is the identity the coordinator trusts (see `pluralfed.tls`); the CN repeats the id for
  humans and for tools that only show the subject.

Files: a CA directory holds ``ca.pem`` + ``ca.key``; every party's directory holds ``ca.pem`` (the CA
certificate, to verify the peer), ``cert.pem`` and ``key.pem`` (mode 0600). The CA key never leaves the CA
directory.

Revocation: the CA keeps a CRL it signs, ``crl.pem`` in its directory (`revoke_certificates`), re-signed
whole on every change; servers read and verify it with `pluralfed.tls.load_revocation_list`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pluralfed.errors import InputError
from pluralfed.tls import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_FILE,
    CRL_FILE,
    KEY_FILE,
    NODE_URI_PREFIX,
    PathLike,
    RevocationList,
    TlsFiles,
    check_chain,
    check_crl,
    check_current,
    check_is_ca,
    check_key_matches,
    format_time,
    load_revocation_list,
    node_uri,
    parse_certs,
    parse_crl,
    parse_key,
    read_file,
    utc_now,
    validate_node_id,
)

log = logging.getLogger(__name__)

_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_PATTERN = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")

# Issued certificates start a little in the past so a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CaFiles:
    """A CA directory: its certificate (to distribute) and its key (to keep)."""

    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: PathLike) -> CaFiles:
        d = Path(directory)
        return cls(cert=d / CA_CERT_FILE, key=d / CA_KEY_FILE)


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


def check_no_ca_replaced(ca_dir: PathLike, force: bool, add_nodes: str | None = None) -> None:
    """Refuse to replace an existing CA unless forced, saying what to run instead: a new CA
    silently breaks every certificate the old one issued, which a bare "use --force" invites.
    `add_nodes` is the command that adds nodes under this CA (default: `certs node`'s form)."""
    files = CaFiles.from_dir(ca_dir)
    present = [str(p) for p in (files.cert, files.key) if p.exists()]
    if force or not present:
        return
    add_nodes = add_nodes or f"pluralfed certs node --ca {Path(ca_dir)} --out DIR --id NEW_ID"
    raise InputError(
        f"{Path(ca_dir)} already holds a CA ({', '.join(present)}); refusing to overwrite it. "
        f"To add nodes under it: {add_nodes}. --force would make a NEW CA: every certificate "
        "issued so far (the coordinator's and every node's) would stop working until each party "
        "has new files"
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


# the last moment a certificate or CRL date can name (GeneralizedTime and `datetime` both end here)
LAST_DATE = dt.datetime.max.replace(tzinfo=dt.UTC)


def days_problem(days: int) -> str | None:
    """What is wrong with `days` of validity from now, or None: at least 1, and ending by
    9999-12-31, the last date a certificate can hold."""
    if days < 1:
        return f"must be at least 1, got {days}"
    latest = (LAST_DATE - utc_now()).days
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
    start = _aware(not_before) if not_before is not None else utc_now() - CLOCK_SKEW
    end = (
        _aware(not_after)
        if not_after is not None
        else _days_after(utc_now(), days, "validity: days")
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
    check_no_ca_replaced(out_dir, force)
    replacing = files.key.exists()
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
    if replacing:
        log.warning(
            "replaced the CA in %s (--force): certificates the old CA issued no longer work; "
            "give every party its new files",
            out_dir,
        )
    log.debug("created CA %r in %s (valid until %s)", common_name, out_dir, format_time(end))
    return files


def _load_ca(ca_dir: PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    files = CaFiles.from_dir(ca_dir)
    if not files.key.is_file():
        raise InputError(
            f"CA key not found at {files.key}: pass the directory made by `pluralfed certs init` "
            "(the CA key is kept only there)"
        )
    cert_pem = read_file(files.cert, "CA certificate")
    certs = parse_certs(cert_pem, files.cert, "CA certificate")
    cert = certs[0]
    key = parse_key(read_file(files.key, "CA key"), files.key)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{files.key}: CA key is not an EC key")
    check_key_matches(cert, key, files.cert, files.key)
    check_is_ca(cert, files.cert)
    check_current(cert, files.cert, "CA certificate")
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
            format_time(ca_cert.not_valid_after_utc),
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
# revocation: the CA signs the list the services check


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
        old = parse_crl(read_file(crl_path, "revocation list"), crl_path)
        check_crl(old, [ca_cert], crl_path, files.cert)
        revoked = {r.serial_number: r.revocation_date_utc for r in old}
    wanted = list(serials)
    for cert_path in certs:
        p = Path(cert_path)
        cert = parse_certs(read_file(p, "certificate"), p, "certificate")[0]
        check_chain(cert, [ca_cert], p, files.cert)
        wanted.append(cert.serial_number)
    now = utc_now()
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


@dataclass(frozen=True)
class CaView:
    """A CA folder as `certs show --ca` reads it: the CA certificate and its revocation list.

    `revocations` is None when they are unknown: a folder with the CA certificate but neither
    the CA key nor crl.pem (a copy of ca.pem) cannot say whether the CA revoked anything, and
    an empty list there would call a revoked certificate valid."""

    folder: Path
    cert: x509.Certificate
    revocations: RevocationList | None

    @classmethod
    def open(cls, directory: PathLike) -> CaView:
        """The CA of `directory`; refuses a node's or the coordinator's folder, which holds a
        copy of ca.pem but never the CA's crl.pem."""
        d = Path(directory)
        ca_path = d / CA_CERT_FILE
        if not ca_path.is_file():
            raise InputError(f"{d}: not a CA folder (no {CA_CERT_FILE})")
        has_ca_key = (d / CA_KEY_FILE).exists()
        party_files = [name for name in (CERT_FILE, KEY_FILE) if (d / name).exists()]
        if party_files and not has_ca_key:
            raise InputError(
                f"{d}: a node's or the coordinator's folder (it holds {', '.join(party_files)}), "
                f"not the CA's: its {CA_CERT_FILE} is a copy, without the CA's revocation list; "
                f"pass the CA folder (the one with {CA_KEY_FILE} and {CRL_FILE}, e.g. pki/ca)"
            )
        cert = parse_certs(read_file(ca_path, "CA certificate"), ca_path, "CA certificate")[0]
        crl = d / CRL_FILE
        revocations: RevocationList | None = None
        if crl.exists():
            revocations = load_revocation_list(crl, ca_path)
        elif has_ca_key:  # `certs revoke` writes crl.pem next to the key: none, nothing revoked
            revocations = RevocationList(crl, frozenset(), utc_now(), None)
        return cls(d, cert, revocations)

    def note(self) -> str:
        """One line on the revocation list this view reads, for the top of `certs show`."""
        crl = self.folder / CRL_FILE
        if self.revocations is None:
            return (
                f"(no {crl} and no {CA_KEY_FILE} here: revocations unknown; pass the CA folder "
                f"that `pluralfed certs revoke` writes {CRL_FILE} in)"
            )
        if crl.exists():
            return f"(revocation list: {crl})"
        return f"(no {crl}: this CA has revoked no certificate)"

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed `cert` (a serial means nothing under another CA)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


def describe_certificate(path: PathLike, ca: CaView | None = None) -> str:
    """Human-readable summary of every certificate in a PEM file (for `pluralfed certs show`),
    or of a revocation list (`crl.pem`). With `ca` (the CA folder), the status says whether
    that CA issued the certificate and revoked it; without, it speaks of the dates only."""
    p = Path(path)
    data = read_file(p, "certificate")
    if b"-----BEGIN X509 CRL-----" in data:
        return _describe_crl(parse_crl(data, p), p)
    certs = parse_certs(data, p, "certificate")
    now = utc_now()
    blocks = []
    for cert in certs:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        status = "valid" if start <= now <= end else ("NOT YET VALID" if now < start else "EXPIRED")
        if ca is None:
            status += " (dates only: revocation not checked, see --ca)"
        elif not ca.issued(cert):
            status = f"NOT ISSUED by the CA of {ca.folder}"
        elif ca.revocations is None:
            status += f" (revocation unknown: no {CRL_FILE} in {ca.folder})"
        elif ca.revocations.is_revoked(cert.serial_number):
            status = f"REVOKED (in {ca.revocations.path})"
        else:
            status += f" (not revoked in {ca.folder})"
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
            f"not before:  {format_time(start)}",
            f"not after:   {format_time(end)}",
            f"status:      {status}",
            f"SHA-256:     {fingerprint(cert)}",
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _describe_crl(crl: x509.CertificateRevocationList, path: Path) -> str:
    next_update = crl.next_update_utc
    overdue = next_update is not None and utc_now() > next_update
    lines = [
        f"file:        {path}",
        "kind:        revocation list (CRL)",
        f"issuer:      {crl.issuer.rfc4514_string()}",
        f"this update: {format_time(crl.last_update_utc)}",
        f"next update: {format_time(next_update) if next_update else '(none)'}"
        + ("  OVERDUE: renew with `pluralfed certs revoke --ca DIR`" if overdue else ""),
        f"revoked:     {len(crl)}",
    ]
    for entry in sorted(crl, key=lambda e: e.revocation_date_utc):
        lines.append(
            f"  serial {entry.serial_number:x}  since {format_time(entry.revocation_date_utc)}"
        )
    return "\n".join(lines)
