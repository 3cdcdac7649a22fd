"""A node that stalls a bulk stream (an upload that stops after its header, a download it
stops reading) must not hold a stream slot past its round's deadline, nor run two of a kind at
once; a coordinator that cannot store an update says so in the UploadReply (INTERNAL). Real
coordinator server and nodes' RPCs over gRPC on 127.0.0.1 (plain text: TLS is not the point)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedharness import HOST, FakeNode, reject_name, update_messages, wait_until

import coordinator.server as server_module
from coordinator.rounds import RoundEngine
from coordinator.server import start_server
from coordinator.sessions import Role
from coordinator.settings import RoundSettings
from coordinator.streams import STALE_CHECK_S, StaleTransfers, StreamSlots
from coordinator.tasks import TaskKind
from pluralfed.auth import AllowList
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.transport import StreamDeadlines

pytestmark = pytest.mark.timeout(90)

ENC = "enc"
NODES = {"node-a": "A", "node-b": "B"}
LONG_ROUND = {"round_timeout_s": 60.0}  # far past what any wait in these tests allows


class Federation:
    def __init__(
        self,
        tmp: Path,
        weights: dict[str, np.ndarray],
        settings: dict[str, Any] | None = None,
        **slots: Any,
    ) -> None:
        round_settings = RoundSettings(
            **{
                "rounds": 2,
                "min_nodes": 2,
                "round_timeout_s": 3.0,
                "eval_every": 0,
                "heartbeat_interval_s": 1.0,
                "session_timeout_s": 120.0,
                **(settings or {}),
            }
        )
        self.engine = RoundEngine(round_settings, weights, tmp / "state", ENC, {})
        self.server, port = start_server(
            self.engine,
            f"{HOST}:0",
            None,
            AllowList(NODES),
            max_workers=16,
            transfer_grace_s=0.5,
            **slots,
        )
        self.driver = threading.Thread(target=self.engine.run, daemon=True)
        self.driver.start()
        self.a, self.b = FakeNode(port, "A", insecure=True), FakeNode(port, "B", insecure=True)
        self.a.join(ENC, 10)
        self.b.join(ENC, 10)

    def close(self) -> None:
        self.engine.stop()
        self.server.stop(None)


def stalled(messages: list[Any], release: threading.Event) -> Iterator[Any]:
    yield messages[0]  # the header, then silence: a hung or hostile node
    release.wait(60)


def test_a_stalled_upload_frees_its_slot_at_the_rounds_deadline(tmp_path: Path) -> None:
    slots = StreamSlots(1)
    fed = Federation(tmp_path, {"w": np.zeros(1000, np.float32)}, upload_slots=slots)
    release = threading.Event()
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        mine = update_messages(fed.a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
        held = fed.a.stub.UploadUpdate.future(stalled(mine, release))
        wait_until(lambda: slots.active == 1, 10, "the stalled upload to take the slot")
        # round 1 passes its deadline with A's upload stalled: cut, the slot is free again
        deadline = time.time() + 15
        while (slots.active or fed.engine.state.history) and time.time() < deadline:
            time.sleep(0.1)
        assert slots.active == 0 and fed.engine.completed_rounds() == 0
        assert held.exception(timeout=10) is not None  # the stalled RPC was cancelled
        # before: the slot stayed held into round 2, so nobody's update was ever read
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        assert tb.round == 1 and tb.task_id != ta.task_id  # the retried round
        theirs = update_messages(fed.b.session_id, tb, {"w": np.full(1000, 2.0, np.float32)}, 10)
        assert fed.b.upload(theirs).accepted
    finally:
        release.set()
        fed.close()


def test_an_upload_sent_again_replaces_a_stalled_one_of_the_same_session(tmp_path: Path) -> None:
    """A node that gave up on an upload the coordinator still reads (a half-open connection)
    sends it again in the same session. Before, the copy was refused DUPLICATE, which the node
    takes as final, and the stalled first never arrived: the group's update was lost."""
    slots = StreamSlots(1)
    settings = {**LONG_ROUND, "min_updates": 1}
    fed = Federation(tmp_path, {"w": np.zeros(1000, np.float32)}, settings, upload_slots=slots)
    release = threading.Event()
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        mine = update_messages(fed.a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
        held = fed.a.stub.UploadUpdate.future(stalled(mine, release))
        wait_until(lambda: slots.active == 1, 10, "the stalled upload to take the slot")
        again = fed.a.stub.UploadUpdate(iter(mine), timeout=10)
        assert again.accepted, again.message
        assert held.exception(timeout=10) is not None  # the stalled one was cancelled
        assert fed.engine._task is not None and fed.engine._task.aggregate is not None
        assert fed.engine._task.aggregate.num_updates == 1
        # counted once: a third copy is a duplicate
        assert reject_name(fed.a.stub.UploadUpdate(iter(mine), timeout=10)) == "DUPLICATE"
    finally:
        release.set()
        fed.close()


class CountingHeld:
    """Stands in for the engine's accept_update: the first call waits for `release`, then
    fails with `first_error` (if any) or goes on to the real one."""

    def __init__(self, real: Any, first_error: Exception | None = None) -> None:
        self.real, self.first_error = real, first_error
        self.calls = 0
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait(30)
            if self.first_error is not None:
                raise self.first_error
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("stored", [True, False], ids=["counted", "not-stored"])
def test_a_copy_sent_while_the_first_is_being_taken_waits_for_its_outcome(
    tmp_path: Path, stored: bool
) -> None:
    """Once every byte of the first upload is in, a copy does not replace it: it waits, and
    gets DUPLICATE if the first counted, or is read itself if the first could not be stored."""
    settings = {**LONG_ROUND, "min_updates": 1}
    fed = Federation(tmp_path, {"w": np.zeros(1000, np.float32)}, settings)
    held = CountingHeld(
        fed.engine.accept_update, None if stored else OSError(errno.ENOSPC, "disk full")
    )
    fed.engine.accept_update = held  # type: ignore[method-assign]
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        mine = update_messages(fed.a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
        first = fed.a.stub.UploadUpdate.future(iter(mine), timeout=20)
        assert held.entered.wait(10)
        second = fed.a.stub.UploadUpdate.future(iter(mine), timeout=20)
        time.sleep(0.5)
        assert not second.done()  # waiting for the first's outcome
        held.release.set()
        if stored:
            assert first.result().accepted
            assert reject_name(second.result()) == "DUPLICATE"
        else:
            assert reject_name(first.result()) == "INTERNAL"
            assert second.result().accepted, second.result().message
        assert held.calls == (1 if stored else 2)
        assert fed.engine._task is not None and fed.engine._task.aggregate is not None
        assert fed.engine._task.aggregate.num_updates == 1
    finally:
        held.release.set()
        fed.close()


def test_a_download_nobody_reads_frees_its_slot_and_one_runs_per_node(tmp_path: Path) -> None:
    slots = StreamSlots(1)
    # 5 s rounds; 32 MB: more than gRPC's buffers and windows take in for a node that stops
    # reading (8 MB sometimes all went)
    weights = {"w": np.zeros(8_000_000, np.float32)}
    fed = Federation(tmp_path, weights, {"round_timeout_s": 5.0}, download_slots=slots)
    try:
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        request = pb.DownloadModelRequest(
            session_id=fed.a.session_id, model_version=tb.model_version
        )
        stuck = fed.a.stub.DownloadModel(request)
        next(stuck)  # the header: a slot is taken; A reads no more (most of it stays unsent)
        assert slots.active == 1
        # when round 1 closes at its deadline (5 s) the stuck download is cut; before, it held
        # the slot for ever and no node got the model again
        deadline = time.time() + 15
        while slots.active and time.time() < deadline:
            time.sleep(0.1)
        assert slots.active == 0
        with pytest.raises(grpc.RpcError) as cut:
            sum(1 for _ in stuck)
        assert cut.value.code() == grpc.StatusCode.CANCELLED
        retried = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        theirs = pb.DownloadModelRequest(
            session_id=fed.b.session_id, model_version=retried.model_version
        )
        # B gets the slot and the model flows (only its start is read: on a busy machine all
        # 32 MB might not arrive before the retried round closes too, and its download is cut)
        flowing = fed.b.stub.DownloadModel(theirs, timeout=20)
        assert len([next(flowing) for _ in range(3)]) == 3
        flowing.cancel()
    finally:
        fed.close()


def test_a_download_asked_again_replaces_the_stuck_one(tmp_path: Path) -> None:
    """A node that gave up on a download asks again in the same session: the stuck one is
    cancelled and the new one runs. Before, the new one was refused RESOURCE_EXHAUSTED until
    the stuck one was cut at the round's deadline."""
    slots = StreamSlots(1)
    weights = {"w": np.zeros(8_000_000, np.float32)}  # 32 MB: more than gRPC buffers
    fed = Federation(tmp_path, weights, LONG_ROUND, download_slots=slots)
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        request = pb.DownloadModelRequest(
            session_id=fed.a.session_id, model_version=ta.model_version
        )
        stuck = fed.a.stub.DownloadModel(request)
        next(stuck)
        assert slots.active == 1
        again = fed.a.stub.DownloadModel(request, timeout=30)
        assert sum(1 for _ in again) > 2  # all of it
        with pytest.raises(grpc.RpcError) as cut:
            sum(1 for _ in stuck)
        assert cut.value.code() == grpc.StatusCode.CANCELLED
        assert slots.active == 0
    finally:
        fed.close()


def test_an_update_the_coordinator_cannot_store_is_answered_internal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol: refusals of an upload are UploadReplies, INTERNAL when the coordinator
    could not store it (e.g. disk full). Before, the spool's OSError was an UNKNOWN status."""

    class FullDisk(server_module.UpdateSpool):
        def add(self, chunk: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server_module, "UpdateSpool", FullDisk)
    fed = Federation(tmp_path, {"w": np.zeros(100, np.float32)})
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        reply = fed.a.upload(update_messages(fed.a.session_id, ta, {"w": np.ones(100)}, 10))
        assert reject_name(reply) == "INTERNAL" and "No space left" in reply.message
    finally:
        fed.close()


# ------------------------------------------------------------------------------------------------
# streams of a session that expired, or of a round that closed, are cut at once (not at the
# deadline fixed when they started: a node cut off without a TCP reset held its slot up to a
# round's length into later rounds, and healthy uploads queued behind it)

# an evaluation report's figures (pluralfed.metrics.GroupEvaluation)
METRICS = {"model": 0.5, "uniform_context": 0.4, "uniform_baseline": 0.3, "prior_baseline": 0.35}


class KeepAlive:
    """Heartbeats for `node` every half second, as a working node's heartbeat thread does."""

    def __init__(self, node: FakeNode) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(node,), daemon=True)
        self._thread.start()

    def _beat(self, node: FakeNode) -> None:
        while not self._stop.wait(0.5):
            node.heartbeat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_an_upload_of_an_expired_session_frees_its_slot_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slots = StreamSlots(1)
    # 3 s: B's heartbeats every 0.5 s keep its session alive even on a loaded machine
    settings = {**LONG_ROUND, "session_timeout_s": 3.0, "min_updates": 1}
    fed = Federation(tmp_path, {"w": np.zeros(1000, np.float32)}, settings, upload_slots=slots)
    release = threading.Event()
    beats = KeepAlive(fed.b)
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        mine = update_messages(fed.a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
        held = fed.a.stub.UploadUpdate.future(stalled(mine, release))  # then A falls silent
        wait_until(lambda: slots.active == 1, 10, "the stalled upload to take the slot")
        started = time.monotonic()
        theirs = update_messages(fed.b.session_id, tb, {"w": np.full(1000, 2.0, np.float32)}, 10)
        # B waits for the slot; A's session expires after 3 s and its upload is cut then.
        # Before, the slot stayed A's until the round's deadline (60 s) plus grace.
        reply = fed.b.stub.UploadUpdate(iter(theirs), timeout=30)
        assert reply.accepted, reply.message
        assert time.monotonic() - started < 3.0 + 5.0
        assert held.exception(timeout=10) is not None  # A's stalled RPC was cancelled
        assert "for round 1 cancelled: its session ended or expired" in caplog.text
        wait_until(lambda: fed.engine.completed_rounds() == 1, 10, "round 1 with B's update")
    finally:
        release.set()
        beats.stop()
        fed.close()


def test_a_stalled_upload_is_cut_when_its_round_closes(tmp_path: Path) -> None:
    """A's session stays live (long session timeout), but the round it uploads for closes:
    every node reported its task failed, so the round is retried. A's stream of the closed
    round is cut at once and the retried round's upload is read."""
    slots = StreamSlots(1)
    fed = Federation(tmp_path, {"w": np.zeros(1000, np.float32)}, LONG_ROUND, upload_slots=slots)
    release = threading.Event()
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        mine = update_messages(fed.a.session_id, ta, {"w": np.ones(1000, np.float32)}, 10)
        held = fed.a.stub.UploadUpdate.future(stalled(mine, release))
        wait_until(lambda: slots.active == 1, 10, "the stalled upload to take the slot")
        for node, task in ((fed.a, ta), (fed.b, tb)):
            node.heartbeat(state=pb.NODE_STATE_FAILED, task_id=task.task_id, message="test")
        closed = time.monotonic()
        wait_until(lambda: slots.active == 0, 10, "the closed round's upload to be cut")
        assert time.monotonic() - closed < 3.0  # before: held until the 60 s deadline
        assert held.exception(timeout=10) is not None
        retried = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        assert retried.round == 1 and retried.task_id != tb.task_id
        theirs = update_messages(fed.b.session_id, retried, {"w": np.ones(1000, np.float32)}, 10)
        assert fed.b.stub.UploadUpdate(iter(theirs), timeout=10).accepted
    finally:
        release.set()
        fed.close()


def test_a_download_of_an_expired_session_frees_its_slot_at_once(tmp_path: Path) -> None:
    slots = StreamSlots(1)
    settings = {**LONG_ROUND, "session_timeout_s": 2.0}
    # 32 MB: more than gRPC's buffers and windows hold for a node that stops reading
    weights = {"w": np.zeros(8_000_000, np.float32)}
    fed = Federation(tmp_path, weights, settings, download_slots=slots)
    beats = KeepAlive(fed.b)
    try:
        ta = fed.a.wait_task(pb.TASK_KIND_TRAIN)
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        request = pb.DownloadModelRequest(
            session_id=fed.a.session_id, model_version=ta.model_version
        )
        stuck = fed.a.stub.DownloadModel(request)
        next(stuck)  # the header: A holds the slot, reads no more and falls silent
        assert slots.active == 1
        started = time.monotonic()
        wait_until(lambda: slots.active == 0, 10, "the expired session's download to be cut")
        assert time.monotonic() - started < 2.0 + 3.0  # before: the 60 s round's deadline
        with pytest.raises(grpc.RpcError) as cut:
            sum(1 for _ in stuck)
        assert cut.value.code() == grpc.StatusCode.CANCELLED
        theirs = pb.DownloadModelRequest(
            session_id=fed.b.session_id, model_version=tb.model_version
        )
        assert sum(1 for _ in fed.b.stub.DownloadModel(theirs, timeout=20)) > 2
    finally:
        beats.stop()
        fed.close()


def slow_download(node: FakeNode, version: str) -> int:
    """Download `version` as a slow node would, pausing after the header while the stale-stream
    watch looks at it a few times; the number of messages received."""
    request = pb.DownloadModelRequest(session_id=node.session_id, model_version=version)
    stream = node.stub.DownloadModel(request, timeout=30)
    next(stream)
    time.sleep(4 * STALE_CHECK_S)
    return 1 + sum(1 for _ in stream)


def test_evaluation_and_final_model_downloads_run_to_their_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cutting streams of closed tasks spares the ones still of use: an evaluation's download
    while it is open, and the final model's while nodes linger after the run (no task open)."""
    settings = {"rounds": 1, "eval_every": 1, "eval_timeout_s": 60.0}
    weights = {"w": np.zeros(500_000, np.float32)}
    fed = Federation(tmp_path, weights, settings)
    try:
        for node in (fed.a, fed.b):
            task = node.wait_task(pb.TASK_KIND_TRAIN)
            update = {"w": np.ones(500_000, np.float32)}
            assert node.upload(update_messages(node.session_id, task, update, 10)).accepted
        for node in (fed.a, fed.b):
            task = node.wait_task(pb.TASK_KIND_EVALUATE)
            assert slow_download(node, task.model_version) > 2
            report = pb.EvaluationReport(
                session_id=node.session_id,
                task_id=task.task_id,
                round=task.round,
                group=node.group,
                model_version=task.model_version,
                metrics=pb.GroupMetrics(num_questions=12, mean_alignment=0.5, metrics=METRICS),
            )
            node.stub.ReportEvaluation(report, timeout=30)
        final = fed.a.wait_task(pb.TASK_KIND_SHUTDOWN)
        assert fed.engine.done and final.model_version
        assert slow_download(fed.a, final.model_version) > 2
        np.testing.assert_array_equal(fed.a.download(final.model_version)["w"], 1.0)
        assert "cancelled" not in caplog.text
    finally:
        fed.close()


class CancelCounted:
    """A call's context whose cancel() raises the first time it is `broken`."""

    def __init__(self, broken: bool = False) -> None:
        self.broken, self.cancels = broken, 0

    def cancel(self) -> None:
        self.cancels += 1
        if self.broken:
            raise RuntimeError("cancel failed")


def test_the_watch_threads_go_on_after_an_error_cutting_one_call() -> None:
    """StreamDeadlines and StaleTransfers each cut calls from one thread, started once: an error
    cutting one call ended that thread, and no later stalled stream was ever cut (its slot held
    until the peer went away)."""
    deadlines = StreamDeadlines()
    broken, fine = CancelCounted(broken=True), CancelCounted()
    with deadlines.watch(broken, 0.0), deadlines.watch(fine, 0.05):  # type: ignore[arg-type]
        wait_until(lambda: fine.cancels == 1, 10.0, "the later call's deadline cut")
    assert broken.cancels == 1

    engine = type("Engine", (), {"open_task_id": lambda self, session: "next task"})()
    stale = StaleTransfers(engine, poll_s=0.01)
    broken, fine = CancelCounted(broken=True), CancelCounted()
    with stale.watch(broken, "s1", "old task", "upload"):  # type: ignore[arg-type]
        wait_until(lambda: broken.cancels == 1, 10.0, "the first stale call's cut")
        with stale.watch(fine, "s2", "old task", "upload"):  # type: ignore[arg-type]
            wait_until(lambda: fine.cancels == 1, 10.0, "the later stale call's cut")


class FailingOnce:
    """The engine's `open_task_id`: raises on its first question, then says the session ended."""

    def __init__(self) -> None:
        self.asked = 0

    def open_task_id(self, session_id: str) -> str | None:
        self.asked += 1
        if self.asked == 1:
            raise RuntimeError("a bug in the engine")
        return None


def test_an_error_asking_the_engine_does_not_end_the_watch_of_stale_streams() -> None:
    """The check runs in one thread for every stream: an engine error (a bug) while asking
    about one stream is logged, and that stream and later ones are still cut once stale."""
    stale = StaleTransfers(FailingOnce(), poll_s=0.01)
    first, later = CancelCounted(), CancelCounted()
    with stale.watch(first, "s1", "task", "upload"):  # type: ignore[arg-type]
        wait_until(lambda: first.cancels == 1, 10.0, "the first stale call's cut")
        with stale.watch(later, "s2", "task", "upload"):  # type: ignore[arg-type]
            wait_until(lambda: later.cancels == 1, 10.0, "the later stale call's cut")
    assert stale.cancelled == 2


def test_a_stream_let_go_while_the_engine_is_asked_about_it_is_not_cut() -> None:
    """An upload whose bytes are all in ends its watch (the engine takes it) and may still
    count: if that happens while the check asks about it, and the round closes meanwhile, it
    is not cancelled, nor counted as cut."""
    ended: list[Any] = []
    asked = threading.Event()

    class ClosesAsTheUploadIsTaken:
        def open_task_id(self, session_id: str) -> str | None:
            ended[0]()  # the handler ends the watch: every byte is in
            asked.set()
            return "the next round's task"

    stale = StaleTransfers(ClosesAsTheUploadIsTaken(), poll_s=0.01)
    call = CancelCounted()
    with stale.watch(call, "s1", "task", "upload") as unwatch:  # type: ignore[arg-type]
        ended.append(unwatch)
        assert asked.wait(10.0)
    # a stale stream watched next is cut once the check has decided about the first one
    stale_one = CancelCounted()
    with stale.watch(stale_one, "s2", "old task", "upload"):  # type: ignore[arg-type]
        wait_until(lambda: stale_one.cancels == 1, 10.0, "the stale stream's cut")
    assert call.cancels == 0 and stale.cancelled == 1


def test_a_call_that_ends_before_its_deadline_is_not_cut_at_it() -> None:
    """A watched block that ends in time is let go: its call is not cancelled (nor counted or
    logged as cut) when its deadline passes; a later call past its own deadline still is."""
    deadlines = StreamDeadlines()
    in_time, stalled_call = CancelCounted(), CancelCounted()
    with deadlines.watch(in_time, 0.05):  # type: ignore[arg-type]
        pass
    with deadlines.watch(stalled_call, 0.1):  # type: ignore[arg-type]
        wait_until(lambda: stalled_call.cancels == 1, 10.0, "the stalled call's deadline cut")
    assert in_time.cancels == 0 and deadlines.cancelled == 1


class FakeCall:
    """The parts of a grpc.ServicerContext a download uses."""

    def __init__(self) -> None:
        self.active, self.cancelled = True, False

    def is_active(self) -> bool:
        return self.active

    def cancel(self) -> None:
        self.cancelled, self.active = True, False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_a_download_whose_round_closes_as_it_starts_is_cut(tmp_path: Path) -> None:
    """The model and the task its download is of use for were read under two lock holds: a
    round closing (and the next opening) between them left the closed round's download watched
    against the new task, so it was never cut and ran on to its end, holding a slot."""
    settings = RoundSettings(rounds=3, min_nodes=1, min_updates=1, round_timeout_s=60)
    engine = RoundEngine(settings, {"w": np.zeros(1 << 16, np.float32)}, tmp_path, "e", {})
    node = engine.join("A", Role.TRAIN, 10, "e", "t")
    servicer = server_module.FederationServicer(engine, download_chunk_bytes=4096)
    servicer._caller = lambda context: None  # type: ignore[method-assign]  # as insecure
    servicer.stale.poll_s = 0.01
    engine._open(TaskKind.TRAIN, [node], 60.0)  # what the driver does (no driver here)
    task = engine.next_task(node.session_id, None, 1.0)
    read_model = servicer._download_of

    def round_closes_meanwhile(model: Any) -> Any:
        with engine._changed:  # the driver closes the round at its deadline, opens the next
            engine._task = None
        engine._open(TaskKind.TRAIN, [node], 60.0)
        return read_model(model)

    servicer._download_of = round_closes_meanwhile  # type: ignore[method-assign]
    call = FakeCall()
    request = pb.DownloadModelRequest(session_id=node.session_id, model_version=task.model_version)
    download = servicer.DownloadModel(request, call)  # type: ignore[arg-type]
    assert isinstance(download, Generator)  # so it can be closed
    next(download)  # the header: the watch is on
    try:
        wait_until(lambda: call.cancelled, 10.0, "the closed round's download cut")
    finally:
        download.close()


class Aborted(Exception):
    """What grpc's ServicerContext.abort() raises to end the handler."""


class AbortingCall(FakeCall):
    """A FakeCall whose abort() ends the handler, as gRPC's does, keeping the status."""

    def __init__(self) -> None:
        super().__init__()
        self.status: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)


def test_a_download_of_a_session_replaced_as_it_starts_steps_aside_resource_exhausted(
    tmp_path: Path,
) -> None:
    """A download of session S1 that passed its session check just before its node joined
    again (S2), and S2's own download started, leaves S2's alone and steps aside with
    RESOURCE_EXHAUSTED, which the node takes as "a download of ours still runs there" (a
    refusal it logs before asking for its next task), not as a coordinator gone away."""
    settings = RoundSettings(rounds=1, min_nodes=1, round_timeout_s=60)
    engine = RoundEngine(settings, {"w": np.zeros(1 << 16, np.float32)}, tmp_path, "e", {})
    first = engine.join("A", Role.TRAIN, 10, "e", "t")
    servicer = server_module.FederationServicer(engine, download_chunk_bytes=4096)
    servicer._caller = lambda context: "A"  # type: ignore[method-assign]  # node A's calls
    read_model = servicer._download_of
    newer_call = FakeCall()
    newer: list[Generator[bytes, None, None]] = []

    def node_joins_again_meanwhile(model: Any) -> Any:
        if not newer:  # S1's download is past its session check: S2 joins and downloads
            second = engine.join("A", Role.TRAIN, 10, "e", "t")
            request = pb.DownloadModelRequest(session_id=second.session_id)
            newer.append(servicer.DownloadModel(request, newer_call))  # type: ignore[arg-type]
            next(newer[0])  # its header is out: S2's download runs
        return read_model(model)

    servicer._download_of = node_joins_again_meanwhile  # type: ignore[method-assign]
    call = AbortingCall()
    download = servicer.DownloadModel(
        pb.DownloadModelRequest(session_id=first.session_id),
        call,  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(Aborted):
            next(download)
        assert call.status is not None and call.status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "one at a time" in call.status[1]
        assert not newer_call.cancelled, "the current session's download was cut"
        assert len(list(newer[0])) > 2  # and runs to its end: tensor parts and the trailer
    finally:
        for stream in newer:
            stream.close()


def test_an_upload_replaced_just_as_its_last_byte_came_is_stale_and_its_copy_counts(
    tmp_path: Path,
) -> None:
    """A node sends its update again while the first copy's last bytes are still under way
    (its connection looked dead); the copy replaces the first, whose trailer comes in just
    then. The first is dropped (STALE, which the node never reads: its call was cancelled),
    and the copy the node waits on is counted and answered ACCEPTED, not DUPLICATE for an
    update the node never heard was taken."""
    settings = RoundSettings(rounds=1, min_nodes=1, min_updates=1, round_timeout_s=60)
    weights = {"w": np.zeros(1 << 12, np.float32)}
    engine = RoundEngine(settings, weights, tmp_path, "e", {})
    node = engine.join("A", Role.TRAIN, 10, "e", "t")
    servicer = server_module.FederationServicer(engine)
    servicer._caller = lambda context: "A"  # type: ignore[method-assign]  # node A's calls
    engine._open(TaskKind.TRAIN, [node], 60.0)  # what the driver does (no driver here)
    task = engine.next_task(node.session_id, None, 1.0)
    update = {"w": np.full(1 << 12, 0.5, np.float32)}
    messages = update_messages(node.session_id, task, update, 10)  # type: ignore[arg-type]
    first_call, copy_call = FakeCall(), FakeCall()
    copy_reply: list[pb.UploadReply] = []

    def copy() -> None:
        copy_reply.append(servicer.UploadUpdate(iter(messages), copy_call))  # type: ignore[arg-type]

    def first_copy() -> Iterator[pb.UpdateChunk]:
        yield from messages  # every byte, trailer included, is in ...
        # ... and as the servicer looks for anything after the trailer, the copy starts
        threading.Thread(target=copy, daemon=True).start()
        wait_until(lambda: first_call.cancelled, 10.0, "the copy to replace the first upload")

    first_reply = servicer.UploadUpdate(first_copy(), first_call)  # type: ignore[arg-type]
    wait_until(lambda: copy_reply, 10.0, "the copy's reply")
    assert reject_name(first_reply) == "STALE", first_reply
    assert copy_reply[0].accepted, copy_reply[0]
