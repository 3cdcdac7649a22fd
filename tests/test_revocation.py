"""Certificate revocation: the CA's signed list (`pluralfed certs revoke`) and its enforcement.

A lost or stolen node key is the case: the node's identity stays allow-listed (the node gets a new
certificate under the same id), so only the old certificate's serial tells the thief apart. The
guard is checked against a real gRPC server on 127.0.0.1 with real mutual TLS, on connections
opened before the revocation too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import pluralfed.auth as auth_module
import pluralfed.pki as pki_module
from coordinator.service import CoordinatorConfig
from pluralfed import tls
from pluralfed.auth import AllowList, AuthInterceptor, RevocationWatch, authenticated_node
from pluralfed.cli import main as cli_main
from pluralfed.errors import InputError
from pluralfed.pki import (
    create_ca,
    describe_certificate,
    issue_node_cert,
    issue_server_cert,
    parse_serial,
    revoke_certificates,
)
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

ALLOWED = {"node-a": "Aldoria", "node-b": "Borvenia"}


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    create_ca(tmp_path / "ca")
    issue_server_cert(tmp_path / "ca", tmp_path / "server", "coordinator", ["127.0.0.1"])
    for node_id in ALLOWED:
        issue_node_cert(tmp_path / "ca", tmp_path / node_id, node_id)
    # the same identity again: the certificate a node gets after its old key was stolen
    issue_node_cert(tmp_path / "ca", tmp_path / "node-a-new", "node-a")
    create_ca(tmp_path / "other-ca")  # same default CA name, another key
    issue_node_cert(tmp_path / "other-ca", tmp_path / "other-node-a", "node-a")
    return tmp_path


def serial(folder: Path) -> int:
    return tls.parse_certs((folder / "cert.pem").read_bytes(), folder, "cert")[0].serial_number


# ------------------------------------------------------------------------------------------------
# the list


def test_revoke_writes_a_list_the_ca_signed_and_keeps_earlier_entries(pki: Path) -> None:
    crl, added = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    assert crl == pki / "ca" / tls.CRL_FILE
    assert added == [serial(pki / "node-a")]
    first = tls.load_revocation_list(crl, pki / "ca" / "ca.pem")
    assert first.serials == {serial(pki / "node-a")}
    assert first.next_update is not None
    assert first.next_update - first.this_update == dt.timedelta(days=30)
    # by serial, as `certs show` prints it (with colons too), and the same certificate again
    text = f"{serial(pki / 'node-b'):x}"
    as_colons = ":".join(text[i : i + 2] for i in range(0, len(text), 2))
    crl, added = revoke_certificates(
        pki / "ca", [pki / "node-a" / "cert.pem"], [parse_serial(as_colons)], days=7
    )
    assert added == [serial(pki / "node-b")]
    second = tls.load_revocation_list(crl, pki / "ca" / "ca.pem")
    assert second.serials == {serial(pki / "node-a"), serial(pki / "node-b")}
    assert not second.is_revoked(serial(pki / "node-a-new"))
    assert second.next_update is not None and second.next_update > second.this_update
    assert second.next_update - second.this_update == dt.timedelta(days=7)


def test_revoke_refuses_another_cas_certificate_and_writes_nothing(pki: Path) -> None:
    with pytest.raises(InputError, match="was not issued by the CA"):
        revoke_certificates(
            pki / "ca", [pki / "node-a" / "cert.pem", pki / "other-node-a" / "cert.pem"]
        )
    assert not (pki / "ca" / tls.CRL_FILE).exists()
    for bad in ("zz", "0", "-5", "ab" * 30):
        with pytest.raises(InputError, match="serial"):
            parse_serial(bad)


def test_revoke_refuses_to_build_on_a_list_this_ca_did_not_sign(pki: Path) -> None:
    """`certs revoke` adds to the list in the CA folder and signs it again: a crl.pem there that
    this CA did not sign (another CA's of the same name, copied in by mistake) is refused and
    left as it is, not taken in and signed with this CA's key, which would revoke under this CA
    whatever serials the other list names."""
    theirs, _ = revoke_certificates(pki / "other-ca", [pki / "other-node-a" / "cert.pem"])
    ours = pki / "ca" / tls.CRL_FILE
    ours.write_bytes(theirs.read_bytes())
    with pytest.raises(InputError, match="is not signed by the CA"):
        revoke_certificates(pki / "ca", [pki / "node-b" / "cert.pem"])
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_list_not_signed_by_the_trusted_ca_is_refused(pki: Path) -> None:
    revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    ours, theirs = pki / "ca" / tls.CRL_FILE, pki / "other-ca" / tls.CRL_FILE
    revoke_certificates(pki / "other-ca", [pki / "other-node-a" / "cert.pem"])
    # the other CA has the same name, so only the signature tells them apart
    with pytest.raises(InputError, match="is not signed by the CA"):
        tls.load_revocation_list(theirs, pki / "ca" / "ca.pem")
    garbage = pki / "garbage.pem"
    garbage.write_text("not a CRL\n")
    with pytest.raises(InputError, match=f"revocation list {garbage}: not a PEM CRL"):
        tls.load_revocation_list(garbage, pki / "ca" / "ca.pem")
    with pytest.raises(InputError, match="revocation list file not found"):
        tls.load_revocation_list(pki / "missing.pem", pki / "ca" / "ca.pem")
    assert tls.load_revocation_list(ours, pki / "ca" / "ca.pem").serials


def test_an_overdue_list_is_still_enforced_with_a_warning(
    pki: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"], days=1)
    later = tls.utc_now() + dt.timedelta(days=2)
    monkeypatch.setattr(tls, "utc_now", lambda: later)
    with caplog.at_level(logging.WARNING, logger="pluralfed.tls"):
        overdue = tls.load_revocation_list(crl, pki / "ca" / "ca.pem")
    assert overdue.is_revoked(serial(pki / "node-a"))
    assert "was due for renewal" in caplog.text


def test_certs_show_says_a_list_past_its_next_update_is_overdue(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Services keep enforcing an overdue list (above) with a warning in their log; `certs
    show` on it says OVERDUE and how to renew, so the operator who looks is told too."""
    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"], days=1)
    assert "OVERDUE" not in describe_certificate(crl)
    later = tls.utc_now() + dt.timedelta(days=2)
    monkeypatch.setattr(pki_module, "utc_now", lambda: later)
    assert "OVERDUE: renew with `pluralfed certs revoke --ca DIR`" in describe_certificate(crl)


def test_the_revocation_list_is_readable_by_all_as_the_ca_certificate_is(pki: Path) -> None:
    """crl.pem is public, as ca.pem is: the coordinator reads it, often as another user than
    the operator who ran `certs revoke` (a service account, a container). Mode 0644, written
    and re-signed, never the 0600 of a key."""
    for _ in range(2):  # the first list, then the list signed again
        crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
        assert stat.S_IMODE(crl.stat().st_mode) == 0o644


def test_a_serial_over_20_octets_is_refused_as_out_of_range() -> None:
    """RFC 5280: a serial is positive and at most 20 octets, so below 2**159. One at 2**159 is
    said to be out of range, not handed to the list's builder (its ValueError was a traceback
    from `certs revoke --serial`); the largest one allowed is taken."""
    top = (1 << 159) - 1
    assert parse_serial(f"{top:x}") == top
    with pytest.raises(InputError, match="out of range for a certificate serial number"):
        parse_serial(f"{1 << 159:x}")


def test_certs_revoke_command(pki: Path) -> None:
    cmd = [sys.executable, "-m", "pluralfed.cli", "certs", "revoke", "--ca", str(pki / "ca")]
    done = subprocess.run(
        [*cmd, "--cert", str(pki / "node-b" / "cert.pem")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"revoked: serial {serial(pki / 'node-b'):x}" in done.stdout
    assert "1 revoked" in done.stdout
    show = [sys.executable, "-m", "pluralfed.cli", "certs", "show", str(pki / "ca" / "crl.pem")]
    shown = subprocess.run(show, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "revocation list (CRL)" in shown.stdout and "revoked:     1" in shown.stdout
    assert f"serial {serial(pki / 'node-b'):x}  since" in shown.stdout
    bad = subprocess.run([*cmd, "--serial", "xyz"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "serial 'xyz' is not a hexadecimal number" in bad.stderr


def test_certs_revoke_says_what_is_new_and_counts_the_whole_list(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary counts every serial the list holds, not just this call's; a certificate
    revoked again is "nothing new", and only a call naming none just re-signs the list."""
    revoke = ["certs", "revoke", "--ca", str(pki / "ca")]
    assert cli_main([*revoke, "--cert", str(pki / "node-a" / "cert.pem")]) == 0
    capsys.readouterr()
    assert cli_main([*revoke, "--cert", str(pki / "node-b" / "cert.pem")]) == 0
    out = capsys.readouterr().out
    assert f"revoked: serial {serial(pki / 'node-b'):x}" in out
    assert f"{pki / 'ca' / 'crl.pem'} (2 revoked, valid 30 days)" in out
    assert cli_main([*revoke, "--serial", f"{serial(pki / 'node-b'):x}"]) == 0
    out = capsys.readouterr().out
    assert "nothing new to revoke" in out and "revoked: serial" not in out
    assert "(2 revoked, valid 30 days)" in out
    assert cli_main([*revoke, "--days", "7"]) == 0
    out = capsys.readouterr().out
    assert "revocation list re-signed" in out and "(2 revoked, valid 7 days)" in out


def test_certs_revoke_days_sets_when_the_list_is_due(pki: Path) -> None:
    """`certs revoke --days 7` signs a list due for renewal 7 days after it was made: the
    days reach the list itself, not only the summary line."""
    from cryptography import x509

    assert cli_main(["certs", "revoke", "--ca", str(pki / "ca"), "--days", "7"]) == 0
    crl = x509.load_pem_x509_crl((pki / "ca" / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)


def test_coordinator_config_checks_its_revocation_list(pki: Path) -> None:
    files = tls.TlsFiles.from_dir(pki / "server")
    missing = CoordinatorConfig(tls_dir=pki / "server", tls_crl=pki / "nowhere.pem")
    with pytest.raises(InputError, match="revocation list file not found"):
        missing.revocations(files)
    with pytest.raises(InputError, match="without TLS there are no certificates"):
        CoordinatorConfig(insecure=True, tls_crl=pki / "nowhere.pem").revocations(None)
    assert CoordinatorConfig(tls_dir=pki / "server").revocations(files) is None


# ------------------------------------------------------------------------------------------------
# enforced by the guard


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    return str(authenticated_node(context)).encode()


@pytest.fixture()
def guarded(pki: Path) -> Iterator[tuple[int, Path]]:
    """A server whose guard checks the CA's list (empty at first), re-read on every call."""
    crl, _ = revoke_certificates(pki / "ca")
    watch = RevocationWatch(crl, pki / "ca" / "ca.pem", interval=0.0)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[AuthInterceptor(AllowList(ALLOWED), revocations=watch)],
    )
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_who)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Echo", {"Who": handler})]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", tls.TlsFiles.from_dir(pki / "server").server_credentials()
    )
    server.start()
    yield port, crl
    server.stop(None)


def _caller(port: int, folder: Path) -> tuple[grpc.Channel, grpc.UnaryUnaryMultiCallable]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.TlsFiles.from_dir(folder))
    return channel, channel.unary_unary("/test.Echo/Who")


def test_revoked_certificate_is_refused_on_an_open_connection(
    pki: Path, guarded: tuple[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    port, crl = guarded
    old_a, who_old_a = _caller(port, pki / "node-a")
    new_a, who_new_a = _caller(port, pki / "node-a-new")
    b, who_b = _caller(port, pki / "node-b")
    with old_a, new_a, b:
        assert who_old_a(b"", timeout=5) == b"Aldoria"  # connection open before the revocation
        revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
        with pytest.raises(grpc.RpcError) as refused:
            who_old_a(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"(serial {serial(pki / 'node-a'):x}) has been revoked" in str(
            refused.value.details()
        )
        # the same identity with its new certificate, and the other node, go on
        assert who_new_a(b"", timeout=5) == b"Aldoria"
        assert who_b(b"", timeout=5) == b"Borvenia"
        # a bad edit of the list (a half-copied file) does not lift the revocation
        crl_bytes = crl.read_bytes()
        time.sleep(0.01)  # a new modification time
        crl.write_bytes(crl_bytes[: len(crl_bytes) // 2])
        log_errors = caplog.at_level(logging.ERROR, logger="pluralfed.auth")
        with log_errors, pytest.raises(grpc.RpcError) as still:
            who_old_a(b"", timeout=5)
        assert still.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "the previous list (1 revoked) stays in force" in caplog.text
        assert who_b(b"", timeout=5) == b"Borvenia"


class _Aborted(Exception):
    pass


class _BareContext:
    """A call's context with the given auth context: for what a gRPC server never hands over
    (an identity without the certificate it came from), so cannot be reached over the wire."""

    def __init__(self, auth_context: dict[str, list[bytes]]) -> None:
        self._auth_context = auth_context

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth_context

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


def test_a_caller_whose_certificate_cannot_be_read_is_refused_where_revocations_count(
    pki: Path,
) -> None:
    """Without the certificate there is no serial to look up: the revocation check fails
    closed rather than let the identity through unchecked."""
    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    bare = _BareContext(
        {"transport_security_type": [b"ssl"], "peer_uri": [b"pluralfed://node/node-b"]}
    )
    unchecked = AuthInterceptor(AllowList(ALLOWED))
    assert unchecked.authenticate(bare, "/test.Echo/Who").node == "Borvenia"  # type: ignore[arg-type]
    guard = AuthInterceptor(
        AllowList(ALLOWED), revocations=RevocationWatch(crl, pki / "ca" / "ca.pem")
    )
    with pytest.raises(_Aborted) as refused:
        guard.authenticate(bare, "/test.Echo/Who")  # type: ignore[arg-type]
    code, details = refused.value.args
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == (
        "the client certificate could not be read to check it against the revocation list"
    )


def test_node_check_says_a_revoked_certificate_needs_replacing(
    pki: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    """Its hint for PERMISSION_DENIED was "check the allow-list and --group" (review, session
    15), where only a new certificate helps."""
    from pluralfed.cli import main

    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    watch = RevocationWatch(crl, pki / "ca" / "ca.pem", interval=0.0)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AuthInterceptor(AllowList(ALLOWED), revocations=watch)],
    )
    join = grpc.unary_unary_rpc_method_handler(
        lambda request, context: pb.JoinReply(),  # never reached: the guard refuses first
        request_deserializer=pb.JoinRequest.FromString,
        response_serializer=pb.JoinReply.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("pluralfed.v1.Federation", {"Join": join})]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", tls.TlsFiles.from_dir(pki / "server").server_credentials()
    )
    server.start()
    request.addfinalizer(lambda: server.stop(None))
    argv = ["node", "check", "--group", "Aldoria", "--data", str(pki / "unused.jsonl")]
    argv += ["--coordinator", f"127.0.0.1:{port}", "--tls-dir", str(pki / "node-a")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED: PERMISSION_DENIED: the certificate of 'node-a'" in err
    assert "meaning: the CA revoked this node's certificate: ask the operator for a new one" in err


def test_node_check_with_a_revocation_list_fails_when_it_cannot_check_the_coordinator(
    pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With tls_crl the check's own handshake must complete: nothing listening is a failed
    check (exit 1) that says why, never an "ok" without the certificate seen."""
    crl, _ = revoke_certificates(pki / "ca")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the check: nobody listens
    argv = ["node", "check", "--group", "Aldoria", "--tls-crl", str(crl)]
    argv += ["--coordinator", f"127.0.0.1:{port}", "--tls-dir", str(pki / "node-a")]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert f"FAILED: cannot check the certificate of the coordinator at 127.0.0.1:{port}" in err
    assert "meaning: with tls_crl the node checks the coordinator's certificate" in err


# ------------------------------------------------------------------------------------------------
# the node's side: a revoked coordinator certificate


def test_node_refuses_a_coordinator_whose_certificate_was_revoked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real coordinator (engine + gRPC server, mutual TLS on 127.0.0.1) and a real NodeClient
    with `tls_crl`: it joins while the coordinator's certificate is good; once the CA revokes
    it, the next Join is refused by the node itself, before any RPC, naming the serial. A list
    that then turns bad keeps the revocation in force; a bad list at start is refused."""
    from fedharness import HOST
    from test_update_validation import ENCODER, serve

    from coordinator.settings import RoundSettings
    from group_node.client import NodeClient
    from group_node.config import NodeConfig

    with serve(tmp_path, RoundSettings(rounds=1, eval_every=0), drive=False) as fed:
        crl, _ = revoke_certificates(fed.pki.ca, [])  # an empty list, as an operator starts
        config = NodeConfig(
            coordinator=f"{HOST}:{fed.port}",
            group="Good A",
            data=tmp_path / "unused.csv",
            tls_dir=fed.pki.node("node-good-a"),
            tls_crl=crl,
        )
        client = NodeClient(config)
        coordinator_serial = serial(fed.pki.server)
        try:
            # the node's own handshake sees the coordinator's certificate ...
            files = tls.TlsFiles.from_dir(fed.pki.node("node-good-a"))
            revocations = tls.load_revocation_list(crl, files.ca)
            assert (
                tls.checked_server_certificate(config.coordinator, files, revocations).serial_number
                == coordinator_serial
            )
            # ... and, not revoked, lets the Join through (refused here only for the toy
            # model's config, which the coordinator sends in its reply)
            with pytest.raises(InputError, match=r"JoinReply\.model_config_json"):
                client.join(10, ENCODER)
            revoke_certificates(fed.pki.ca, [fed.pki.server / "cert.pem"])
            with pytest.raises(InputError, match=f"revoked.*serial {coordinator_serial:x}"):
                client.join(10, ENCODER)
            crl.write_text("half-copied")  # a bad list later: the revocation stays in force
            with (
                caplog.at_level(logging.WARNING, logger="pluralfed.node"),
                pytest.raises(InputError, match="revoked"),
            ):
                client.join(10, ENCODER)
            assert any("stays in force" in r.getMessage() for r in caplog.records)
        finally:
            client.close()
        with pytest.raises(InputError, match="not a PEM CRL"):
            NodeClient(config)  # a bad list at start: refused
    with pytest.raises(InputError, match="insecure"):
        NodeConfig(
            coordinator="localhost:1", group="G", data=tmp_path / "x", insecure=True, tls_crl=crl
        )


class Relay:
    """A TCP relay on 127.0.0.1 to `target`: it drops the first `drop_first` connections at
    once (as an attacker resetting one handshake would) and pipes the others; `cut()` closes
    the piped ones, so that gRPC has to connect again."""

    def __init__(self, target_port: int, drop_first: int) -> None:
        self.target_port, self.drop_first = target_port, drop_first
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop_first:
                conn.close()
                continue
            self._relay(conn, ("127.0.0.1", self.target_port))

    def _relay(self, conn: socket.socket, target: tuple[str, int]) -> None:
        upstream = socket.create_connection(target)
        self.open += [conn, upstream]
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.open.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_node_never_joins_unchecked_and_checks_again_after_a_reconnect(tmp_path: Path) -> None:
    """Through a relay that resets the node's own check handshake, the node does not join (it
    counts as unreachable: ServerCheckFailed, no session); the coordinator saw no Join. Through
    a plain relay it joins; the CA then revokes the coordinator's certificate and the relay
    cuts the connection: once gRPC has connected again, the node's next RPC is refused by the
    node itself."""
    from test_update_validation import ENCODER, serve

    from coordinator.settings import RoundSettings
    from group_node.client import NodeClient

    with serve(tmp_path, RoundSettings(rounds=1, eval_every=0), drive=False) as fed:
        crl, _ = revoke_certificates(fed.pki.ca, [])

        def client_via(relay: Relay) -> NodeClient:
            client: NodeClient = crl_checking_client(tmp_path, fed, relay.port, crl)
            return client

        resetting = Relay(fed.port, drop_first=1)
        client = client_via(resetting)
        try:
            with pytest.raises(tls.ServerCheckFailed, match="cannot check the certificate"):
                client.join(10, ENCODER)
            assert client.session_id == "" and resetting.accepted == 1  # no Join was sent
        finally:
            client.close()
            resetting.close()

        relay = Relay(fed.port, drop_first=0)
        client = client_via(relay)
        try:
            with pytest.raises(InputError, match=r"JoinReply\.model_config_json"):
                client.join(10, ENCODER)  # joined (the toy model's config aside)
            assert client.session_id
            accepted = relay.accepted  # the node's own check's connection and gRPC's
            for _ in range(2):
                assert client.get_task(0.1).kind == pb.TASK_KIND_WAIT
            # same connection: no check of the node's own (a handshake of its own) per RPC
            assert relay.accepted == accepted
            revoke_certificates(fed.pki.ca, [fed.pki.server / "cert.pem"])
            relay.cut()
            refused = None
            for _ in range(50):  # gRPC connects again on the next call (or the one after)
                try:
                    client.get_task(0.1)
                except grpc.RpcError:
                    time.sleep(0.1)
                except InputError as err:
                    refused = err
                    break
            assert refused is not None and "revoked" in str(refused), refused
        finally:
            client.close()
            relay.close()


class SplitRelay(Relay):
    """An attacker on the path: the first connection (the node's own certificate check) goes to
    the real coordinator, every later one (gRPC's) to `then_port`."""

    def __init__(self, first_port: int, then_port: int) -> None:
        self.then_port = then_port
        super().__init__(first_port, drop_first=0)

    def _relay(self, conn: socket.socket, target: tuple[str, int]) -> None:
        if self.accepted > 1:
            target = ("127.0.0.1", self.then_port)
        super()._relay(conn, target)


# A stand-in serves only the RPCs it defines; the generated base answers the rest UNIMPLEMENTED.
# The stubs mark those abstract, so making one is `# type: ignore[abstract]`.
class Impostor(pb_grpc.FederationServicer):
    """Answers as a coordinator would, counting the Joins it gets."""

    def __init__(self) -> None:
        self.joins = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins += 1
        return pb.JoinReply(session_id="stolen", run_id="impostor")


@contextlib.contextmanager
def impostor_coordinator(ca: Path, folder: Path) -> Iterator[tuple[Impostor, int]]:
    """A server with a coordinator certificate of the federation's CA (issued into `folder`),
    asking for client certificates as the real one does."""
    issue_server_cert(ca, folder, "coordinator", ["localhost", "127.0.0.1"])
    servicer = Impostor()  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls.TlsFiles.from_dir(folder).server_credentials())
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None).wait(5)


def crl_checking_client(tmp_path: Path, fed: Any, port: int, crl: Path) -> Any:
    """A NodeClient of "Good A" with `tls_crl`, dialing `port` (a relay) as localhost."""
    from fedharness import HOST

    from group_node.client import NodeClient
    from group_node.config import NodeConfig

    return NodeClient(
        NodeConfig(
            coordinator=f"{HOST}:{port}",
            group="Good A",
            data=tmp_path / "unused.csv",
            tls_dir=fed.pki.node("node-good-a"),
            tls_server_name="localhost",
            tls_crl=crl,
        )
    )


def test_a_revoked_coordinator_key_cannot_answer_in_the_real_ones_place(tmp_path: Path) -> None:
    """The node's revocation check is a handshake of its own, not gRPC's connection: someone on
    the path holding a revoked coordinator key could let the check reach the real coordinator
    and answer gRPC's connection himself (a documented limit until session 20), getting the
    node's updates. Now gRPC trusts only the certificate the check passed: the impostor's
    handshake fails and it never sees a Join."""
    from test_update_validation import ENCODER, serve

    from coordinator.settings import RoundSettings

    with serve(tmp_path, RoundSettings(rounds=1, eval_every=0), drive=False) as fed:
        stolen = tmp_path / "stolen-coordinator"
        with impostor_coordinator(fed.pki.ca, stolen) as (impostor, impostor_port):
            crl, _ = revoke_certificates(fed.pki.ca, [stolen / "cert.pem"])
            relay = SplitRelay(fed.port, impostor_port)
            client = crl_checking_client(tmp_path, fed, relay.port, crl)
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    client.join(10, ENCODER)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert impostor.joins == 0 and client.session_id == ""
                assert relay.accepted >= 2  # the check went to the real one, gRPC to the other
            finally:
                client.close()
                relay.close()


def test_a_coordinator_with_a_renewed_certificate_is_checked_and_trusted_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """gRPC trusts only the certificate the node's check last passed; a coordinator that
    presents another one (renewed, not revoked) is checked and trusted in its place."""
    from test_update_validation import ENCODER, serve

    from coordinator.settings import RoundSettings

    with serve(tmp_path, RoundSettings(rounds=1, eval_every=0), drive=False) as fed:
        crl, _ = revoke_certificates(fed.pki.ca, [])
        with impostor_coordinator(fed.pki.ca, tmp_path / "renewed") as (renewed, renewed_port):
            relay = Relay(fed.port, drop_first=0)
            client = crl_checking_client(tmp_path, fed, relay.port, crl)
            try:
                with pytest.raises(InputError, match=r"JoinReply\.model_config_json"):
                    client.join(10, ENCODER)  # joined the first coordinator (toy config aside)
                relay.target_port = renewed_port  # the same address now serves another cert
                relay.cut()
                with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
                    reply = client.join(10, ENCODER)
                assert reply.run_id == "impostor" and renewed.joins == 1
                assert any("another certificate" in r.getMessage() for r in caplog.records)
            finally:
                client.close()
                relay.close()


def test_node_whose_check_cannot_complete_retries_as_if_unreachable(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node (the real run loop) whose certificate check keeps being reset backs off and
    retries like any node whose coordinator is unreachable, then gives up: exit code 1 and a
    clear log line, never a traceback and never a Join."""
    from types import SimpleNamespace

    from group_node.config import NodeConfig
    from group_node.node import GroupNode

    crl, _ = revoke_certificates(pki / "ca", [])
    resetting = Relay(1, drop_first=10**9)  # resets every connection
    config = NodeConfig(
        coordinator=f"127.0.0.1:{resetting.port}",
        group="Aldoria",
        data=tmp_path / "unused.csv",
        tls_dir=pki / "node-a",
        tls_crl=crl,
        backoff_initial_s=0.05,
        backoff_max_s=0.1,
        give_up_after_s=0.5,
    )
    worker = SimpleNamespace(num_train_examples=4, encoder=SimpleNamespace(identity="enc"))
    try:
        with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
            assert GroupNode(config, worker).run() == 1  # type: ignore[arg-type]
    finally:
        resetting.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot check the certificate" in m for m in messages), messages
    assert any("giving up" in m for m in messages), messages
    assert not any(r.exc_info for r in caplog.records)  # never a traceback
    assert resetting.accepted >= 2


class ConnectProxy(Relay):
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that records the targets it was asked for."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        super().__init__(0, drop_first=0)

    def _relay(self, conn: socket.socket, target: tuple[str, int]) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        asked = head.split(b" ")[1].decode()
        self.targets.append(asked)
        host, _, port = asked.rpartition(":")
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        super()._relay(conn, (host, int(port)))


def test_certificate_check_goes_through_the_proxy_grpc_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With https_proxy set, gRPC tunnels through it, so the node's own check does too (a
    CONNECT to the coordinator's address); no_proxy exempts a host, as it does for gRPC."""
    from test_update_validation import serve

    from coordinator.settings import RoundSettings

    assert tls.http_proxy_for("coordinator.example.org", {}) is None
    env = {"https_proxy": "proxy.example.org:3128", "no_proxy": "localhost,.internal"}
    assert tls.http_proxy_for("c.example.org", env) == "http://proxy.example.org:3128"
    assert tls.http_proxy_for("localhost", env) is None
    assert tls.http_proxy_for("a.b.internal", env) is None
    assert tls.http_proxy_for("x", {**env, "grpc_proxy": "http://g:1"}) == "http://g:1"

    proxy = ConnectProxy()
    try:
        with serve(tmp_path, RoundSettings(rounds=1, eval_every=0), drive=False) as fed:
            crl, _ = revoke_certificates(fed.pki.ca, [])
            files = tls.TlsFiles.from_dir(fed.pki.node("node-good-a"))
            revocations = tls.load_revocation_list(crl, files.ca)
            address = f"127.0.0.1:{fed.port}"
            for name in ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy"):
                monkeypatch.delenv(name, raising=False)
                monkeypatch.delenv(name.upper(), raising=False)
            monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
            checked = tls.checked_server_certificate(address, files, revocations)
            assert checked.serial_number == serial(fed.pki.server)
            assert proxy.targets == [address]
            monkeypatch.setenv("no_proxy", "127.0.0.1")
            tls.checked_server_certificate(address, files, revocations)
            assert proxy.targets == [address]  # direct this time
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        ("coordinator.example.org", "*", True),
        ("10.0.0.7", "*", True),
        ("example.org", "example.org", True),
        ("c.example.org", "example.org", True),
        ("c.example.org", ".example.org", True),
        ("evilexample.org", "example.org", False),
        ("evilexample.org", ".example.org", False),
        ("example.org.evil.net", "example.org", False),
        ("[::1]", "::1", True),
    ],
)
def test_no_proxy_exempts_a_host_by_name_or_domain_or_all_with_a_star(
    host: str, no_proxy: str, bypassed: bool
) -> None:
    """As gRPC reads no_proxy: `*` exempts every host, an entry its name and the names under
    it, never a name that merely ends in the same letters."""
    env = {"https_proxy": "proxy.example.org:3128", "no_proxy": f"localhost, {no_proxy}"}
    expected = None if bypassed else "http://proxy.example.org:3128"
    assert tls.http_proxy_for(host, env) == expected


def test_the_revocation_check_keeps_the_files_read_at_start(pki: Path) -> None:
    """gRPC reads the node's key and certificate once; the revocation check did so before
    every Join, outside its error handling, so a key being rotated while the node ran ended
    it with a bare ssl.SSLError. Now the check's context is made once, at start."""
    from group_node.client import NodeClient
    from group_node.config import NodeConfig

    crl, _ = revoke_certificates(pki / "ca")
    folder = pki / "node-a"
    (folder / "ca.pem").write_bytes((pki / "ca" / "ca.pem").read_bytes())
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = NodeConfig(
        coordinator=f"127.0.0.1:{port}", group="G", data=pki / "g.csv", tls_dir=folder, tls_crl=crl
    )
    client = NodeClient(config)
    try:
        (folder / "key.pem").write_text("being rotated")
        with pytest.raises(tls.ServerCheckFailed, match="cannot check the certificate"):
            client.join(1, "enc")  # unreachable, as it is: not a crash on the key file
    finally:
        client.close()
    with pytest.raises(InputError, match=r"key\.pem for the revocation check"):
        NodeClient(config)  # a bad file at start is a clear error


def test_the_list_is_looked_at_once_an_interval_however_many_calls_come(
    pki: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call checks its caller against the list, but the file is looked at no more than
    once each `interval` (on a clock the test moves, so no sleep and no timing)."""
    clock = [1000.0]
    monkeypatch.setattr(auth_module, "time", type("Clock", (), {"monotonic": lambda: clock[0]}))
    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    watch = RevocationWatch(crl, pki / "ca" / "ca.pem", interval=10.0)
    b_serial = serial(pki / "node-b")
    clock[0] = 1011.0  # looked at: unchanged
    assert not watch.current().is_revoked(b_serial)
    revoke_certificates(pki / "ca", [pki / "node-b" / "cert.pem"])
    clock[0] = 1015.0  # within the interval since the last look: not looked at again
    assert not watch.current().is_revoked(b_serial)
    clock[0] = 1021.5
    assert watch.current().is_revoked(b_serial)


def test_an_older_list_put_back_does_not_unrevoke(pki: Path) -> None:
    """Any list the CA signed was taken on reload, an old copy too (a restored backup): the
    certificates revoked since came back in (review, session 14)."""
    crl, _ = revoke_certificates(pki / "ca", [pki / "node-a" / "cert.pem"])
    old = crl.read_bytes()
    time.sleep(1.1)  # a list's date has whole seconds
    revoke_certificates(pki / "ca", [pki / "node-b" / "cert.pem"])
    watch = RevocationWatch(crl, pki / "ca" / "ca.pem", interval=0.0)
    b_serial = tls.parse_certs((pki / "node-b" / "cert.pem").read_bytes(), crl, "c")[0]
    assert watch.current().is_revoked(b_serial.serial_number)
    crl.write_bytes(old)
    assert watch.current().is_revoked(b_serial.serial_number)  # the newer list stays in force
    with pytest.raises(InputError, match="before the one in force"):
        tls.load_revocation_list(crl, pki / "ca" / "ca.pem", in_force=watch.current())
