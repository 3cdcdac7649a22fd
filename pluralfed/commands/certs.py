"""`pluralfed certs`: make and inspect the TLS material of a federation (see `pluralfed.pki`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from pluralfed import pki, tls
from pluralfed.errors import InputError

DEFAULT_SANS = ("localhost", "127.0.0.1")

FEDERATION_EPILOG = """\
layout written under --out:
  ca/ca.pem, ca/ca.key            the CA; ca.key never leaves this directory: keep it offline
  coordinator/{ca,cert,key}.pem   give to the coordinator
  nodes/<id>/{ca,cert,key}.pem    give each group node its own directory

The coordinator's allow-list maps each node id to the group it holds, e.g. in TOML:
  [allow_list]
  "node-nigeria" = "Nigeria"

To add a node later: pluralfed certs node --ca DIR/ca --out DIR/nodes --id NEW_ID
To revoke a node's certificate: pluralfed certs revoke --ca DIR/ca --cert DIR/nodes/ID/cert.pem
  (writes DIR/ca/crl.pem; give it to the coordinator as [tls] crl)
"""


def _split(values: Iterable[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists: `--san a --san b,c`."""
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            part = part.strip()
            if part:
                out.append(part)
    return out


def _node_ids(values: Iterable[str], option: str) -> list[str]:
    ids = []
    for node_id in values:
        tls.validate_node_id(node_id, where=option)
        if node_id in ids:
            raise InputError(f"{option}: node id {node_id!r} given twice")
        ids.append(node_id)
    if not ids:
        raise InputError(f"{option}: give at least one node id")
    return ids


def _days(text: str) -> int:
    """A --days value: a whole number of days, at least 1 and ending by 9999-12-31
    (`pki.check_days`), refused while parsing, before anything is written."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    problem = pki.days_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _print_files(label: str, files: tls.TlsFiles | pki.CaFiles) -> None:
    if isinstance(files, pki.CaFiles):
        print(f"{label}: {files.cert} (distribute), {files.key} (keep secret)")
    else:
        print(f"{label}: {files.cert}, {files.key} (0600), {files.ca}")


def run_init(args: argparse.Namespace) -> int:
    files = pki.create_ca(args.out, common_name=args.ca_name, days=args.days, force=args.force)
    _print_files("CA", files)
    return 0


def run_server(args: argparse.Namespace) -> int:
    sans = _split(args.san) or list(DEFAULT_SANS)
    files = pki.issue_server_cert(
        args.ca, args.out, args.name, sans, days=args.days, force=args.force
    )
    _print_files(f"server {args.name!r} [{', '.join(sans)}]", files)
    return 0


def run_node(args: argparse.Namespace) -> int:
    ids = _node_ids([*(args.id or []), *_split(args.ids)], "--id/--ids")
    out = Path(args.out)
    targets = [out / i / name for i in ids for name in (tls.CERT_FILE, tls.KEY_FILE)]
    pki.check_no_overwrite(targets, args.force)  # all or nothing
    for node_id in ids:
        files = pki.issue_node_cert(
            args.ca, out / node_id, node_id, days=args.days, force=args.force
        )
        _print_files(f"node {node_id!r}", files)
    return 0


def _print_to_reader(text: str) -> int:
    """Print `text` and flush; a reader that stops early (`certs show ... | head`) ends the
    command quietly with SIGPIPE's exit status, as other tools end, not in a traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: send that to /dev/null, or it fails there too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return 0


def run_show(args: argparse.Namespace) -> int:
    blocks = []
    ca = None
    if args.ca is not None:
        ca = pki.CaView.open(args.ca)  # refuses a folder that is not a CA's
        blocks.append(ca.note())
    blocks.append("\n\n".join(pki.describe_certificate(path, ca) for path in args.files))
    return _print_to_reader("\n".join(blocks))


def run_revoke(args: argparse.Namespace) -> int:
    serials = [pki.parse_serial(text) for text in _split(args.serial)]
    crl, added = pki.revoke_certificates(args.ca, args.cert or [], serials, days=args.days)
    total = len(tls.load_revocation_list(crl, Path(args.ca) / tls.CA_CERT_FILE).serials)
    for serial in added:
        print(f"revoked: serial {serial:x}")
    if not added:
        print("nothing new to revoke" if args.cert or serials else "revocation list re-signed")
    print(
        f"revocation list: {crl} ({total} revoked, valid {args.days} days). Give it to the "
        "coordinator ([tls] crl in its config); a running coordinator re-reads it within a second."
    )
    return 0


def run_federation(args: argparse.Namespace) -> int:
    ids = _node_ids(_split(args.nodes), "--nodes")
    sans = _split(args.san) or list(DEFAULT_SANS)
    for san in sans:
        pki.parse_san(san)  # fail before writing anything
    tls.validate_node_id(args.server_name, where="--server-name")
    pki.check_days(args.ca_days, "--ca-days")
    pki.check_days(args.days, "--days")
    out = Path(args.out)
    ca_dir, server_dir, nodes_dir = out / "ca", out / "coordinator", out / "nodes"
    new_ids = ",".join(i for i in ids if not (nodes_dir / i / tls.CERT_FILE).exists())
    add_nodes = f"pluralfed certs node --ca {ca_dir} --out {nodes_dir} --ids {new_ids or 'NEW_ID'}"
    pki.check_no_ca_replaced(ca_dir, args.force, add_nodes)  # before the generic refusal
    party_dirs = [server_dir, *(nodes_dir / i for i in ids)]
    targets = [ca_dir / tls.CA_CERT_FILE, ca_dir / tls.CA_KEY_FILE]
    targets += [d / f for d in party_dirs for f in (tls.CA_CERT_FILE, tls.CERT_FILE, tls.KEY_FILE)]
    pki.check_no_overwrite(targets, args.force)
    for directory in (out, ca_dir, nodes_dir, *party_dirs):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _print_files(
        "CA",
        pki.create_ca(ca_dir, common_name=args.ca_name, days=args.ca_days, force=args.force),
    )
    server = pki.issue_server_cert(
        ca_dir, server_dir, args.server_name, sans, days=args.days, force=args.force
    )
    _print_files(f"coordinator [{', '.join(sans)}]", server)
    for node_id in ids:
        node = pki.issue_node_cert(
            ca_dir, nodes_dir / node_id, node_id, days=args.days, force=args.force
        )
        _print_files(f"node {node_id!r}", node)
    return 0


REPLACES_CA = (
    "; over an existing CA this makes a NEW CA, and every certificate the old one issued stops "
    "working"
)


def _add_common(
    parser: argparse.ArgumentParser, days: int, what: str, force_note: str = ""
) -> None:
    parser.add_argument(
        "--days",
        type=_days,
        default=days,
        help=f"validity of the {what} in days (default {days})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing certificates and keys (default: refuse to overwrite anything)"
        + force_note,
    )


def _add_san(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="DNS name or IP address clients dial to reach the coordinator; repeatable or "
        f"comma-separated (default: {', '.join(DEFAULT_SANS)})",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="create and inspect TLS certificates (CA, coordinator, nodes)",
        description="Create the TLS material of a federation: one private CA, a server certificate "
        "for the coordinator and one client certificate per group node (mutual TLS). Keys are "
        "EC P-256, written with mode 0600; existing keys are never overwritten without --force.",
    )
    sub = parser.add_subparsers(dest="certs_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "init",
        help="create a CA (ca.pem + ca.key)",
        description="Create the federation's certificate authority in --out: ca.pem (give to every "
        "party) and ca.key (keep secret; it signs every certificate).",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the CA")
    p.add_argument(
        "--ca-name",
        default="pluralfed CA",
        metavar="NAME",
        help="Common Name of the CA (default: 'pluralfed CA')",
    )
    _add_common(p, 3650, "CA", REPLACES_CA)
    p.set_defaults(func=run_init)

    p = sub.add_parser(
        "server",
        help="issue the coordinator's server certificate",
        description="Issue the coordinator's certificate (serverAuth) into --out as cert.pem, "
        "key.pem and a copy of ca.pem. Clients check the address they dial against the SANs.",
    )
    p.add_argument(
        "--ca", required=True, type=Path, metavar="DIR", help="CA directory (from `certs init`)"
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="directory for the server files"
    )
    p.add_argument(
        "--name",
        default="coordinator",
        help="Common Name of the server certificate (default: coordinator)",
    )
    _add_san(p)
    _add_common(p, 825, "certificate")
    p.set_defaults(func=run_server)

    p = sub.add_parser(
        "node",
        help="issue group-node client certificates",
        description="Issue one client certificate (clientAuth) per node id into --out/<id>/ as "
        "cert.pem, key.pem and a copy of ca.pem. The certificate's identity is "
        "URI:pluralfed://node/<id> (also its CN); list the id in the coordinator's allow-list.",
    )
    p.add_argument(
        "--ca", required=True, type=Path, metavar="DIR", help="CA directory (from `certs init`)"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="parent directory: each node's files go to DIR/<id>/",
    )
    p.add_argument(
        "--id",
        action="append",
        metavar="NODE_ID",
        help="node id (1-64 characters from A-Z a-z 0-9 . _ -); repeatable",
    )
    p.add_argument("--ids", action="append", metavar="A,B,C", help="comma-separated node ids")
    _add_common(p, 825, "certificates")
    p.set_defaults(func=run_node)

    p = sub.add_parser(
        "show",
        help="print a certificate's subject, SANs, validity and fingerprint (or a CRL's entries)",
        description="Print subject, issuer, SANs, key usage, node id, validity and SHA-256 "
        "fingerprint of every certificate in the given PEM files; for a revocation list "
        "(crl.pem), its issuer, dates and revoked serials.",
    )
    p.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="PEM certificate or CRL file"
    )
    p.add_argument(
        "--ca",
        type=Path,
        help="the CA folder (ca.pem, crl.pem): also say whether this CA issued each "
        "certificate and whether its revocation list revokes it (without it the status speaks "
        "of the dates only)",
    )
    p.set_defaults(func=run_show)

    p = sub.add_parser(
        "revoke",
        help="revoke node certificates: write the CA's signed revocation list (crl.pem)",
        description="Add certificates to the CA's revocation list DIR/crl.pem and sign it again "
        "(a lost or stolen node key: revoke its certificate, then issue the node a new one under "
        "the same id). The coordinator refuses every certificate in the list, even if its id is "
        "allow-listed. With no certificate given, the list is only re-signed (renewed).",
    )
    p.add_argument(
        "--ca", required=True, type=Path, metavar="DIR", help="CA directory (from `certs init`)"
    )
    p.add_argument(
        "--cert",
        action="append",
        type=Path,
        metavar="FILE",
        help="certificate to revoke (must be from this CA); repeatable",
    )
    p.add_argument(
        "--serial",
        action="append",
        metavar="HEX",
        help="serial number to revoke, as `certs show` prints it (when the file is gone); "
        "repeatable or comma-separated",
    )
    p.add_argument(
        "--days",
        type=_days,
        default=30,
        help="days until the list is due for renewal (default 30); a coordinator keeps "
        "enforcing an overdue list and warns",
    )
    p.set_defaults(func=run_revoke)

    p = sub.add_parser(
        "federation",
        help="make a CA, the coordinator's and every node's certificates in one go",
        description="Create a complete federation's TLS material under --out.",
        epilog=FEDERATION_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--nodes",
        required=True,
        action="append",
        metavar="ID1,ID2,...",
        help="comma-separated node ids (repeatable)",
    )
    _add_san(p)
    p.add_argument(
        "--ca-name",
        default="pluralfed CA",
        metavar="NAME",
        help="Common Name of the CA (default: 'pluralfed CA')",
    )
    p.add_argument(
        "--server-name",
        default="coordinator",
        metavar="NAME",
        help="Common Name of the coordinator's certificate (default: coordinator)",
    )
    p.add_argument(
        "--ca-days",
        type=_days,
        default=3650,
        help="validity of the CA in days (default 3650)",
    )
    _add_common(p, 825, "coordinator and node certificates", REPLACES_CA)
    p.set_defaults(func=run_federation)
