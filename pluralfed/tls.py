"""Runtime TLS of a federation: what the coordinator, the nodes and the reward service do with their
certificates (load and check them, open mutual-TLS channels, check revocation lists, learn who a peer
is). Making the certificates is the operator's job, in `pluralfed.pki`.

Identity model (like OpenFL): every group node holds a certificate issued by the federation's CA; the
coordinator requires it in the TLS handshake (mutual TLS) and maps the certificate's identity to a node
name through its allow-list (`pluralfed.auth.AllowList`). The identity is the URI SAN
``pluralfed://node/<node_id>`` (`node_uri`): only node certificates carry it, so no other certificate
of the same CA can be taken for a node (gRPC's TLS also rejects a client certificate without
clientAuth in the handshake; the URI is defence in depth).

Revocation: gRPC's Python API takes no CRL, so servers check the CA's list themselves, call by call, by
the serial number of the verified client certificate (`load_revocation_list`, `peer_serial`;
`pluralfed.auth.RevocationWatch`); a node checks the coordinator's in a handshake of its own
(`checked_server_certificate`) and then has gRPC trust only that certificate
(`client_credentials(pinned=...)`), so the check and gRPC's connection reach the same server.

Connecting by IP address when the coordinator's certificate only names a DNS host: either issue the
server certificate with the IP as a SAN (``--san 10.0.0.5``; preferred), or have the client check the
certificate against the DNS name with the channel option ``grpc.ssl_target_name_override`` (see
`channel_options` / `secure_channel`: ``secure_channel("10.0.0.5:50051", files,
server_name_override="coordinator.example.org")``).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import logging
import os
import re
import socket
import ssl
import stat
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from pluralfed.errors import InputError
from pluralfed.fsutil import in_container

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CRL_FILE = "crl.pem"  # in the CA folder: the certificates the CA has revoked

NODE_URI_PREFIX = "pluralfed://node/"
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

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


# --------------------------------------------------------------------------------------------------
# identities


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


def node_uri(node_id: str) -> str:
    return f"{NODE_URI_PREFIX}{node_id}"


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


def parse_crl(data: bytes, path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        raise InputError(
            f"revocation list {path}: not a PEM CRL (no valid X509 CRL block); "
            "make it with `pluralfed certs revoke`"
        ) from None


def check_crl(
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
    crl = parse_crl(read_file(crl_file, "revocation list"), crl_file)
    cas = parse_certs(read_file(ca_file, "CA certificate"), ca_file, "CA certificate")
    check_crl(crl, cas, crl_file, ca_file)
    if in_force is not None and crl.last_update_utc < in_force.this_update:
        raise InputError(
            f"revocation list {crl_file} was signed {format_time(crl.last_update_utc)}, before the one "
            f"in force ({format_time(in_force.this_update)}): an older list is not taken back"
        )
    next_update = crl.next_update_utc
    if next_update is not None and utc_now() > next_update:
        log.warning(
            "revocation list %s was due for renewal on %s; still enforced. Renew it with "
            "`pluralfed certs revoke --ca DIR` (no certificate: re-signs the same list)",
            crl_file,
            format_time(next_update),
        )
    return RevocationList(
        path=crl_file,
        serials=frozenset(r.serial_number for r in crl),
        this_update=crl.last_update_utc,
        next_update=next_update,
    )


# --------------------------------------------------------------------------------------------------
# loading and validating


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_file(path: Path, what: str) -> bytes:
    shown = shown_path(path)
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


def shown_path(path: Path) -> str:
    """`path` as a message shows it: a relative one with the folder it is relative to (a
    container's or a service's working folder is often not the one the operator thinks)."""
    if path.is_absolute():
        return str(path)
    try:
        return f"{path} (relative to {Path.cwd()})"
    except OSError:  # the working folder was removed under the process
        return f"{path} (relative to a working folder that no longer exists)"


def parse_certs(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InputError(
            f"{what} file {path}: not a PEM certificate (no valid CERTIFICATE block)"
        ) from None
    if not certs:
        raise InputError(f"{what} file {path}: contains no certificate")
    return certs


def parse_key(data: bytes, path: Path) -> PrivateKeyTypes:
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


def check_key_matches(
    cert: x509.Certificate, key: PrivateKeyTypes, cert_path: Path, key_path: Path
) -> None:
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise InputError(
            f"private key {key_path} does not match the certificate {cert_path} "
            "(they were not issued together)"
        )


def check_current(
    cert: x509.Certificate, path: Path, what: str, now: dt.datetime | None = None
) -> None:
    now = now or utc_now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise InputError(
            f"{what} {path} is not valid yet: valid from {format_time(start)} until {format_time(end)}, "
            f"now is {format_time(now)} (check the clock)"
        )
    if now > end:
        raise InputError(
            f"{what} {path} has expired: valid from {format_time(start)} until {format_time(end)}, "
            f"now is {format_time(now)} (issue a new one)"
        )
    if end - now < EXPIRY_WARNING:
        log.warning("%s %s expires soon, on %s", what, path, format_time(end))


# KeyUsage bits by attribute of `x509.KeyUsage`, with their RFC 5280 names (as openssl prints them)
_KEY_USAGE_NAMES = {
    "digital_signature": "digitalSignature",
    "content_commitment": "nonRepudiation",
    "key_encipherment": "keyEncipherment",
    "data_encipherment": "dataEncipherment",
    "key_agreement": "keyAgreement",
    "key_cert_sign": "keyCertSign",
    "crl_sign": "cRLSign",
}


def key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    """The certificate's KeyUsage extension, or None when it has none (then TLS allows any use)."""
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def key_usage_names(usage: x509.KeyUsage) -> list[str]:
    """The bits `usage` sets, by their RFC 5280 names."""
    names = [name for attr, name in _KEY_USAGE_NAMES.items() if getattr(usage, attr)]
    if usage.key_agreement:  # the two are only defined (readable) with keyAgreement
        names += [
            name
            for attr, name in (("encipher_only", "encipherOnly"), ("decipher_only", "decipherOnly"))
            if getattr(usage, attr)
        ]
    return names


def check_is_ca(cert: x509.Certificate, path: Path) -> None:
    """A CA certificate must say it is one (BasicConstraints CA:true) and, if it has a KeyUsage,
    allow keyCertSign: BoringSSL and OpenSSL otherwise do not take it as the issuer of anything
    ("unable to get local issuer certificate" in the handshake, which reads as another CA)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InputError(f"CA certificate file {path}: {cert.subject.rfc4514_string()} is not a CA")
    usage = key_usage(cert)
    if usage is not None and not usage.key_cert_sign:
        raise InputError(
            f"CA certificate file {path}: {cert.subject.rfc4514_string()} has KeyUsage "
            f"{', '.join(key_usage_names(usage)) or '(none)'} without keyCertSign, so TLS refuses "
            "every certificate it signed: use a CA certificate whose KeyUsage includes keyCertSign "
            "(`pluralfed certs init` makes one)"
        )


def check_chain(
    cert: x509.Certificate, cas: Sequence[x509.Certificate], cert_path: Path, ca_path: Path
) -> None:
    if any(_signed_by(cert, ca) for ca in cas):
        return
    # two federations' CAs may have the same name (the default one): then say it is another key
    same_name = any(ca.subject == cert.issuer for ca in cas)
    raise InputError(
        f"certificate {cert_path} (issuer {cert.issuer.rfc4514_string()}) was not issued by the CA in "
        f"{ca_path} ({', '.join(ca.subject.rfc4514_string() for ca in cas)}"
        f"{': the same name, but another CA key' if same_name else ''}): "
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


def _check_leaf_key_usage(cert: x509.Certificate, path: Path, role: Role) -> None:
    """A TLS 1.2 or 1.3 handshake (ECDHE only, as gRPC's) signs with the certificate's key, so a
    KeyUsage without digitalSignature makes gRPC refuse it: an EC one when it loads it (the
    coordinator then fails as "port in use", a node as "unreachable"), an RSA one in every
    handshake. Refused here, at load, with the cause. No KeyUsage at all allows any use."""
    usage = key_usage(cert)
    if usage is None or usage.digital_signature:
        return
    made_by = "`pluralfed certs server`" if role == "server" else "`pluralfed certs node`"
    raise InputError(
        f"certificate {path} has KeyUsage {', '.join(key_usage_names(usage)) or '(none)'} "
        f"without digitalSignature, which TLS needs to sign the handshake: a {role} certificate "
        f"needs KeyUsage digitalSignature ({made_by} issues one)"
    )


# (key file, mode) pairs already warned about: a node loads its credentials more than once
# (checked at start, then for its channel), and one warning says it
_warned_key_modes: set[tuple[Path, int]] = set()


def _warn_key_permissions(path: Path) -> None:
    """Warn, once per file and mode, when others than its owner may read a private key; not
    refused, since containers often mount keys with other modes."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077 and (path.absolute(), mode) not in _warned_key_modes:
        _warned_key_modes.add((path.absolute(), mode))
        log.warning(
            "private key %s is readable by group/others (mode %04o); run: chmod 600 %s%s",
            path,
            mode,
            path,
            # the path is the container's, and a mounted key is often read-only there
            " (a path inside this container: chmod the file you mounted there, on the host)"
            if in_container()
            else "",
        )


@dataclass(frozen=True)
class TlsMaterial:
    """TLS files as read and checked: the PEM bytes, and the party's own certificate."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate


def _load_validated(cert: PathLike, key: PathLike, ca: PathLike, role: Role) -> TlsMaterial:
    cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
    ca_pem = read_file(ca_path, "CA certificate")
    cert_pem = read_file(cert_path, "certificate")
    key_pem = read_file(key_path, "private key")
    cas = parse_certs(ca_pem, ca_path, "CA certificate")
    leaf = parse_certs(cert_pem, cert_path, "certificate")[0]
    private_key = parse_key(key_pem, key_path)
    _warn_key_permissions(key_path)
    check_key_matches(leaf, private_key, cert_path, key_path)
    for ca_cert in cas:
        check_is_ca(ca_cert, ca_path)
    check_chain(leaf, cas, cert_path, ca_path)
    check_current(leaf, cert_path, "certificate")
    for ca_cert in cas:
        check_current(ca_cert, ca_path, "CA certificate")
    _check_eku(leaf, cert_path, role)
    _check_leaf_key_usage(leaf, cert_path, role)
    return TlsMaterial(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, cert=leaf)


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
    return client_credentials(_load_validated(cert, key, ca, "client"))


def load_client_material(files: TlsFiles) -> TlsMaterial:
    """A node's certificate, key and CA, checked and read once (gRPC reads them once too)."""
    return _load_validated(files.cert, files.key, files.ca, "client")


def client_credentials(
    material: TlsMaterial, pinned: x509.Certificate | None = None
) -> grpc.ChannelCredentials:
    """A node's channel credentials: trusting the CA, or with `pinned` (a server certificate
    the node has checked itself, against the CA and the revocation list) that certificate
    alone: gRPC takes it as the trust anchor, so no other certificate of the CA, a revoked one
    included, passes the handshake."""
    root = material.ca_pem if pinned is None else pinned.public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
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
    files: TlsFiles | TlsMaterial,
    *,
    server_name_override: str | None = None,
    options: Sequence[tuple[str, object]] = (),
    pinned: x509.Certificate | None = None,
) -> grpc.Channel:
    """A mutual-TLS channel to the coordinator from a node's `TlsFiles` (or their material,
    read before), trusting only the `pinned` server certificate if given (`client_credentials`)."""
    material = load_client_material(files) if isinstance(files, TlsFiles) else files
    return grpc.secure_channel(
        target,
        client_credentials(material, pinned),
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
    """The TLS client context of `checked_server_certificate` (the node's CA, certificate and
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


def presented_certificate(
    address: str, files: TlsFiles, *, server_name: str | None = None, timeout_s: float = 10.0
) -> x509.Certificate:
    """The certificate the server at `address` presents, NOT verified: only to tell an operator
    why it does not verify (another CA, other names, expired), which gRPC's error leaves open.
    Raises OSError (ssl.SSLError included) when no handshake is possible."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # what is shown is never trusted for anything
    ctx.load_cert_chain(str(files.cert), str(files.key))  # a pluralfed server asks for one
    ctx.set_alpn_protocols(["h2"])
    with (
        _connect(host, int(port), timeout_s) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name or host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    if der is None:
        raise OSError(f"the server at {address} showed no certificate")
    return x509.load_der_x509_certificate(der)


def describe_presented_certificate(
    cert: x509.Certificate, ca_path: Path, dialed_name: str
) -> list[str]:
    """Lines setting the certificate a server presents against what this side expects: the
    names it carries against the one dialed, its issuer against the local ca.pem (checked by
    signature: two CAs can share a name), its validity against now."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    listed = [*dns, *ips]
    lines = [
        f"names: {', '.join(listed) or 'none'} "
        f"({'includes' if dialed_name in listed else 'does not include'} {dialed_name})"
    ]
    issuer = cert.issuer.rfc4514_string()
    try:
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
    except (OSError, ValueError):
        cas = []
    signed = [ca for ca in cas if _signed_by(cert, ca)]
    yours = ", ".join(ca.subject.rfc4514_string() for ca in cas) or "unreadable"
    lines.append(
        f"issued by: {issuer}; "
        + (
            f"signed by the CA in {ca_path}"
            if signed
            else f"NOT signed by the CA in {ca_path} ({yours}), even if a name is the same"
        )
    )
    now = dt.datetime.now(dt.UTC)
    until = cert.not_valid_after_utc
    state = (
        "expired"
        if until < now
        else "not valid yet"
        if cert.not_valid_before_utc > now
        else "valid now"
    )
    lines.append(
        f"valid {format_time(cert.not_valid_before_utc)} to {format_time(until)} ({state})"
    )
    return lines


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca`'s key signed `cert` (not just whether the names match)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def checked_server_certificate(
    address: str,
    files: TlsFiles | ssl.SSLContext,
    revocations: RevocationList,
    *,
    server_name: str | None = None,
    timeout_s: float = 10.0,
) -> x509.Certificate:
    """The server's certificate, checked against the CA's revocation list.

    gRPC's Python client takes no CRL and never shows the server's certificate, so the node
    makes a TLS handshake of its own (Python's ssl: the same CA, client certificate and expected
    name, the same HTTP proxy) and looks the certificate's serial up in the list. Raises
    InputError for a revoked certificate, ServerCheckFailed when the handshake cannot complete.
    `files` may be the context `revocation_check_context` made of them.

    This handshake is not the connection gRPC then makes: someone on the network path who holds
    a revoked certificate's key could let it reach the real coordinator and answer gRPC's own
    connection himself. So the node then trusts, for gRPC, only the certificate returned here
    (`load_channel_credentials(pinned=...)`).
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
    cert = x509.load_der_x509_certificate(der)
    serial = cert.serial_number
    if revocations.is_revoked(serial):
        raise InputError(
            f"the coordinator at {address} presents a certificate that the CA has revoked "
            f"(serial {serial:x}, in {revocations.path}): refusing to connect to it"
        )
    return cert


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
