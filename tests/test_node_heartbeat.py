"""What a node does with its heartbeats (protocol review P4), against stand-in coordinators
(real gRPC servers on 127.0.0.1) and a real GroupWorker:

- while it works on a TRAIN or EVALUATE task, its heartbeats name the task (task_id);
- a HeartbeatReply with cancel_task stops that task's work: training before its next local
  step, a download, upload or report in flight at once; nothing of it is uploaded, the node
  says so in one info line and asks for its next task (no error, no rejoin);
- a cancel_task that arrives after the work it was for has ended touches no later work;
- the node beats at the interval of the last HeartbeatReply, clamped as the Join's is;
- against the real coordinator (RoundEngine and its gRPC server in this process, real mutual
  TLS), a node training a round that closed at its deadline stops and trains the retried round.

No test waits a fixed time for something to happen: the stand-ins hold a call until the node
cancels it, and training holds a step until the node has had the reply that cancels it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from fedharness import HOST, Pki, stand_in_coordinator
from test_update_validation import ALLOW
from test_validation_node import SMALL, StandIn, model_messages, small_weights, worker

from coordinator.rounds import RoundEngine
from coordinator.server import start_server
from coordinator.settings import RoundSettings
from group_node.client import MAX_HEARTBEAT_INTERVAL_S, NodeStopped
from group_node.config import NodeConfig
from group_node.node import GroupNode, TaskWork
from group_node.worker import GroupWorker, TaskCancelled
from pluralfed import protocol
from pluralfed.auth import AllowList
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.tls import TlsFiles
from pluralfed.training import LocalTrainer

pytestmark = pytest.mark.timeout(60)

LOCAL_STEPS = 50
HELD_S = 10.0  # the longest a stand-in holds a call, or a test a step, for the node's cancel


class CancelsTask(StandIn):
    """Offers one task (TRAIN t-1 of LOCAL_STEPS steps, or EVALUATE e-1), then ends the run.
    A heartbeat naming that task while the node is in state `cancel_in` is answered
    cancel_task=True; the next heartbeat after that reply proves the node has handled it
    (`cancel_handled`). With `hold`, that call (download, upload or report) is held after its
    first message until the node cancels it (`cut` is set then), at most HELD_S, and the task is
    cancelled only while the call is held (with hold="step", once the test holds a training
    step)."""

    def __init__(
        self, kind: pb.TaskKind.ValueType, cancel_in: pb.NodeState.ValueType, hold: str = ""
    ) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), model_messages(small_weights()))
        self.kind, self.cancel_in, self.hold = kind, cancel_in, hold
        self.task_id = "t-1" if kind == pb.TASK_KIND_TRAIN else "e-1"
        self.polls = 0
        self.beats: list[tuple[str, str]] = []  # (state, task id)
        self.cancels = 0
        self.cancel_handled = threading.Event()
        self.holding = threading.Event()
        self.cut = threading.Event()
        self.uploads: list[str] = []
        self.reports: list[str] = []

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        reply = super().Join(request, context)
        reply.heartbeat_interval.FromMilliseconds(20)
        return reply

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        if self.polls > 1:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        task = super().GetTask(request, context)
        task.kind, task.task_id = self.kind, self.task_id
        task.hyperparameters.local_steps = LOCAL_STEPS
        task.evaluation.max_context = 2
        task.time_budget.FromSeconds(60)
        return task

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        self.beats.append((pb.NodeState.Name(request.state), request.task_id))
        if self.cancels:
            self.cancel_handled.set()
        cancel = (
            request.task_id == self.task_id
            and request.state == self.cancel_in
            and (not self.hold or self.holding.is_set())
        )
        self.cancels += cancel
        return pb.HeartbeatReply(cancel_task=cancel)

    def held(self, context: grpc.ServicerContext) -> bool:
        """Until the node cancels the call (at most HELD_S); True if it did."""
        ended = threading.Event()
        context.add_callback(ended.set)
        self.holding.set()
        if ended.wait(HELD_S) and not context.is_active():
            self.cut.set()
        return self.cut.is_set()

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        chunks = super().DownloadModel(request, context)
        yield next(chunks)
        if self.hold == "download" and self.held(context):
            return
        yield from chunks

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        header = next(request_iterator).header
        if self.hold == "upload" and self.held(context):
            return pb.UploadReply()
        for _ in request_iterator:
            pass
        self.uploads.append(header.task_id)
        return pb.UploadReply(accepted=True)

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.Ack:
        if self.hold == "report" and self.held(context):
            return pb.Ack()
        self.reports.append(request.task_id)
        return pb.Ack()


def run_node(servicer: CancelsTask, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> GroupNode:
    """Run a node with a real worker until the stand-in ends the run (it must end with 0)."""
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(
            coordinator=f"{HOST}:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        node = GroupNode(cfg, worker())
        with caplog.at_level(logging.INFO, logger="pluralfed.node"):
            assert node.run() == 0
    return node


@pytest.fixture
def fast_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-ins' 20 ms heartbeat interval, below the floor a node keeps to (0.5 s)."""
    monkeypatch.setattr(protocol, "MIN_HEARTBEAT_S", 0.01)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("INSECURE")
    ]


@pytest.mark.usefixtures("fast_beats")
def test_a_cancelled_train_task_stops_between_local_steps_and_is_not_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the node sent no task id in its heartbeats and dropped their replies: a task
    whose round had closed was trained to its last local step and uploaded, to be refused."""
    servicer = CancelsTask(pb.TASK_KIND_TRAIN, pb.NODE_STATE_TRAINING, hold="step")
    steps = 0
    step = LocalTrainer.step

    def held_second_step(self: LocalTrainer, *args: object, **kwargs: object) -> float:
        nonlocal steps
        steps += 1
        if steps == 2:  # training is under way: now the coordinator says cancel_task
            servicer.holding.set()
            servicer.cancel_handled.wait(HELD_S)
        return step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalTrainer, "step", held_second_step)
    node = run_node(servicer, tmp_path, caplog)
    assert steps == 2  # stopped before step 3 of 50
    assert servicer.uploads == [] and node.rounds_trained == 0
    assert servicer.cancels >= 1 and servicer.polls == 2  # then it asked for its next task
    assert ("NODE_STATE_TRAINING", "t-1") in servicer.beats
    # the task is named while it is worked on, and only then
    assert all(task == "t-1" for state, task in servicer.beats if state != "NODE_STATE_IDLE")
    infos = [
        r.getMessage() for r in caplog.records if "cancelled by the coordinator" in r.getMessage()
    ]
    assert infos == [
        "G: round 1 update cancelled by the coordinator while training (stopped after 2 of 50 "
        "local steps): its round closed, or it has this node's answer; asking for the next task"
    ]
    assert problems(caplog) == []


@pytest.mark.parametrize(
    ("kind", "state", "hold", "doing"),
    [
        (pb.TASK_KIND_TRAIN, pb.NODE_STATE_DOWNLOADING, "download", "round 1 update"),
        (pb.TASK_KIND_TRAIN, pb.NODE_STATE_UPLOADING, "upload", "round 1 update"),
        (pb.TASK_KIND_EVALUATE, pb.NODE_STATE_DOWNLOADING, "download", "round 1 evaluation"),
        (pb.TASK_KIND_EVALUATE, pb.NODE_STATE_EVALUATING, "report", "round 1 evaluation"),
    ],
    ids=["train-download", "train-upload", "evaluate-download", "evaluate-report"],
)
@pytest.mark.usefixtures("fast_beats")
def test_a_cancelled_task_cancels_its_transfer_in_flight(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: pb.TaskKind.ValueType,
    state: pb.NodeState.ValueType,
    hold: str,
    doing: str,
) -> None:
    """A download, upload or report of a task the coordinator cancelled is cut at once, not
    left to run to its end (or its deadline). EVALUATE tasks too: cancel_task is about "the
    task named in the request", whatever its kind (an evaluation round closes as well)."""
    servicer = CancelsTask(kind, state, hold)
    node = run_node(servicer, tmp_path, caplog)
    assert servicer.cut.is_set(), f"the node did not cancel its {hold}"
    assert servicer.uploads == [] and servicer.reports == [] and node.rounds_trained == 0
    assert servicer.polls == 2
    phase = pb.NodeState.Name(state).removeprefix("NODE_STATE_").lower()
    infos = [
        r.getMessage() for r in caplog.records if "cancelled by the coordinator" in r.getMessage()
    ]
    assert infos == [
        f"G: {doing} cancelled by the coordinator while {phase}: its round closed, or it has "
        "this node's answer; asking for the next task"
    ]
    assert problems(caplog) == []


@pytest.mark.parametrize("audited", [False, True], ids=["plain", "save_updates_dir"])
@pytest.mark.usefixtures("fast_beats")
def test_a_task_cancelled_after_its_last_step_is_neither_uploaded_nor_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, audited: bool
) -> None:
    """A cancel_task that arrives after training, before the upload starts, cancels the upload
    as it starts (no call of the task is in flight to cut then); and with save_updates_dir no
    audit copy is left of an update the coordinator never saw. The weights are held until the
    node has had that reply."""
    servicer = CancelsTask(pb.TASK_KIND_TRAIN, pb.NODE_STATE_UPLOADING, hold="step")
    weights = GroupWorker.weights

    def held_weights(self: GroupWorker) -> dict:
        servicer.holding.set()  # training is done: now the coordinator says cancel_task
        servicer.cancel_handled.wait(HELD_S)
        return weights(self)

    monkeypatch.setattr(GroupWorker, "weights", held_weights)
    audit = tmp_path / "updates"
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(
            coordinator=f"{HOST}:{port}",
            group="G",
            data=tmp_path / "g.csv",
            insecure=True,
            save_updates_dir=audit if audited else None,
        )
        node = GroupNode(cfg, worker())
        with caplog.at_level(logging.INFO, logger="pluralfed.node"):
            assert node.run() == 0
    assert servicer.cancels >= 1 and servicer.uploads == [] and node.rounds_trained == 0
    assert not audit.exists() or list(audit.iterdir()) == []
    assert "round 1 update cancelled by the coordinator while uploading" in caplog.text
    assert problems(caplog) == []


def test_a_late_cancel_touches_no_later_work() -> None:
    """A reply cancelling a task whose work has ended (the beat was sent just before) must not
    cancel the work of the next task, which may be the same task offered again."""
    cfg = NodeConfig(coordinator=f"{HOST}:1", group="G", insecure=True)
    node = GroupNode(cfg, SimpleNamespace())  # type: ignore[arg-type]
    ended, current = TaskWork("t-1"), TaskWork("t-1")
    node._work = current
    node._cancel(ended)
    assert not current.cancelled.is_set() and not node.client._task_cancelled
    node._cancel(current)
    assert current.cancelled.is_set() and node.client._task_cancelled
    node.client.close()


class EndedCancelled(grpc.RpcError):
    """How a unary call cancelled once under way may end: an RpcError CANCELLED, not
    grpc.FutureCancelledError."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "Cancelled"


class CallUnderWay:
    """A call's future whose cancel comes too late: it ends as EndedCancelled."""

    def cancel(self) -> bool:
        return False

    def result(self) -> None:
        raise EndedCancelled()


def test_a_call_that_ends_cancelled_after_its_task_was_cancelled_is_the_tasks_cancel() -> None:
    """A task call that ends CANCELLED once the coordinator cancelled its task is the task's
    cancellation (TaskCancelled: ask for the next task), not a cut call; with no cancel asked,
    the error is the call's own."""
    cfg = NodeConfig(coordinator=f"{HOST}:1", group="G", insecure=True)
    node = GroupNode(cfg, SimpleNamespace())  # type: ignore[arg-type]
    with pytest.raises(EndedCancelled):
        node.client._result(CallUnderWay())
    node.client.cancel_task_calls()
    with pytest.raises(TaskCancelled):
        node.client._result(CallUnderWay())
    node.client.task_done()
    with pytest.raises(EndedCancelled):
        node.client._result(CallUnderWay())
    node.client.close()


class Starts:
    """Stands in for a call's `.future`: records that a call was started (gRPC starts sending
    at once), and hands back a future that ends cancelled once cancelled."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def __call__(self, name: str) -> SimpleNamespace:
        def future(*args: object, **kwargs: object) -> CallCancelledAtStart:
            self.started.append(name)
            return CallCancelledAtStart()

        return SimpleNamespace(future=future)


class CallCancelledAtStart:
    def cancel(self) -> bool:
        return True

    def result(self) -> None:
        raise grpc.FutureCancelledError()


def test_no_call_of_a_cancelled_task_is_started() -> None:
    """A cancel_task that comes between two calls of a task (after training, before the upload)
    cancels the next call before it starts: cancelled just after it started, a small upload had
    already reached the coordinator whole (seen as a flaky test). The same after a stop."""
    cfg = NodeConfig(coordinator=f"{HOST}:1", group="G", insecure=True)
    client = GroupNode(cfg, SimpleNamespace()).client  # type: ignore[arg-type]
    starts = Starts()
    client._upload_update = starts("upload")  # type: ignore[assignment]
    client.stub = SimpleNamespace(  # type: ignore[assignment]
        ReportEvaluation=starts("report"), GetTask=starts("poll")
    )
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-1", round=1, model_version="v1")
    client.cancel_task_calls()
    with pytest.raises(TaskCancelled):
        client.upload(task, small_weights(), 4, {}, timeout=5)
    with pytest.raises(TaskCancelled):
        client.report(task, "G", {"model": 0.5}, 4)
    client.task_done()
    client.cancel_calls()  # the node stops
    with pytest.raises(NodeStopped):
        client.get_task(1.0)
    assert starts.started == []
    client.close()


def test_between_tasks_the_node_says_it_is_idle() -> None:
    """After a task's work, done or failed, the heartbeats say IDLE again: a node that kept
    saying UPLOADING would look to the coordinator's operator as if it were still at work."""
    cfg = NodeConfig(coordinator=f"{HOST}:1", group="G", insecure=True)
    node = GroupNode(cfg, SimpleNamespace())  # type: ignore[arg-type]
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-1", round=1)

    def uploads(work: TaskWork) -> None:
        node._state = pb.NODE_STATE_UPLOADING

    def cancelled(work: TaskWork) -> None:
        node._state = pb.NODE_STATE_TRAINING
        raise TaskCancelled()

    for work in (uploads, cancelled):
        node._call("round 1 update", work, task)
        assert node._state == pb.NODE_STATE_IDLE and node._work is None
    node.client.close()


class FirstBeatFails(StandIn):
    """Answers the first heartbeat UNAVAILABLE (a coordinator that restarts, a link that drops
    a moment), the others as usual, with a 20 ms interval; WAIT to every GetTask until it has
    had 5 heartbeats (at most 5 s), then SHUTDOWN."""

    def __init__(self) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), [])
        self.beats = 0
        self.ends_at = time.monotonic() + 5.0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        reply = super().Join(request, context)
        reply.heartbeat_interval.FromMilliseconds(20)
        return reply

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if self.beats >= 5 or time.monotonic() >= self.ends_at:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        task = pb.Task(kind=pb.TASK_KIND_WAIT)
        task.retry_after.FromMilliseconds(100)
        return task

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        self.beats += 1
        if self.beats == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.HeartbeatReply()


@pytest.mark.usefixtures("fast_beats")
def test_heartbeats_go_on_after_one_that_failed(tmp_path: Path) -> None:
    """A heartbeat that fails is no reason to stop beating: a node whose beats stopped for the
    rest of its session would be dropped as silent by the coordinator in the middle of its
    work, its round waiting for it meanwhile."""
    servicer = FirstBeatFails()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(
            coordinator=f"{HOST}:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        assert GroupNode(cfg, worker()).run() == 0
    assert servicer.beats >= 5


class ChangesInterval(StandIn):
    """Answers the heartbeats with these intervals in turn (None: a reply without one)."""

    def __init__(self, intervals: list[float | None]) -> None:
        super().__init__("", [])
        self.intervals = intervals

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        reply = super().Join(request, context)
        reply.heartbeat_interval.FromSeconds(3)
        return reply

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        reply = pb.HeartbeatReply()
        interval = self.intervals.pop(0) if self.intervals else None
        if interval is not None:
            reply.heartbeat_interval.FromMilliseconds(int(interval * 1000))
        return reply


class RecordedWaits(threading.Event):
    """A stop event for the heartbeat loop: its waits return at once (not stopped) and are
    recorded, so the loop's pace is read without waiting for it; stopped after `beats` waits."""

    def __init__(self, beats: int) -> None:
        super().__init__()
        self.beats = beats
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return len(self.waits) > self.beats


def test_the_node_beats_at_the_interval_of_the_last_heartbeat_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HeartbeatReply.heartbeat_interval is "the interval to use from now on"; the node kept
    the Join's for the whole session. A reply without one keeps the interval; one below the
    floor or over the limit is clamped to it (over the limit is said once)."""
    servicer = ChangesInterval([2.0, 7.0, None, 0.001, 1e6, 1e6, 4.0])  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        cfg = NodeConfig(coordinator=f"{HOST}:{port}", group="G", insecure=True)
        worker_stub = SimpleNamespace(num_train_examples=4, encoder=SimpleNamespace(identity="e"))
        node = GroupNode(cfg, worker_stub)  # type: ignore[arg-type]
        node._join()
        stop = RecordedWaits(beats=7)
        with caplog.at_level(logging.WARNING, logger="pluralfed.node"):
            node._heartbeats(stop)
        node.client.close()
    cap = MAX_HEARTBEAT_INTERVAL_S
    assert stop.waits == [3.0, 2.0, 7.0, 7.0, 0.5, cap, cap, 4.0]
    assert problems(caplog) == [
        f"G: HeartbeatReply.heartbeat_interval 1e+06 s is over {cap:g} s: beating every {cap:g} s"
    ]


def test_a_node_stops_training_a_round_the_real_coordinator_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real coordinator answers cancel_task to a heartbeat naming a task that is no longer
    the open one. Round 1's first try closes at its deadline (2 s) while the node is held in its
    second local step (or before, on a slow machine); the node stops training it, uploads
    nothing of it, takes the retried round's task and trains that one."""
    settings = RoundSettings(
        rounds=1,
        round_timeout_s=2.0,
        eval_every=100,
        local_steps=20,
        context_range=(1, 2),
        target_range=(1, 2),
        max_context=2,
        heartbeat_interval_s=protocol.MIN_HEARTBEAT_S,
        session_timeout_s=30.0,
    )
    pki = Pki(tmp_path / "pki")
    engine = RoundEngine(settings, small_weights(), tmp_path / "state", "fake-enc", SMALL.to_dict())
    cancelled = threading.Event()  # the engine answered cancel_task=True
    handled = threading.Event()  # and the node beat again since: it has handled that reply
    heartbeat = engine.heartbeat

    def watched_heartbeat(*args: object, **kwargs: object) -> tuple[int, bool]:
        if cancelled.is_set():
            handled.set()
        completed, cancel = heartbeat(*args, **kwargs)  # type: ignore[arg-type]
        if cancel:
            cancelled.set()
        return completed, cancel

    monkeypatch.setattr(engine, "heartbeat", watched_heartbeat)
    steps = 0
    step = LocalTrainer.step

    def held_second_step(self: LocalTrainer, *args: object, **kwargs: object) -> float:
        nonlocal steps
        steps += 1
        if steps == 2:  # round 1's first try: its deadline passes meanwhile
            handled.wait(HELD_S)
        return step(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalTrainer, "step", held_second_step)
    server, port = start_server(
        engine, f"{HOST}:0", TlsFiles.from_dir(pki.server), AllowList(ALLOW), max_workers=16
    )
    driver = threading.Thread(target=engine.run, name="rounds", daemon=True)
    driver.start()
    try:
        cfg = NodeConfig(
            coordinator=f"{HOST}:{port}",
            group="Good A",
            tls_dir=pki.node("node-good-a"),
            poll_wait_s=0.5,
        )
        node = GroupNode(cfg, worker())
        with caplog.at_level(logging.INFO, logger="pluralfed.node"):
            assert node.run() == 0
    finally:
        engine.stop()
        server.stop(None).wait(10)
        driver.join(10)
    assert node.rounds_trained == 1 and engine.completed_rounds() == 1
    messages = [r.getMessage() for r in caplog.records]
    stopped = [m for m in messages if "cancelled by the coordinator while training" in m]
    assert stopped, messages
    for message in stopped:
        taken = int(message.split("stopped after ")[1].split(" of 20 ")[0])
        assert taken < 20, message
    assert steps < 20 + 20  # a closed try was never trained to its end
    assert not [m for m in messages if "not counted" in m or "refused" in m]
