"""What a node operator is told (operator review, session 20), against the real coordinator stack
(RoundEngine and its gRPC server in this process, real mutual TLS on 127.0.0.1) or a stand-in
coordinator where a real one cannot be made to answer so:

- two processes with one node certificate replace each other's session: each says so, naming
  the peer, and one stops (exit 2) instead of taking turns for ever;
- `node check` run beside a running node leaves that node's session alone (check-only join);
- a coordinator that cannot be reached is logged with its address and gRPC's cause, and a
  misconfiguration (wrong CA, a certificate for another name) says what it means;
- `node check` names the exact cause when gRPC's details do (and the role to set);
- a coordinator that restarted into another run, and an unknown session, are logged once, clearly,
  and a new run starts from none of the old run's state (local optimizer, refused tasks);
- `node run` says what loading its data skipped, and warns once about a key others may read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from fedharness import HOST, FakeNode, Pki, free_port, stand_in_coordinator
from test_update_validation import ALLOW, ENCODER, Federation, toy_weights
from test_validation_node import SMALL, FakeEncoder, StandIn, model_messages, small_weights, worker
from test_validation_rpc import quiet_settings

import group_node.node as node_module
import pluralfed.commands.node as commands_node
import pluralfed.fsutil
from coordinator.rounds import RoundEngine
from coordinator.server import start_server
from group_node.client import connection_hint
from group_node.config import NodeConfig
from group_node.node import GroupNode
from pluralfed.auth import AllowList
from pluralfed.cli import main
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.tls import TlsFiles
from pluralfed.transport import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(120)

WORKER = SimpleNamespace(num_train_examples=4, encoder=SimpleNamespace(identity=ENCODER))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A coordinator that starts no round (no quorum), with GPO's default model config (a real
    node checks it); "Judge" may only evaluate."""
    root = tmp_path_factory.mktemp("fed")
    pki = Pki(root / "pki")
    settings = quiet_settings(evaluate_only=("Judge",))
    engine = RoundEngine(settings, toy_weights(), root / "state", ENCODER, {})
    server, port = start_server(
        engine, f"{HOST}:0", TlsFiles.from_dir(pki.server), AllowList(ALLOW), max_workers=16
    )
    driver = threading.Thread(target=engine.run, name="rounds", daemon=True)
    driver.start()
    try:
        yield Federation(engine, port, pki, root / "state")
    finally:
        engine.stop()
        server.stop(None).wait(10)
        driver.join(10)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another federation's CA: its ca.pem does not vouch for `fed`'s coordinator."""
    return Pki(tmp_path_factory.mktemp("other"), ca_name="another federation's CA")


def config(fed: Federation, identity: str = "node-good-a", **kw: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "coordinator": f"{HOST}:{fed.port}",
        "group": "Good A",
        "tls_dir": fed.pki.node(identity),
        "poll_wait_s": 0.5,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.1,
        **kw,
    }
    return NodeConfig(**values)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# --------------------------------------------------------------------------------------------
# 1. two processes with one certificate


def test_two_nodes_with_one_certificate_say_so_and_one_stops(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """They replaced each other's session every ~2.5 s for ever, each logging only "unknown or
    expired session ...; joining again"."""
    nodes = [GroupNode(config(fed), WORKER) for _ in range(2)]  # type: ignore[arg-type]
    codes: dict[int, int] = {}
    done = threading.Event()

    def run(i: int) -> None:
        codes[i] = nodes[i].run()
        done.set()

    with caplog.at_level(logging.INFO, logger="pluralfed.node"):
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        assert done.wait(60), "neither node stopped"
        for node in nodes:  # the one left standing keeps its session until stopped
            node.stop()
        for t in threads:
            t.join(10)
    assert sorted(codes.values()) == [2, 143], codes
    replaced = [m for m in messages(caplog, logging.WARNING) if "was replaced" in m]
    assert len(replaced) >= 2, replaced
    assert all("a newer Join with its certificate from ipv4:127.0.0.1:" in m for m in replaced)
    assert not [m for m in messages(caplog, logging.WARNING) if "unknown or expired" in m]
    (error,) = messages(caplog, logging.ERROR)
    assert error.startswith("Good A: stopping: another process joins as this node")
    assert error.endswith("two processes with one certificate? stopping this one")


# A stand-in serves only the RPCs it defines; the generated base answers the rest UNIMPLEMENTED.
# The stubs mark those abstract, so making one is `# type: ignore[abstract]`.
class UnknownSessionOnce(pb_grpc.FederationServicer):
    """Forgets the node's session once (as a restarted coordinator does), then ends the run; a
    later Join is answered with another run id when `new_run` is set."""

    def __init__(self, new_run: bool) -> None:
        self.new_run = new_run
        self.joins = 0
        self.polls = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins += 1
        run = "run-2" if self.new_run and self.joins > 1 else "run-1"
        return pb.JoinReply(session_id=f"s-{self.joins}", run_id=run, protocol_version=1)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        if self.polls == 1:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session 's-1': join again"
            )
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        return pb.HeartbeatReply()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        return pb.Ack()


class WaitThenEnd(UnknownSessionOnce):
    """Tells the node to wait (as a coordinator waiting for a quorum does) `waits` times, then
    ends the run. Each GetTask is a poll the coordinator held for `held_s` seconds: it moves the
    node's clock `now` on by that much (the node reads its clock only after the answer)."""

    def __init__(self, waits: int, held_s: float) -> None:
        super().__init__(new_run=False)
        self.waits, self.held_s, self.now = waits, held_s, 0.0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        self.now = self.polls * self.held_s
        if self.polls <= self.waits:
            task = pb.Task(kind=pb.TASK_KIND_WAIT)
            task.retry_after.FromMilliseconds(10)
            return task
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)


def test_a_node_told_to_wait_long_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After "joined run ...", a node whose coordinator waited for held-out groups (up to
    eval_timeout_s, 300 s) printed nothing: its operator could think it hung."""
    monkeypatch.setattr(node_module, "IDLE_NOTE_FIRST_S", 5.0)
    monkeypatch.setattr(node_module, "IDLE_NOTE_EVERY_S", 10.0)
    # the node's clock is the stand-in's: 1 s per held poll, so 22 WAITs are 22 s of idling
    servicer = WaitThenEnd(22, held_s=1.0)  # type: ignore[abstract]
    clock = SimpleNamespace(
        monotonic=lambda: servicer.now, perf_counter=time.perf_counter, time=time.time
    )
    monkeypatch.setattr(node_module, "time", clock)
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        with caplog.at_level(logging.INFO, logger="pluralfed.node"):
            assert GroupNode(cfg, WORKER).run() == 0  # type: ignore[arg-type]
    notes = [m for m in messages(caplog, logging.INFO) if "no task for" in m]
    # at 5 s and 15 s (not 25 s: the run ended at 23 s); not at every WAIT
    assert [n.split(":")[1] for n in notes] == [" no task for 5 s", " no task for 15 s"], notes
    assert notes[0].startswith("G: no task for ") and "stays connected" in notes[0]


@pytest.mark.parametrize("new_run", [False, True])
def test_a_lost_session_is_said_once_and_a_new_run_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, new_run: bool
) -> None:
    """ "unknown or expired session '...': join again; joining again" stuttered; and a node whose
    coordinator came back with another state folder joined the new run without a word."""
    servicer = UnknownSessionOnce(new_run)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
            assert GroupNode(cfg, worker()).run() == 0  # a new run drops the worker's state
    warnings = [m for m in messages(caplog, logging.WARNING) if not m.startswith("INSECURE")]
    lost = "G: unknown or expired session 's-1'; joining again"
    if new_run:
        assert warnings[0] == lost and len(warnings) == 2, warnings
        assert "the coordinator now runs another run (run-2, before run-1)" in warnings[1]
        assert "the earlier run was not resumed" in warnings[1]
    else:
        assert warnings == [lost]


class RestartsIntoRun(StandIn):
    """Offers run-1's TRAIN task t-1 and refuses its update for good (NORM_BOUND), then forgets
    the session; the Join after that opens `second_run`, which offers t-1 (twice, unless its
    update is counted), then t-2, then ends. Each task is 1 local step, keeping the optimizer
    state (what this coordinator always sends)."""

    def __init__(self, second_run: str) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), model_messages(small_weights()))
        self.second_run = second_run
        self.joins = 0
        self.polls = 0  # of the second session
        self.uploads: list[tuple[str, str]] = []  # (session, task)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        reply = super().Join(request, context)
        self.joins += 1
        reply.session_id = f"s-{self.joins}"
        reply.run_id = "run-1" if self.joins == 1 else self.second_run
        return reply

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if request.session_id == "s-1":
            if self.uploads:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session: join")
            return self.train_task("t-1")
        self.polls += 1
        counted = [task for _, task in self.uploads[1:]]  # the first upload was refused
        if self.polls <= 2 and "t-1" not in counted:
            return self.train_task("t-1")
        if "t-2" not in counted and self.polls < 10:
            return self.train_task("t-2")
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)

    def train_task(self, task_id: str) -> pb.Task:
        task = super().GetTask(pb.GetTaskRequest(), None)  # type: ignore[arg-type]
        task.task_id = task_id
        task.hyperparameters.keep_local_optimizer_state = True
        task.time_budget.FromSeconds(60)
        return task

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        header = next(request_iterator).header
        for _ in request_iterator:
            pass
        self.uploads.append((header.session_id, header.task_id))
        if len(self.uploads) == 1:
            return pb.UploadReply(accepted=False, reason=pb.REJECT_REASON_NORM_BOUND)
        return pb.UploadReply(accepted=True)


@pytest.mark.parametrize("new_run", [True, False])
def test_a_new_run_starts_from_a_fresh_optimizer_and_forgets_the_old_runs_tasks(
    monkeypatch: pytest.MonkeyPatch, new_run: bool
) -> None:
    """Protocol review P5: a node that rejoined a coordinator running another run kept its
    Adam moments (run-2's first 1-step task ended at Adam step 2, not 1) and the old run's
    bookkeeping, which refused a task of the new run that happened to reuse an old id. Within one
    run both stay: the moments carry over and a task refused for good is not trained again."""
    monkeypatch.setattr(node_module, "REFUSED_TASK_POLL_S", 0.05)
    servicer = RestartsIntoRun("run-2" if new_run else "run-1")  # type: ignore[abstract]
    w = worker()
    adam_steps: list[list[float]] = []  # after each TRAIN task
    train = w.train

    def counted_train(*args: object, **kwargs: object) -> object:
        result = train(*args, **kwargs)  # type: ignore[arg-type]
        assert w.trainer is not None
        adam_steps.append(sorted({float(s["step"]) for s in w.trainer.optimizer.state.values()}))
        return result

    monkeypatch.setattr(w, "train", counted_train)
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        assert GroupNode(cfg, w).run() == 0
    assert servicer.joins == 2
    if new_run:  # run-2's t-1 is a new task, trained from a fresh optimizer; t-2 goes on from it
        assert servicer.uploads == [("s-1", "t-1"), ("s-2", "t-1"), ("s-2", "t-2")]
        assert adam_steps == [[1.0], [1.0], [2.0]]
    else:  # the same run: t-1 was answered for good; t-2 goes on from t-1's moments
        assert servicer.uploads == [("s-1", "t-1"), ("s-2", "t-2")]
        assert adam_steps == [[1.0], [2.0]]


@pytest.mark.parametrize("new_run", [True, False])
def test_an_update_kept_to_send_again_is_dropped_when_the_node_joins_another_run(
    new_run: bool,
) -> None:
    """An update the coordinator could not store is kept to be sent again, but it answers a task
    of its run: joining another run drops it (with the model and the refused tasks); joining the
    same run again keeps all three."""
    servicer = UnknownSessionOnce(new_run)  # type: ignore[abstract]
    forgotten: list[bool] = []
    stub = SimpleNamespace(
        num_train_examples=4,
        encoder=SimpleNamespace(identity=ENCODER),
        forget_run=lambda: forgotten.append(True),
    )
    unsent: Any = object()  # stands for the UnsentUpdate of the old run's task t-1
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        node = GroupNode(cfg, stub)  # type: ignore[arg-type]
        node._join()
        node._unsent = unsent
        node._refused.add("t-1")
        node._join()  # run-2 when new_run
        node.client.close()
    if new_run:
        assert (node._unsent, node._refused, forgotten) == (None, set(), [True])
    else:
        assert (node._unsent, node._refused, forgotten) == (unsent, {"t-1"}, [])


# --------------------------------------------------------------------------------------------
# 2. and 4. node check


def check(cfg: NodeConfig, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    """`pluralfed node check` with `cfg`'s connection settings (the federation's test encoder)."""
    monkeypatch.setattr(commands_node, "make_encoder", lambda _spec: WORKER.encoder)
    argv = ["node", "check", "--group", cfg.group, "--coordinator", cfg.coordinator, *extra]
    if cfg.insecure:
        argv.append("--insecure")
    else:
        argv += ["--tls-dir", str(cfg.tls_dir)]
    if cfg.tls_server_name:
        argv += ["--tls-server-name", cfg.tls_server_name]
    return main(argv)


def test_node_check_beside_a_running_node_leaves_its_session_alone(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check joined and left: its Join replaced the running node's session, whose round's
    work was thrown away."""
    with FakeNode(fed.port, "Good B", tls_dir=fed.pki.node("node-good-b")) as running:
        running.join(ENCODER, 10)
        assert check(config(fed, "node-good-b", group="Good B"), monkeypatch) == 0
        out = capsys.readouterr().out
        assert f"ok: the coordinator would admit this node (run {running.run_id}," in out
        assert "note:" not in out
        running.heartbeat()  # still its session


# A stand-in serves only the RPCs it defines; the generated base answers the rest UNIMPLEMENTED.
# The stubs mark those abstract, so making one is `# type: ignore[abstract]`.
class OlderCoordinator(pb_grpc.FederationServicer):
    """Knows no check_only: opens a session for every Join."""

    def __init__(self) -> None:
        self.check_only: list[bool] = []
        self.left: list[tuple[str, str]] = []

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.check_only.append(request.check_only)
        return pb.JoinReply(session_id="s-1", run_id="r", protocol_version=PROTOCOL_VERSION)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        self.left.append((request.session_id, request.reason))
        return pb.Ack()


def test_node_check_leaves_the_session_an_older_coordinator_opened(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer = OlderCoordinator()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        assert check(cfg, monkeypatch) == 0
    assert servicer.check_only == [True]
    assert servicer.left == [("s-1", "connection check")]
    out = capsys.readouterr().out
    assert "ok: the coordinator would admit this node (run r," in out
    assert "does not know check-only joins" in out


class OlderCoordinatorGoneAtLeave(OlderCoordinator):
    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")


def test_node_check_passes_when_only_leaving_an_older_coordinators_session_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator admitted the node: the Leave after it is no part of the check, so its
    failure must not turn the answer into FAILED (exit 1)."""
    servicer = OlderCoordinatorGoneAtLeave()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        assert check(cfg, monkeypatch) == 0
    captured = capsys.readouterr()
    assert "ok: the coordinator would admit this node (run r," in captured.out
    assert "which could not be left (UNAVAILABLE; it expires unused)" in captured.out
    assert "FAILED" not in captured.err


@pytest.mark.parametrize(
    ("case", "code", "meaning"),
    [
        (
            "wrong CA",
            "UNAVAILABLE",
            "the coordinator's certificate is not from the CA in your ca.pem: get the "
            "federation's ca.pem from its operator",
        ),
        (
            "another name",
            "UNAVAILABLE",
            "the coordinator's certificate does not name coordinator.example (tls_server_name)",
        ),
        ("closed port", "UNAVAILABLE", "nothing listens on 127.0.0.1:"),
        ("role", "PERMISSION_DENIED", "set role = evaluate-only"),
        # blamed the certificates (walkthrough review L4)
        (
            "insecure node",
            "UNAVAILABLE",
            "this node is set to insecure (plain text, `insecure = true` or --insecure) and the "
            "coordinator probably expects TLS: remove insecure",
        ),
    ],
)
def test_node_check_names_the_cause_that_grpc_names(
    fed: Federation,
    other_pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: str,
    meaning: str,
) -> None:
    """The meaning was five possible causes even when gRPC's details named one, and for the
    role refusal it said to check the allow-list and --group."""
    cfg = {
        "wrong CA": config(fed, tls_dir=other_pki.node("node-good-a")),
        "another name": config(fed, tls_server_name="coordinator.example"),
        "closed port": config(fed, coordinator=f"{HOST}:{free_port()}"),
        "role": config(fed, "node-judge", group="Judge"),
        "insecure node": config(fed, insecure=True),
    }[case]
    assert check(cfg, monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"FAILED: {code}: " in err
    assert f"  meaning: {meaning}" in err, err
    assert "check the allow-list" not in err and "wrong address or port, firewall" not in err
    # where the coordinator's certificate fails to verify, what it says is shown beside what
    # the node expects (gRPC says only that it fails)
    shown = {
        "wrong CA": ["names: localhost, 127.0.0.1 (includes 127.0.0.1)", "NOT signed by the CA"],
        "another name": [
            "names: localhost, 127.0.0.1 (does not include coordinator.example)",
            "; signed by the CA in",
        ],
    }.get(case)
    assert ("the coordinator's certificate (not verified" in err) == (shown is not None), err
    for text in shown or []:
        assert text in err, err


@pytest.mark.parametrize("reachable", [True, False])
def test_node_check_closes_its_connection_whatever_the_outcome(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, reachable: bool
) -> None:
    """The check's channel is closed when it passes and when it fails: a health probe running
    `node check` in a loop in one process would otherwise keep a channel (and its threads and
    sockets) per check."""
    closed: list[bool] = []

    class Client(commands_node.NodeClient):
        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr(commands_node, "NodeClient", Client)
    cfg = config(fed) if reachable else config(fed, coordinator=f"{HOST}:{free_port()}")
    assert check(cfg, monkeypatch) == (0 if reachable else 1)
    assert closed == [True]


def test_node_check_first_says_where_it_connects_and_as_which_group(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before it waits on the network the check names the address and group it uses (taken
    from options, environment and config file together): a wrong one is seen at once."""
    cfg = config(fed, coordinator=f"{HOST}:{free_port()}")
    assert check(cfg, monkeypatch) == 1
    assert capsys.readouterr().out.startswith(f"connecting to {cfg.coordinator} as 'Good A' ...\n")


def test_node_settings_come_from_pluralfed_node_environment_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `pluralfed node --help` says, PLURALFED_NODE_<NAME> variables set a node's settings
    (a container is configured so): the check connects where they say, as their group."""
    monkeypatch.setattr(commands_node, "make_encoder", lambda _spec: FakeEncoder())
    address = f"{HOST}:{free_port()}"
    monkeypatch.setenv("PLURALFED_NODE_COORDINATOR", address)
    monkeypatch.setenv("PLURALFED_NODE_GROUP", "From Env")
    monkeypatch.setenv("PLURALFED_NODE_INSECURE", "true")
    assert main(["node", "check"]) == 1  # nobody listens there
    assert capsys.readouterr().out.startswith(f"connecting to {address} as 'From Env' ...")


def test_the_presented_certificate_of_an_ipv6_coordinator_is_set_against_its_bare_address(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinator dialed as [::1]:PORT is checked against the name ::1, as gRPC checks it:
    the brackets are the address's notation, not part of the name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fed.pki.server / "cert.pem", fed.pki.server / "key.pem")
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with listener:

        def serve_one() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True):
                pass

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        port = listener.getsockname()[1]
        commands_node.print_presented_certificate(config(fed, coordinator=f"[::1]:{port}"))
        server.join(10)
    err = capsys.readouterr().err
    assert "names: localhost, 127.0.0.1 (does not include ::1)" in err, err


def test_node_check_says_a_coordinator_answers_a_tls_node_in_plain_text(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The symmetric case of an insecure node: a TLS node against a plain-text coordinator
    (walkthrough review L4) was told its certificates might not match."""
    with stand_in_coordinator(OlderCoordinator()) as port:  # type: ignore[abstract]
        assert check(config(fed, coordinator=f"{HOST}:{port}"), monkeypatch) == 1
    err = capsys.readouterr().err
    assert "WRONG_VERSION_NUMBER" in err, err
    assert (
        f"  meaning: {HOST}:{port} does not speak TLS: the coordinator probably runs insecure"
        in err
    ), err
    assert "certificates do not match" not in err


def test_node_run_says_a_coordinator_answers_a_tls_node_in_plain_text(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """`node run` retries as for a coordinator that is down, but says the likely cause."""
    with stand_in_coordinator(OlderCoordinator()) as port:  # type: ignore[abstract]
        cfg = config(fed, coordinator=f"{HOST}:{port}", give_up_after_s=0.5)
        with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
            assert GroupNode(cfg, WORKER).run() == 1  # type: ignore[arg-type]
    first = messages(caplog, logging.WARNING)[0]
    assert f"meaning: {HOST}:{port} does not speak TLS" in first, first


# --------------------------------------------------------------------------------------------
# 3. node run: why the coordinator is unreachable


@pytest.mark.parametrize(
    ("case", "cause", "meaning"),
    [
        ("closed port", "Connection refused", None),
        ("wrong CA", "CERTIFICATE_VERIFY_FAILED", "is not from the CA in your ca.pem"),
        ("another name", "Hostname Verification Check failed", "does not name coordinator.example"),
    ],
)
def test_an_unreachable_coordinator_is_logged_with_its_address_and_cause(
    fed: Federation,
    other_pki: Pki,
    caplog: pytest.LogCaptureFixture,
    case: str,
    cause: str,
    meaning: str | None,
) -> None:
    """`coordinator unreachable (UNAVAILABLE); retrying in 5.8 s` was all, whether the
    coordinator was down or the node set up wrong."""
    cfg = {
        "closed port": config(fed, coordinator=f"{HOST}:{free_port()}", give_up_after_s=0.5),
        "wrong CA": config(fed, tls_dir=other_pki.node("node-good-a"), give_up_after_s=0.5),
        "another name": config(fed, tls_server_name="coordinator.example", give_up_after_s=0.5),
    }[case]
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert GroupNode(cfg, WORKER).run() == 1  # type: ignore[arg-type]
    first, *later = messages(caplog, logging.WARNING)
    where = f"Good A: coordinator unreachable (UNAVAILABLE) at {cfg.coordinator}: "
    assert first.startswith(where) and cause in first, first
    if meaning is None:
        assert "meaning" not in first
    else:
        assert f"meaning: the coordinator's certificate {meaning}" in first
        assert "`pluralfed node check` says what is wrong" in first
    assert later, "retried once at least"  # the same cause: not said again
    assert all(
        m.startswith(
            f"Good A: coordinator unreachable (UNAVAILABLE) at {cfg.coordinator}, as before; retrying in "
        )
        for m in later
    ), later
    (gave_up,) = messages(caplog, logging.ERROR)
    assert gave_up.startswith("Good A: coordinator unreachable for 0.")  # 0.5 s and one try
    assert "s (give_up_after_s 0.5), giving up: (UNAVAILABLE) " in gave_up, gave_up
    assert f" at {cfg.coordinator}: " in gave_up and cause in gave_up


def test_an_insecure_node_against_a_tls_coordinator_is_told_so_while_it_retries(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """`node run` said only "Socket closed" (node check had the hint)."""
    cfg = config(fed, insecure=True, give_up_after_s=0.5)
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert GroupNode(cfg, WORKER).run() == 1  # type: ignore[arg-type]
    first = next(m for m in messages(caplog, logging.WARNING) if "unreachable" in m)
    assert "Socket closed; meaning: this node is set to insecure" in first, first


def test_a_node_gives_up_when_its_limit_is_reached_not_a_backoff_later(
    fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """With give_up_after_s 1 and a first backoff of 2 s, the node slept 1-3 s before it
    looked at the limit again (up to 1.5 backoff_max_s past it) and then said "1 s"."""
    cfg = config(
        fed,
        coordinator=f"{HOST}:{free_port()}",
        give_up_after_s=1.0,
        backoff_initial_s=2.0,
        backoff_max_s=4.0,
    )
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert GroupNode(cfg, WORKER).run() == 1  # type: ignore[arg-type]
    delays = [float(m.rsplit("retrying in ", 1)[1][:-2]) for m in messages(caplog, logging.WARNING)]
    assert delays and sum(delays) <= 1.05, delays  # the announced sleeps end at the limit
    (gave_up,) = messages(caplog, logging.ERROR)
    assert "(give_up_after_s 1), giving up" in gave_up, gave_up


class UnavailableTwice(UnknownSessionOnce):
    """Admits the node, but its first two polls fail UNAVAILABLE (as a cut link does); then the
    run ends."""

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        if self.polls <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the link was cut")
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)


def test_a_cause_is_told_in_full_again_after_the_node_was_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ "as before" is for retries in a row: once joined, the next failure is news."""
    with stand_in_coordinator(UnavailableTwice(new_run=False)) as port:  # type: ignore[abstract]
        cfg = NodeConfig(
            coordinator=f"{HOST}:{port}", group="G", insecure=True, backoff_initial_s=0.05
        )
        with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
            assert GroupNode(cfg, WORKER).run() == 0  # type: ignore[arg-type]
    unreachable = [m for m in messages(caplog, logging.WARNING) if "unreachable" in m]
    told = f"G: coordinator unreachable (UNAVAILABLE) at {cfg.coordinator}: the link was cut; "
    assert len(unreachable) == 2 and all(m.startswith(told) for m in unreachable), unreachable


# --------------------------------------------------------------------------------------------
# 6. what loading the data skipped


def write_survey(path: Path, rows: list[tuple[str, list[int]]]) -> Path:
    """Group G's rows (question, distribution over two options) as a JSONL file."""
    path.write_text(
        "".join(
            json.dumps({"group": "G", "question": q, "options": ["a", "b"], "distribution": d})
            + "\n"
            for q, d in rows
        )
    )
    return path


def node_run(data: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> int:
    """`pluralfed node run` for group G (a stand-in encoder, no signal handlers) against a port
    where nobody listens: it loads, embeds, tries, and gives up at once (exit 1)."""
    monkeypatch.setattr(commands_node, "open_encoder", lambda _cfg: FakeEncoder())
    monkeypatch.setattr(commands_node, "stop_on_signals", lambda _node: None)
    argv = ["node", "run", "--group", "G", "--data", str(data), *options]
    return main([*argv, "--coordinator", f"{HOST}:{free_port()}", "--give-up-after-s", "0.1"])


def test_node_run_logs_what_loading_its_data_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeated questions and all-zero rows were noted by the loader, but only `pluralfed data
    inspect` showed it: `node run` said nothing."""
    rows = [(f"Question {i}?", [1, 3]) for i in range(20)]
    rows += [("Question 0?", [2, 2])] * 5 + [("Question 99?", [0, 0])]
    data = write_survey(tmp_path / "g.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert node_run(data, monkeypatch, "--insecure") == 1
    skipped, notes = [m for m in messages(caplog, logging.WARNING) if f"data {data}" in m]
    assert skipped == f"G: data {data}: skipped 1 all-zero distribution(s)"
    assert notes.startswith(f"G: data {data}: 5 note(s) from loading: {data}:21: duplicate")
    assert notes.count("duplicate question for group 'G' (first at line 1); kept the first") == 3
    assert notes.endswith(f"; and 2 more (`pluralfed data inspect {data}` lists them)")
    # three notes are all shown: nothing more to point to
    rows = [(f"Question {i}?", [1, 3]) for i in range(20)] + [("Question 0?", [2, 2])] * 3
    data = write_survey(tmp_path / "three.jsonl", rows)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert node_run(data, monkeypatch, "--insecure") == 1
    (notes,) = [m for m in messages(caplog, logging.WARNING) if f"data {data}" in m]
    assert notes.startswith(f"G: data {data}: 3 note(s) from loading: ")
    assert notes.endswith("kept the first"), notes


def test_node_run_loads_and_notes_only_its_own_groups_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file holding other groups' rows too (the full GlobalOpinionQA CSV, say): the node
    loads its own group only, so another group's all-zero or repeated rows are not its notes."""
    data = write_survey(tmp_path / "g.jsonl", [(f"Question {i}?", [1, 3]) for i in range(20)])
    other = [("Question 0?", [0, 0]), ("Question 1?", [1, 1]), ("Question 1?", [2, 1])]
    with data.open("a") as file:
        for question, distribution in other:
            row = {"group": "H", "question": question, "options": ["a", "b"]}
            file.write(json.dumps({**row, "distribution": distribution}) + "\n")
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert node_run(data, monkeypatch, "--insecure") == 1
    assert [m for m in messages(caplog, logging.WARNING) if f"data {data}" in m] == []


def test_node_run_samples_its_episodes_with_the_seed_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--seed reaches the worker that draws this node's training episodes (the default seed 0
    hid a worker built with seed 0 whatever the setting)."""
    seeds: list[int] = []

    class Worker(commands_node.GroupWorker):
        def __init__(self, group: str, data: Any, encoder: Any, seed: int = 0) -> None:
            seeds.append(seed)
            super().__init__(group, data, encoder, seed=seed)

    monkeypatch.setattr(commands_node, "GroupWorker", Worker)
    data = write_survey(tmp_path / "g.jsonl", [(f"Question {i}?", [1, 3]) for i in range(20)])
    assert node_run(data, monkeypatch, "--insecure", "--seed", "11") == 1
    assert seeds == [11]


def test_node_run_stops_on_sigterm_with_exit_code_143(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`node run` installs the stop handlers before the node runs: a SIGTERM (`docker stop`)
    then ends it with 143, not with the default action (no Leave, no exit code of its own)."""
    monkeypatch.setattr(commands_node, "open_encoder", lambda _cfg: FakeEncoder())

    class Node(commands_node.GroupNode):
        def run(self) -> int:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
                return 99  # no handler: raising SIGTERM here would end the test process
            signal.raise_signal(signal.SIGTERM)
            return super().run()

    monkeypatch.setattr(commands_node, "GroupNode", Node)
    data = write_survey(tmp_path / "g.jsonl", [(f"Question {i}?", [1, 3]) for i in range(20)])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        argv = ["node", "run", "--insecure", "--group", "G", "--data", str(data)]
        assert main([*argv, "--coordinator", f"{HOST}:{free_port()}"]) == 143
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# 8. a private key others may read


def key_mode_warnings(
    fed: Federation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: int,
) -> tuple[Path, list[str]]:
    """`node run` with a copy of a node's credentials whose key has `mode`: the key's path and
    the key-mode warnings logged (the node runs, finds no coordinator and gives up)."""
    folder = tmp_path / "certs"
    shutil.copytree(fed.pki.node("node-good-a"), folder)
    (folder / "key.pem").chmod(mode)
    data = write_survey(tmp_path / "g.jsonl", [(f"Question {i}?", [1, 3]) for i in range(20)])
    with caplog.at_level(logging.WARNING):
        assert node_run(data, monkeypatch, "--tls-dir", str(folder)) == 1  # ran, gave up
    warned = [
        r.getMessage() for r in caplog.records if "readable by group/others" in r.getMessage()
    ]
    return folder / "key.pem", warned


def test_a_key_others_may_read_is_warned_about_once(
    fed: Federation,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`node run` loads its credentials twice (checked before the data is embedded, then for
    its channel) and warned twice; still a warning, not a refusal (containers mount keys with
    other modes)."""
    key, warned = key_mode_warnings(fed, tmp_path, monkeypatch, caplog, 0o644)
    assert warned == [
        f"private key {key} is readable by group/others (mode 0644); run: chmod 600 {key}"
    ]


# --------------------------------------------------------------------------------------------
# 5. in a container (Docker review, session 20): its localhost, its paths


@pytest.fixture
def in_a_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process runs in a container, as Podman marks one (Docker's marker is /.dockerenv)."""
    marker = tmp_path / "run" / ".containerenv"
    marker.parent.mkdir()
    marker.write_text("")
    monkeypatch.setattr(pluralfed.fsutil, "CONTAINER_MARKERS", (tmp_path / ".dockerenv", marker))


CONTAINER_NOTE = (
    "this node runs in a container: unless it shares the host's network (`docker run --network "
    "host`), {host} there is the container itself, not the host: run it with `--network host`, "
    "or dial the host's address"
)


@pytest.mark.parametrize("host", [HOST, "localhost"])
def test_node_check_in_a_container_says_its_localhost_is_the_container(
    fed: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    in_a_container: None,
    host: str,
) -> None:
    """`docker run` without `--network host` and a coordinator at localhost: "nothing listens on
    localhost:7543: wrong address or port, or the coordinator is down", where the cause is that
    localhost is the container itself."""
    port = free_port()
    assert check(config(fed, coordinator=f"{host}:{port}"), monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"  meaning: nothing listens on {host}:{port}: wrong address or port" in err, err
    assert CONTAINER_NOTE.format(host=host) in err, err


def test_node_run_in_a_container_says_its_localhost_is_the_container(
    fed: Federation, caplog: pytest.LogCaptureFixture, in_a_container: None
) -> None:
    """`node run` retries for ever by default: its log says why a loopback address fails."""
    cfg = config(fed, coordinator=f"{HOST}:{free_port()}", give_up_after_s=0.5)
    with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
        assert GroupNode(cfg, WORKER).run() == 1  # type: ignore[arg-type]
    first = messages(caplog, logging.WARNING)[0]
    assert "Connection refused" in first, first
    assert f"; meaning: nothing listens on {cfg.coordinator}: " in first, first
    assert CONTAINER_NOTE.format(host=HOST) in first, first


def test_a_container_note_only_for_a_loopback_address_in_a_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = "failed to connect to all addresses; last error: ... Connection refused"
    in_container = {"coordinator.example:7443": False, "10.0.0.1:7443": False}
    loopback = ["localhost:7443", "127.0.0.1:7443", "127.0.0.2:7443", "[::1]:7443"]
    loopback.append("coordinator.localhost:7443")  # *.localhost is loopback too (RFC 6761)
    in_container |= {address: True for address in [*loopback, "LocalHost.:7443"]}
    for address, noted in in_container.items():
        cfg = NodeConfig(coordinator=address, group="G")
        assert "container" not in (connection_hint(refused, cfg) or ""), address  # no marker
        marker = tmp_path / ".dockerenv"
        marker.write_text("")
        monkeypatch.setattr(pluralfed.fsutil, "CONTAINER_MARKERS", (marker,))
        hint = connection_hint(refused, cfg) or ""
        assert hint.startswith(f"nothing listens on {address}: "), hint
        assert ("runs in a container" in hint) == noted, address
        monkeypatch.setattr(pluralfed.fsutil, "CONTAINER_MARKERS", ())


def test_an_expired_coordinator_certificate_is_told_apart_from_another_cas() -> None:
    """BoringSSL's verify failure says why: an expired coordinator certificate is the
    operator's to renew; the node's ca.pem is not the one to change."""
    cfg = NodeConfig(coordinator=f"{HOST}:7443", group="G")
    failed = "Handshake failed: SSL_ERROR_SSL: ... CERTIFICATE_VERIFY_FAILED"
    assert connection_hint(f"{failed}: certificate has expired", cfg) == (
        "the coordinator's certificate has expired: tell the federation's operator"
    )
    other = connection_hint(f"{failed}: unable to get local issuer certificate", cfg) or ""
    assert other.startswith("the coordinator's certificate is not from the CA in your ca.pem")


def test_the_key_mode_warning_in_a_container_says_the_path_is_the_containers(
    tmp_path: Path,
    fed: Federation,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    in_a_container: None,
) -> None:
    """ "run: chmod 600 /certs/node-nigeria/key.pem" named a file mounted read-only into the
    container: the mode to fix is the host file's."""
    key, warned = key_mode_warnings(fed, tmp_path, monkeypatch, caplog, 0o640)
    assert warned == [
        f"private key {key} is readable by group/others (mode 0640); run: chmod 600 {key} (a "
        "path inside this container: chmod the file you mounted there, on the host)"
    ]
