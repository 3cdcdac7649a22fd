"""Who may talk to a REAL coordinator process (mutual TLS on 127.0.0.1), call by call.

Refused in the TLS handshake (the client sees UNAVAILABLE, no handler runs): no client
certificate, a certificate of another CA, an expired certificate. Refused by the coordinator: an
identity not in the allow-list, a certificate the CA revoked while the coordinator runs, a node
claiming another group, a session used over another node's certificate (all PERMISSION_DENIED),
an unknown session (UNAUTHENTICATED), another protocol version or text encoder
(FAILED_PRECONDITION). Also: the health service answers SERVING
over TLS, `pluralfed node check` exits 0 / 1 / 2, and insecure mode says so loudly in the log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fedharness import (
    CLI,
    Coordinator,
    FakeNode,
    Pki,
    Procs,
    env_for_children,
    health_stub,
    rpc_error,
    scaled,
    start_coordinator,
    tails,
    update_messages,
    wait_for_port,
    wait_until,
)
from grpc_health.v1 import health_pb2

from pluralfed.embeddings import make_encoder
from pluralfed.localfed import write_toml
from pluralfed.pki import revoke_certificates
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.transport import PROTOCOL_VERSION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ALLOW = {"node-aldoria": "Aldoria", "node-borvenia": "Borvenia", "node-calvaris": "Calvaris"}
SETTINGS = {"rounds": 1, "min_nodes": 10, "min_updates": 1}  # never a quorum: no rounds run
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Setup:
    pki: Pki
    other: Pki  # another federation's CA, with a node certificate for "node-aldoria"
    coordinator: Coordinator
    insecure: Coordinator  # a second coordinator, in --insecure mode
    encoder: str
    root: Path

    def creds(
        self, folder: Path, *, cert: bool = True, ca: Path | None = None
    ) -> grpc.ChannelCredentials:
        """Raw credentials from a certificate folder, without our loader's checks (so that bad
        certificates reach the server)."""
        return grpc.ssl_channel_credentials(
            root_certificates=(ca or self.pki.ca / "ca.pem").read_bytes(),
            private_key=(folder / "key.pem").read_bytes() if cert else None,
            certificate_chain=(folder / "cert.pem").read_bytes() if cert else None,
        )

    def node(self, identity: str, group: str | None = None) -> FakeNode:
        return FakeNode(
            self.coordinator.port,
            group or ALLOW.get(identity, identity),
            tls_dir=self.pki.node(identity),
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("auth")
    pki = Pki(root / "pki")
    for identity in [*ALLOW, "node-stranger"]:
        pki.node(identity)
    pki.node(
        "node-aldoria",
        folder="node-aldoria-expired",
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    other = Pki(root / "other", ca_name="another federation's CA")
    other.node("node-aldoria")
    pki.node("node-aldoria", folder="node-aldoria-stolen")  # revoked by a test, mid-run
    crl, _ = revoke_certificates(pki.ca)  # the CA's revocation list, empty at start
    with Procs(root / "logs") as procs:
        settings = {**SETTINGS, "tls_crl": str(crl)}
        secure = start_coordinator(procs, root, pki, ALLOW, settings, wait=False)
        insecure = start_coordinator(
            procs,
            root,
            None,
            {"node-dora": "Dora"},
            SETTINGS,
            name="insecure-coordinator",
            wait=False,
        )
        secure.port = wait_for_port(secure)
        insecure.port = wait_for_port(insecure)
        yield Setup(pki, other, secure, insecure, make_encoder().identity, root)
        for c in (secure, insecure):
            assert c.proc.alive, f"a coordinator died during the tests\n\n{tails([c.proc])}"


def raw_channel(setup: Setup, creds: grpc.ChannelCredentials) -> FakeNode:
    return FakeNode(setup.coordinator.port, "Aldoria", credentials=creds)


# ------------------------------------------------------------------------------------------------
# admitted


def test_allowed_node_joins_and_health_is_serving_over_tls(setup: Setup) -> None:
    with setup.node("node-aldoria") as node:
        reply = node.join(setup.encoder)
        assert reply.session_id and reply.run_id
        assert reply.protocol_version == PROTOCOL_VERSION and reply.encoder_id == setup.encoder
        assert node.heartbeat().current_round == 0
        health = health_stub(node.channel)
        for service in ("", "pluralfed.v1.Federation"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        node.leave()
    # the health service needs the TLS handshake, not an allow-listed identity
    with setup.node("node-stranger") as stranger:
        health = health_stub(stranger.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------------------
# refused in the TLS handshake


@pytest.mark.parametrize("case", ["no client certificate", "another CA", "expired"])
def test_handshake_refusals(setup: Setup, case: str) -> None:
    if case == "no client certificate":
        creds = setup.creds(setup.pki.node("node-aldoria"), cert=False)
    elif case == "another CA":  # same identity as an allowed node, signed by another CA
        creds = setup.creds(setup.other.node("node-aldoria"))
    else:
        creds = setup.creds(setup.pki.root / "nodes" / "node-aldoria-expired")
    with raw_channel(setup, creds) as node:
        assert rpc_error(node.join, setup.encoder).code() == grpc.StatusCode.UNAVAILABLE
        health = health_stub(node.channel)
        err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_failed_handshakes_leave_no_line_each_in_the_log_unless_asked(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC core logs every failed TLS handshake, unthrottled; any peer that reaches the port
    could fill the coordinator's disk with them. `pluralfed` keeps gRPC core quiet, and `pluralfed -v` lets it speak (so the lines are there to be silenced): the
    failed handshakes' and those of a TLS hello that names another server."""
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # the operator chose nothing
    no_cert = setup.creds(setup.pki.node("node-aldoria"), cert=False)
    with Procs(setup.root / "handshake-logs") as procs:
        coordinators = {
            verbose: start_coordinator(
                procs,
                setup.root / "handshakes",
                setup.pki,
                ALLOW,
                SETTINGS,
                name=f"coordinator-verbose-{verbose}",
                wait=False,
                verbose=verbose,
            )
            for verbose in (False, True)
        }
        for coordinator in coordinators.values():
            coordinator.port = wait_for_port(coordinator)
            for _ in range(20):
                with FakeNode(coordinator.port, "Aldoria", credentials=no_cert) as stranger:
                    err = rpc_error(stranger.join, setup.encoder)
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                _hello_naming_another_server(coordinator.port)
        wait_until(
            lambda: "Handshake failed" in coordinators[True].proc.log(),
            10,
            "gRPC core's handshake lines in the verbose coordinator's log",
            logs=[coordinators[True].proc],
        )
        wait_until(
            lambda: "No match found for server name" in coordinators[True].proc.log(),
            10,
            "gRPC core's line for a server name not in the certificate",
            logs=[coordinators[True].proc],
        )
        quiet = coordinators[False].proc
        assert quiet.alive, quiet.tail()
        assert "Handshake failed" not in quiet.log(), quiet.tail()
        # an ERROR line of gRPC core's, for a ClientHello anyone can send: it was in the log
        assert "No match found" not in quiet.log(), quiet.tail()


def _hello_naming_another_server(port: int) -> None:
    """A TLS ClientHello that names a server the coordinator's certificate does not, from a
    peer without any certificate (the server refuses the handshake: no client certificate)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        contextlib.suppress(ssl.SSLError, OSError),
        context.wrap_socket(raw, server_hostname="evil.invalid") as conn,
    ):
        conn.recv(1)


# ------------------------------------------------------------------------------------------------
# refused by the coordinator


def test_revoked_certificate_is_refused_by_the_running_coordinator(setup: Setup) -> None:
    """A stolen key: its certificate is revoked while the coordinator runs (no restart); the
    node's other certificate under the same, still allow-listed, identity goes on working."""
    stolen = setup.pki.node("node-aldoria", folder="node-aldoria-stolen")
    with FakeNode(setup.coordinator.port, "Aldoria", tls_dir=stolen) as thief:
        assert thief.join(setup.encoder).session_id  # not revoked yet
        revoke_certificates(setup.pki.ca, [stolen / "cert.pem"])
        err = wait_until(
            lambda: _refusal(thief, setup.encoder),
            10,
            "the coordinator refusing the revoked certificate",
            logs=[setup.coordinator.proc],
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "has been revoked" in str(err.details())
    with setup.node("node-aldoria") as node:
        assert node.join(setup.encoder).session_id
        node.leave()


def _refusal(node: FakeNode, encoder: str) -> grpc.RpcError | None:
    try:
        node.join(encoder)
    except grpc.RpcError as err:
        return err
    return None


def test_identity_not_in_allow_list(setup: Setup) -> None:
    with setup.node("node-stranger", group="Aldoria") as node:
        err = rpc_error(node.join, setup.encoder)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node-stranger" in str(err.details())
    wait_until(
        lambda: "identity=node-stranger" in setup.coordinator.proc.log(),
        10,
        "the refusal in the coordinator's log",
        logs=[setup.coordinator.proc],
    )


def test_node_may_not_join_as_another_group(setup: Setup) -> None:
    with setup.node("node-aldoria") as node:
        err = rpc_error(node.join, setup.encoder, group="Borvenia")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "Borvenia" in str(err.details())


def test_session_used_from_another_nodes_certificate(setup: Setup) -> None:
    with setup.node("node-aldoria") as aldoria, setup.node("node-borvenia") as borvenia:
        session = aldoria.join(setup.encoder).session_id
        stolen = pb.Task(task_id="t", round=1, model_version="v")
        calls = {
            "Heartbeat": lambda: borvenia.heartbeat(session_id=session),
            "GetTask": lambda: borvenia.get_task(wait_s=0.1, session_id=session),
            "DownloadModel": lambda: borvenia.download("", session_id=session),
            "UploadUpdate": lambda: borvenia.upload(update_messages(session, stolen, {}, 1)),
            "Leave": lambda: borvenia.leave(session_id=session),
        }
        for name, call in calls.items():
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err)
        # the session itself still works for its owner
        assert aldoria.heartbeat().current_round == 0
        aldoria.leave()
        # and once left, it is gone
        err = rpc_error(aldoria.heartbeat)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_session(setup: Setup) -> None:
    with setup.node("node-borvenia") as node:
        for call in (
            lambda: node.heartbeat(session_id="no-such-session"),
            lambda: node.get_task(wait_s=0.1, session_id="no-such-session"),
        ):
            assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED


def test_protocol_version_and_encoder_mismatch(setup: Setup) -> None:
    with setup.node("node-aldoria") as node:
        err = rpc_error(node.join, setup.encoder, protocol_version=PROTOCOL_VERSION + 1)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(PROTOCOL_VERSION + 1) in str(err.details())
        assert f"version {PROTOCOL_VERSION}" in str(err.details())
        err = rpc_error(node.join, "some-other-encoder/384/mean")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = str(err.details())
        assert "some-other-encoder/384/mean" in details and setup.encoder in details


# ------------------------------------------------------------------------------------------------
# `pluralfed node check` and insecure mode


def test_node_check_cli_exit_codes(setup: Setup) -> None:
    def config(name: str, settings: dict[str, Any]) -> Path:
        path = setup.root / "check" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        # check needs no data, but a node config names its data file
        write_toml(path, {"data": str(setup.root / "unused.jsonl"), **settings}, {})
        return path

    secure = {"coordinator": setup.coordinator.address, "tls_server_name": "localhost"}
    nodes = setup.pki.root / "nodes"
    cases: dict[str, tuple[int, dict[str, Any]]] = {
        "ok": (0, {**secure, "group": "Calvaris", "tls_dir": str(nodes / "node-calvaris")}),
        "not-allowed": (
            1,
            {**secure, "group": "Stranger", "tls_dir": str(nodes / "node-stranger")},
        ),
        "expired": (
            2,  # our loader refuses the expired certificate before connecting: a config error
            {**secure, "group": "Aldoria", "tls_dir": str(nodes / "node-aldoria-expired")},
        ),
        "insecure": (
            0,
            {"coordinator": setup.insecure.address, "group": "Dora", "insecure": True},
        ),
    }
    # all at once: each is a fresh Python process that imports torch
    running = {
        name: subprocess.Popen(
            [*CLI, "node", "check", "--config", str(config(name, settings))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env_for_children(),
            text=True,
        )
        for name, (_, settings) in cases.items()
    }
    results = {}
    try:
        for name, proc in running.items():
            try:
                out, err = proc.communicate(timeout=scaled(120))
            except subprocess.TimeoutExpired:
                pytest.fail(f"`node check` ({name}) did not finish", pytrace=False)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, (expected, _) in cases.items():
        code, out, err = results[name]
        assert code == expected, f"{name}: exit code {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "ok: the coordinator would admit this node" in results["ok"][1]
    assert "FAILED: PERMISSION_DENIED" in results["not-allowed"][2]
    assert "expired" in results["expired"][2]
    assert "ok: the coordinator would admit this node" in results["insecure"][1]
    assert "INSECURE" in results["insecure"][2]


def test_insecure_mode_warns_in_the_log(setup: Setup) -> None:
    proc = setup.insecure.proc
    wait_until(lambda: "INSECURE MODE" in proc.log(), 10, "the insecure-mode warning", logs=[proc])
    assert "INSECURE plain text" in proc.log()
    assert "INSECURE MODE" not in setup.coordinator.proc.log()
    # without TLS anyone can claim a name, so at least it must be a name in the allow-list
    with FakeNode(setup.insecure.port, "Mallory", insecure=True) as node:
        assert rpc_error(node.join, setup.encoder).code() == grpc.StatusCode.PERMISSION_DENIED
    with FakeNode(setup.insecure.port, "Dora", insecure=True) as node:
        assert node.join(setup.encoder).session_id


def test_plain_text_client_cannot_reach_the_tls_coordinator(setup: Setup) -> None:
    with FakeNode(setup.coordinator.port, "Aldoria", insecure=True) as node:
        assert rpc_error(node.join, setup.encoder).code() == grpc.StatusCode.UNAVAILABLE
