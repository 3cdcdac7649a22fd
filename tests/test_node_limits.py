"""What one allow-listed node may take from the coordinator, and what it may claim: a node with a
valid certificate must not be able to hold every RPC thread (upload streams that never send a
header), hold every stream slot (by joining again before each stalled upload), pick a role the
federation did not give it, or keep calling on an open connection after its certificate
expired; nor fill the log by being refused in a loop. Real coordinator server, real nodes'
RPCs over mutual TLS on 127.0.0.1 (security review, session 16)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
from fedharness import HOST, FakeNode, Pki, reject_name, rpc_error, update_messages, wait_until

import pluralfed.auth as auth_module
import pluralfed.logthrottle as logthrottle_module
from coordinator.rounds import RoundEngine
from coordinator.server import (
    MAX_CALLS_PER_NODE,
    MAX_STREAMS_PER_CONNECTION,
    FederationServicer,
    start_server,
)
from coordinator.service import CoordinatorConfig, check_roles
from coordinator.sessions import Role
from coordinator.settings import RoundSettings
from coordinator.streams import StreamSlots
from coordinator.validation import Rejection
from pluralfed import tls
from pluralfed.auth import AllowList, RefusalLog
from pluralfed.config import ConfigValueError, load_config
from pluralfed.errors import InputError
from pluralfed.logthrottle import LogThrottle
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.tls import TlsFiles
from pluralfed.transport import StreamDeadlines, grpc_options

pytestmark = pytest.mark.timeout(120)

ENC = "enc"
NODES = {"node-a": "A", "node-b": "B", "node-h": "H"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    for identity in NODES:
        pki.node(identity)
    return pki


class Coordinator:
    def __init__(
        self, tmp: Path, pki: Pki, settings: RoundSettings, max_workers: int = 32, **server: Any
    ) -> None:
        self.engine = RoundEngine(settings, {"w": np.zeros(1000, np.float32)}, tmp, ENC, {})
        self.server, self.port = start_server(
            self.engine,
            f"{HOST}:0",
            TlsFiles.from_dir(pki.server),
            AllowList(NODES),
            max_workers=max_workers,
            **server,
        )
        threading.Thread(target=self.engine.run, daemon=True).start()

    def node(self, pki: Pki, identity: str) -> FakeNode:
        return FakeNode(self.port, NODES[identity], tls_dir=pki.node(identity))

    def close(self) -> None:
        self.engine.stop()
        self.server.stop(None)


def connections(coord: Coordinator, pki: Pki, identity: str, n: int) -> list[grpc.Channel]:
    """`n` channels with the certificate of `identity`, each its own connection (channels alike
    would share one): the calls a node may have in flight are counted over all of them, while
    the streams of one connection are bounded besides (MAX_STREAMS_PER_CONNECTION)."""
    credentials = TlsFiles.from_dir(pki.node(identity)).channel_credentials()
    options = [
        *tls.channel_options("localhost"),
        *grpc_options(),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [
        grpc.secure_channel(f"{HOST}:{coord.port}", credentials, options=options) for _ in range(n)
    ]


def silent(release: threading.Event) -> Iterator[pb.UpdateChunk]:
    release.wait(60)  # not even a header: a hostile node holding the stream open
    yield from ()


def test_one_node_cannot_hold_every_rpc_thread(tmp_path: Path, pki: Pki) -> None:
    settings = RoundSettings(rounds=1, min_nodes=3, eval_every=0, session_timeout_s=60.0)
    coord = Coordinator(tmp_path, pki, settings)
    release = threading.Event()
    attacker, honest = coord.node(pki, "node-a"), coord.node(pki, "node-b")
    channels = connections(coord, pki, "node-a", 5)
    streams = []
    try:
        honest.join(ENC)
        # before: 64 header-less uploads took every RPC thread; B's heartbeat timed out and its
        # session expired. 8 on each of 5 connections: the limit is the node's, not a
        # connection's
        streams = [
            pb_grpc.FederationStub(channel).UploadUpdate.future(silent(release))
            for channel in channels
            for _ in range(8)
        ]
        wait_until(
            lambda: sum(s.done() for s in streams) >= len(streams) - MAX_CALLS_PER_NODE,
            30,
            "the calls past the limit to be refused",
        )
        time.sleep(0.5)  # and no more than those
        refused = [s for s in streams if s.done()]
        assert len(refused) == len(streams) - MAX_CALLS_PER_NODE
        for call in refused:
            err = call.exception()
            assert (
                isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            assert "calls with this certificate are already in flight" in str(err.details())
        started = time.monotonic()
        for _ in range(5):
            assert not honest.heartbeat().cancel_task
        assert time.monotonic() - started < 5.0
        # once the node's streams end, it may call again
        release.set()
        wait_until(lambda: all(s.done() for s in streams), 30, "the silent streams to end")
        assert attacker.join(ENC).session_id
    finally:
        release.set()
        for channel in channels:
            channel.close()
        attacker.close()
        honest.close()
        coord.close()


def header_then_silence(first: pb.UpdateChunk, release: threading.Event) -> Iterator[Any]:
    yield first
    release.wait(60)


def test_joining_again_does_not_keep_the_old_sessions_streams(tmp_path: Path, pki: Pki) -> None:
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=1, eval_every=0, round_timeout_s=20.0
    )
    slots = StreamSlots(4)
    coord = Coordinator(tmp_path, pki, settings, upload_slots=slots)
    release = threading.Event()
    a, b = coord.node(pki, "node-a"), coord.node(pki, "node-b")
    try:
        a.join(ENC)
        b.join(ENC)
        tb = b.wait_task(pb.TASK_KIND_TRAIN)
        stalled = []
        for i in range(4):
            if i:
                a.join(ENC)  # a new session, which takes the old one's place in the round
            ta = a.wait_task(pb.TASK_KIND_TRAIN)
            mine = update_messages(a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
            stalled.append(a.stub.UploadUpdate.future(header_then_silence(mine[0], release)))
            wait_until(
                lambda: sum(not s.done() for s in stalled) == 1 and slots.active == 1,
                20,
                "the new session's upload to replace the old one's",
            )
        # before: each session kept its stalled upload, 4 of 4 slots; B's update was never read
        assert slots.active == 1
        for old in stalled[:-1]:
            err = old.exception(timeout=10)
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.CANCELLED
        theirs = update_messages(b.session_id, tb, {"w": np.full(1000, 2.0, np.float32)}, 10)
        reply = b.upload(theirs)
        assert reply.accepted, reject_name(reply)
        # the current session sends its update again: it replaces its own stalled upload
        again = a.stub.UploadUpdate(iter(mine), timeout=10)
        assert again.accepted, reject_name(again)
        err = stalled[-1].exception(timeout=10)
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.CANCELLED
    finally:
        release.set()
        a.close()
        b.close()
        coord.close()


def test_a_node_joins_only_in_the_role_the_federation_gave_it(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RoundSettings(rounds=1, min_nodes=1, eval_every=0, evaluate_only=("H",))
    coord = Coordinator(tmp_path, pki, settings)
    held_out, trainer = coord.node(pki, "node-h"), coord.node(pki, "node-a")
    try:
        # before: a held-out group joined as a trainer claiming 1,000,000 examples and its
        # update was averaged in
        err = rpc_error(held_out.join, ENC, 1_000_000)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'H' may only join as evaluate-only" in str(err.details())
        err = rpc_error(trainer.join, ENC, role=pb.ROLE_EVALUATE_ONLY)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'A' may only join as train" in str(err.details())
        # the operator is told too (before: only "not connected: A" while waiting for a
        # quorum), once however often the node tries again
        with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
            for _ in range(3):
                rpc_error(trainer.join, ENC, role=pb.ROLE_EVALUATE_ONLY)
        lines = [r.getMessage() for r in caplog.records if "join of group 'A'" in r.getMessage()]
        assert len(lines) == 1 and "may only join as train" in lines[0], lines
        assert held_out.join(ENC, role=pb.ROLE_EVALUATE_ONLY).session_id
        assert trainer.join(ENC).session_id
    finally:
        held_out.close()
        trainer.close()
        coord.close()


def test_without_evaluate_only_each_node_says_its_role(tmp_path: Path) -> None:
    engine = RoundEngine(RoundSettings(), {"w": np.zeros(2, np.float32)}, tmp_path, ENC, {})
    assert engine.join("H", Role.TRAIN, 5, ENC, "test").role == Role.TRAIN
    assert engine.join("H", Role.EVALUATE_ONLY, 0, ENC, "test").role == Role.EVALUATE_ONLY
    strict = RoundEngine(
        RoundSettings(evaluate_only=()), {"w": np.zeros(2, np.float32)}, tmp_path / "s", ENC, {}
    )
    with pytest.raises(Rejection, match="may only join as train"):
        strict.join("H", Role.EVALUATE_ONLY, 0, ENC, "test")


def test_evaluate_only_is_checked_where_it_is_set(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('evaluate_only = ["China", "New Zealand"]\n')
    loaded = load_config(CoordinatorConfig, config, "PLURALFED_COORDINATOR_", {}, environ={})
    assert loaded.evaluate_only == ("China", "New Zealand")
    env = {"PLURALFED_COORDINATOR_EVALUATE_ONLY": '["Korea, South"]'}
    from_env = load_config(CoordinatorConfig, None, "PLURALFED_COORDINATOR_", {}, environ=env)
    assert from_env.evaluate_only == ("Korea, South",)
    with pytest.raises(InputError, match=r"PLURALFED_COORDINATOR_EVALUATE_ONLY.*JSON array"):
        load_config(
            CoordinatorConfig,
            None,
            "PLURALFED_COORDINATOR_",
            {},
            environ={"PLURALFED_COORDINATOR_EVALUATE_ONLY": "China, Japan"},
        )
    with pytest.raises(ConfigValueError, match="more than once"):
        RoundSettings(evaluate_only=("H", "H"))
    allow = AllowList({"node-a": "A", "node-h": "H"})
    with pytest.raises(ConfigValueError, match=r"\['Hh'\], which the allow-list does not admit"):
        check_roles(CoordinatorConfig(evaluate_only=("Hh",)), allow)
    with pytest.raises(ConfigValueError, match=r"leaves 0 allow-listed group\(s\) to train"):
        check_roles(CoordinatorConfig(evaluate_only=("A", "H")), allow)
    with pytest.raises(ConfigValueError, match=r"fewer than min_nodes \(2\)"):
        check_roles(CoordinatorConfig(evaluate_only=("H",), min_nodes=2, min_updates=1), allow)
    check_roles(CoordinatorConfig(evaluate_only=("H",)), allow)


def test_an_expired_certificate_is_refused_on_an_open_connection(tmp_path: Path, pki: Pki) -> None:
    coord = Coordinator(tmp_path, pki, RoundSettings(rounds=1, min_nodes=3, eval_every=0))
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    short = pki.node("node-a", folder="node-a-short", not_after=expires)
    node = FakeNode(coord.port, "A", tls_dir=short)
    try:
        assert node.join(ENC).session_id
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.5)
        # before: the connection kept open by keepalive outlived the certificate
        err = rpc_error(node.join, ENC)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired at" in str(err.details()) and "renew it" in str(err.details())
    finally:
        node.close()
        coord.close()


def test_repeated_refusals_are_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog(interval_s=0.5)
    with caplog.at_level(logging.WARNING, logger="pluralfed.auth"):
        for _ in range(1000):
            refusals.log("/m", "node-r", "ipv4:127.0.0.1:5000", "certificate revoked")
        refusals.log("/m", "node-s", "ipv4:127.0.0.1:5001", "certificate revoked")  # another
        time.sleep(0.6)
        refusals.log("/m", "node-r", "ipv4:127.0.0.1:5002", "certificate revoked")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "identity=node-r" in lines[0] and "more like it" not in lines[0]
    assert "identity=node-s" in lines[1]
    assert "(999 more like it in the last" in lines[2]


class _Call:
    """A call's context as CallLimit sees it: whether gRPC still runs it."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


def test_the_call_limit_counts_each_callers_calls_in_flight() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        auth_module.CallLimit(0)
    limit = auth_module.CallLimit(2)
    first, second, third = _Call(), _Call(), _Call()
    assert limit.enter("A", first) and limit.enter("A", second)
    assert not limit.enter("A", third)  # the third at once is refused
    assert limit.enter("B", third)  # another caller has its own count
    assert limit.in_flight("A") == 2
    limit.leave("A", first)
    assert limit.enter("A", third)
    # a call that ended without the guard seeing it (gRPC dropped it) stops counting
    second.active = False
    assert limit.in_flight("A") == 1
    fourth = _Call()  # held: the limit keeps contexts weakly, as gRPC's calls go away
    assert limit.enter("A", fourth)
    assert not limit.enter("A", _Call())


def test_a_caller_without_identity_is_one_caller_whatever_its_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused caller with no identity is known by its address without the port (a new one
    each connection), and each reason it is refused for is logged on its own."""
    refusals = RefusalLog(interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="pluralfed.auth"):
        for port in range(5000, 5100):  # reconnecting in a loop: one line, not one a port
            refusals.log("/m", None, f"ipv4:10.0.0.7:{port}", "transport 'insecure' is not TLS")
        refusals.log("/m", None, "ipv4:10.0.0.8:5000", "transport 'insecure' is not TLS")
        refusals.log("/m", None, "ipv4:10.0.0.7:6000", "undecodable JoinRequest")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "identity=- peer=ipv4:10.0.0.7:5000" in lines[0] and "not TLS" in lines[0]
    assert "peer=ipv4:10.0.0.8:5000" in lines[1]
    assert "peer=ipv4:10.0.0.7:6000" in lines[2] and "undecodable JoinRequest" in lines[2]


def test_a_line_repeated_without_pause_is_still_logged_once_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The minute counts from the last line logged, not from the last one left out: a client
    refused several times a minute for hours is still seen once a minute, with how many of its
    lines were left out (on a clock the test moves, so no sleep and no timing)."""
    clock = [1000.0]
    monkeypatch.setattr(
        logthrottle_module, "time", type("Clock", (), {"monotonic": lambda: clock[0]})
    )
    throttle = LogThrottle(interval_s=60.0)
    said: list[tuple[float, str | None]] = []
    for at in (0.0, 30.0, 59.0, 61.0, 100.0, 120.0, 121.0):
        clock[0] = 1000.0 + at
        said.append((at, throttle.admit("node-r")))
    assert said == [
        (0.0, ""),
        (30.0, None),
        (59.0, None),
        (61.0, " (2 more like it in the last 61 s)"),
        (100.0, None),
        (120.0, None),
        (121.0, " (2 more like it in the last 60 s)"),
    ]
    assert throttle.admit("node-s") == ""  # each key has its own minute
    assert throttle.admit("node-s") is None
    clock[0] += 60.0
    assert throttle.admit("node-s") == " (1 more like it in the last 60 s)"  # one left out, too


def test_the_throttle_remembers_a_bounded_number_of_keys_then_starts_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that makes up a new key per call (a new port, a new name) must not grow the
    throttle's memory without end: at MAX_KEYS keys it forgets them all, so each key's next
    line is logged again (a line more, no more). `forget` does the same at once."""
    monkeypatch.setattr(
        logthrottle_module, "time", type("Clock", (), {"monotonic": lambda: 1000.0})
    )
    throttle = LogThrottle(interval_s=60.0)
    monkeypatch.setattr(throttle, "MAX_KEYS", 3)
    assert [throttle.admit(k) for k in ("a", "b", "c")] == ["", "", ""]
    assert throttle.admit("a") is None  # remembered: within its minute
    assert throttle.admit("d") == ""  # a 4th key: the memory of 3 starts afresh
    assert throttle.admit("a") == ""
    assert throttle.admit("a") is None
    throttle.forget()
    assert throttle.admit("a") == ""


def test_the_first_line_is_logged_however_early_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """time.monotonic() may start near 0 (a machine just booted): a key never seen has no
    last line, so its first one is logged even within the first minute of the clock."""
    monkeypatch.setattr(logthrottle_module, "time", type("Clock", (), {"monotonic": lambda: 5.0}))
    assert LogThrottle(interval_s=60.0).admit("node-q") == ""


def no_request(release: threading.Event) -> Iterator[bytes]:
    release.wait(60)  # the call's headers, and never its request
    yield from ()


CHECK = "/grpc.health.v1.Health/Check"


def failure(call: grpc.Future) -> grpc.RpcError:
    """The RpcError a finished call ended with; fails the test if it succeeded."""
    err = call.exception()
    assert isinstance(err, grpc.RpcError), f"the call ended with {err!r}, not an RPC error"
    return err


def held_calls(
    channels: list[grpc.Channel], method: str, each: int, release: threading.Event
) -> list[grpc.Future]:
    """`each` calls of `method` on every channel that send their headers and never their
    request (until `release`)."""
    return [
        channel.stream_unary(
            method, request_serializer=lambda m: m, response_deserializer=lambda b: b
        ).future(no_request(release))
        for channel in channels
        for _ in range(each)
    ]


def close_all(channels: list[grpc.Channel], *others: FakeNode | Coordinator) -> None:
    for channel in channels:
        channel.close()
    for other in others:
        other.close()


def assert_heartbeats_served(node: FakeNode, within_s: float) -> None:
    """Three heartbeats of an honest node, answered within `within_s` in all."""
    started = time.monotonic()
    for _ in range(3):
        assert not node.heartbeat().cancel_task
    assert time.monotonic() - started < within_s


@pytest.mark.parametrize("identity", ["node-a", "node-stranger"])
def test_calls_that_never_send_their_request_hold_no_thread(
    tmp_path: Path, pki: Pki, identity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC's own unary handling waits for the request before any check runs: 40 Heartbeats
    that never sent theirs held every RPC thread, from an allow-listed certificate or from one
    the allow-list does not name (session 16 review). Now the caller is checked and counted
    first, and the request is awaited at most REQUEST_TIMEOUT_S. (8 calls on each of 5
    connections: one connection's streams are bounded besides.)"""
    monkeypatch.setattr(auth_module, "REQUEST_TIMEOUT_S", 2.0)
    coord = Coordinator(tmp_path, pki, RoundSettings(rounds=1, min_nodes=3, eval_every=0))
    release = threading.Event()
    honest = coord.node(pki, "node-b")
    channels = connections(coord, pki, identity, 5)
    try:
        honest.join(ENC)
        calls = held_calls(channels, "/pluralfed.v1.Federation/Heartbeat", 8, release)
        assert_heartbeats_served(honest, within_s=5.0)
        wait_until(lambda: all(c.done() for c in calls), 30, "every held call to end")
        codes = {failure(c).code() for c in calls}
        if identity == "node-a":  # allow-listed: 8 wait for their request (then cut), 32 refused
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        else:  # refused before anything waits
            assert codes == {grpc.StatusCode.PERMISSION_DENIED}
    finally:
        release.set()
        close_all(channels, honest, coord)


class CountedDeadlines(StreamDeadlines):
    """The guard's deadlines on awaited requests, counting how many calls wait at once."""

    made: ClassVar[list[CountedDeadlines]] = []

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.waiting = self.peak = 0
        self._count = threading.Lock()
        CountedDeadlines.made.append(self)

    @contextlib.contextmanager
    def watch(self, context: grpc.RpcContext, seconds: float) -> Iterator[None]:
        with self._count:
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
        try:
            with super().watch(context, seconds):
                yield
        finally:
            with self._count:
                self.waiting -= 1


def test_one_connection_gets_a_bounded_number_of_streams(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC set no bound on the streams of one connection: 100 health Checks that never sent
    their request, on one connection (the one call any certificate of the CA may make, so no
    per-node call limit), held all 32 RPC threads until their requests' deadline, and another
    node's heartbeat waited behind them (review, session 22). Now at most
    MAX_STREAMS_PER_CONNECTION of them reach the coordinator; the rest wait or are refused.
    (Exempt calls are bounded server-wide besides, MAX_EXEMPT_CALLS: lifted here, so that
    the streams' bound alone is seen.)"""
    monkeypatch.setattr(auth_module, "REQUEST_TIMEOUT_S", 4.0)
    monkeypatch.setattr(auth_module, "MAX_EXEMPT_CALLS", 1000)
    monkeypatch.setattr(auth_module, "StreamDeadlines", CountedDeadlines)
    CountedDeadlines.made.clear()
    coord = Coordinator(tmp_path, pki, RoundSettings(rounds=1, min_nodes=3, eval_every=0))
    [deadlines] = CountedDeadlines.made  # the coordinator's auth guard's
    release = threading.Event()
    honest = coord.node(pki, "node-b")
    attacker = coord.node(pki, "node-a")
    try:
        honest.join(ENC)
        calls = held_calls([attacker.channel], CHECK, 100, release)
        wait_until(lambda: deadlines.waiting >= MAX_STREAMS_PER_CONNECTION, 10, "held Checks")
        time.sleep(0.5)
        # before: every one of the 32 RPC threads waited for a Check's request
        assert deadlines.peak == MAX_STREAMS_PER_CONNECTION < 32
        assert_heartbeats_served(honest, within_s=2.0)  # another connection is served
        assert sum(not c.done() for c in calls) >= MAX_STREAMS_PER_CONNECTION  # still held
    finally:
        release.set()
        attacker.close()
        honest.close()
        coord.close()


def test_health_checks_from_many_connections_hold_a_few_threads_at_most(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health Check is open to any certificate of the CA (allow-listed or not, even a
    revoked one), and waits on an RPC thread for its request: Checks that never sent theirs,
    16 on each of 5 connections, held every thread, and an honest node's heartbeats waited
    ~10 s (review, session 22). Now at most MAX_EXEMPT_CALLS wait at once, server-wide; the
    rest are refused at once, and a Check is served again once the flood ends."""
    monkeypatch.setattr(auth_module, "REQUEST_TIMEOUT_S", 4.0)
    monkeypatch.setattr(auth_module, "StreamDeadlines", CountedDeadlines)
    CountedDeadlines.made.clear()
    coord = Coordinator(tmp_path, pki, RoundSettings(rounds=1, min_nodes=3, eval_every=0))
    [deadlines] = CountedDeadlines.made
    release = threading.Event()
    honest = coord.node(pki, "node-b")
    channels = connections(coord, pki, "node-stranger", 5)
    try:
        honest.join(ENC)
        calls = held_calls(channels, CHECK, MAX_STREAMS_PER_CONNECTION, release)
        wait_until(lambda: sum(c.done() for c in calls) >= 40, 10, "Checks refused")
        time.sleep(0.5)
        # before: all 32 RPC threads waited for a Check's request
        assert deadlines.peak == auth_module.MAX_EXEMPT_CALLS == 4
        assert_heartbeats_served(honest, within_s=2.0)
        wait_until(lambda: all(c.done() for c in calls), 20, "every held Check to end")
        codes = [failure(c).code() for c in calls]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 5 * 16 - 4 - 8
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        # over: a health checker's Check is served
        reply = channels[0].unary_unary(
            CHECK,
            request_serializer=lambda m: m,
            response_deserializer=lambda b: b,
        )(b"", timeout=5)
        assert reply == b"\x08\x01"  # HealthCheckResponse(status=SERVING)
    finally:
        release.set()
        close_all(channels, honest, coord)


def test_calls_past_four_per_rpc_thread_are_refused_at_once_not_queued(
    tmp_path: Path, pki: Pki
) -> None:
    """The server-wide bound on calls in flight (maximum_concurrent_rpcs, four per RPC thread:
    8 here, with 2 threads): past it a call is refused RESOURCE_EXHAUSTED at once, not queued
    behind the running ones without bound, its caller waiting ever longer. Eight header-less
    uploads of two nodes (within each node's own limit) fill it; a third node's heartbeat is
    refused."""
    settings = RoundSettings(rounds=1, min_nodes=9, eval_every=0)
    coord = Coordinator(tmp_path, pki, settings, max_workers=2)
    release = threading.Event()
    a, b, h = (coord.node(pki, identity) for identity in ("node-a", "node-b", "node-h"))
    try:
        h.join(ENC)
        streams = [
            node.stub.UploadUpdate.future(silent(release)) for node in (a, b) for _ in range(4)
        ]
        beat = pb.HeartbeatRequest(session_id=h.session_id)

        def beat_refused() -> bool:
            """Whether H's heartbeat is refused RESOURCE_EXHAUSTED (not served, not queued)."""
            try:
                h.stub.Heartbeat(beat, timeout=2)
            except grpc.RpcError as err:
                return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

        time.sleep(1.0)  # the eight come in: two on the RPC threads, six waiting for one
        wait_until(beat_refused, 15, "a call past the bound to be refused")
        assert beat_refused()  # again: refused, not queued until its deadline (2 s)
        assert sum(not s.done() for s in streams) >= 6  # while the uploads in flight go on
    finally:
        release.set()
        close_all([], a, b, h, coord)


def test_a_long_poll_whose_caller_went_away_frees_its_thread(tmp_path: Path, pki: Pki) -> None:
    """A GetTask held for its `wait` ends soon after its caller goes away (the poll looks
    whether its call is still active every heartbeat interval), not when the wait is over:
    nodes that restart, or cut their polls short, would otherwise hold an RPC thread each for
    up to a minute. Both RPC threads here are taken by polls that their nodes then cancel; a
    third node's heartbeat is served within seconds."""
    settings = RoundSettings(rounds=1, min_nodes=9, eval_every=0, heartbeat_interval_s=0.5)
    coord = Coordinator(tmp_path, pki, settings, max_workers=2)
    a, b, h = (coord.node(pki, identity) for identity in ("node-a", "node-b", "node-h"))
    try:
        for node in (a, b, h):
            node.join(ENC)
        polls = []
        for node in (a, b):
            request = pb.GetTaskRequest(session_id=node.session_id)
            request.wait.FromSeconds(40)
            polls.append(node.stub.GetTask.future(request, timeout=60))
        time.sleep(1.0)  # both polls hold an RPC thread
        for poll in polls:
            poll.cancel()
        started = time.monotonic()
        h.stub.Heartbeat(pb.HeartbeatRequest(session_id=h.session_id), timeout=10)
        assert time.monotonic() - started < 5.0
    finally:
        close_all([], a, b, h, coord)


def test_a_replaced_sessions_upload_never_cancels_the_current_one(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload of session S1 checked just before its node joined again (S2) and started S2's
    upload must not cancel S2's: only the session the engine still knows runs (review)."""
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=1, eval_every=0, round_timeout_s=30.0
    )
    slowed_session: dict[str, str] = {}
    checked = FederationServicer._refuse_upload

    def slow_check(self: FederationServicer, h: Any, caller: Any, context: Any) -> Any:
        refusal = checked(self, h, caller, context)
        if h.session_id == slowed_session.get("id") and not slowed_session.get("slowed"):
            slowed_session["slowed"] = "yes"
            time.sleep(3)  # S1's upload is past its check; the node joins again meanwhile
        return refusal

    monkeypatch.setattr(FederationServicer, "_refuse_upload", slow_check)
    coord = Coordinator(tmp_path, pki, settings, upload_slots=StreamSlots(4))
    release = threading.Event()
    a, b = coord.node(pki, "node-a"), coord.node(pki, "node-b")
    try:
        a.join(ENC)
        b.join(ENC)
        task = a.wait_task(pb.TASK_KIND_TRAIN)
        slowed_session["id"] = a.session_id
        old = update_messages(a.session_id, task, {"w": np.ones(1000, np.float32)}, 10)
        first = a.stub.UploadUpdate.future(header_then_silence(old[0], release))
        time.sleep(0.5)
        a.join(ENC)
        task = a.wait_task(pb.TASK_KIND_TRAIN)
        current = update_messages(a.session_id, task, {"w": np.ones(1000, np.float32)}, 10)
        second = a.stub.UploadUpdate.future(header_then_silence(current[0], release))
        reply = first.result(timeout=20)
        assert reject_name(reply) == "STALE"  # the replaced session's upload steps aside
        time.sleep(0.5)
        assert not second.done(), "the current session's upload was cancelled"
    finally:
        release.set()
        a.close()
        b.close()
        coord.close()
