"""How a running node ends or waits, against stand-in coordinators (real gRPC servers on
127.0.0.1) and a real GroupWorker (fault-injection review F5, F7, F10):

- an upload the coordinator could not store (INTERNAL, e.g. its disk is full) is sent again,
  the same update, after a growing back-off, not downloaded, trained and uploaded in a tight loop;
- SIGTERM/SIGINT stops a node within a second even in its 30 s long poll, sends Leave ("stopped
  by signal ...") and exits 143/130, never 0 ("the federation finished");
- a node that cannot connect while its own certificate expired (or is not valid yet) says so,
  naming the file and its dates, and stops, instead of "coordinator unreachable" for ever.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography import x509
from fedharness import HOST, Pki, free_port, stand_in_coordinator
from test_validation_node import SMALL, StandIn, model_messages, small_weights, worker

import group_node.client as client_module
import group_node.node as node_module
import pluralfed.commands.node as commands_node
from group_node.config import NodeConfig
from group_node.node import GroupNode
from pluralfed.cli import main
from pluralfed.commands.node import stop_on_signals
from pluralfed.pki import create_ca
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.tls import CA_CERT_FILE, CERT_FILE

pytestmark = pytest.mark.timeout(60)


class CannotStore(StandIn):
    """Offers TRAIN task t-1 until an upload of it is accepted (then SHUTDOWN, or after
    `open_s`), refusing the first uploads with the given reasons, as a coordinator whose disk
    is full refuses with INTERNAL and leaves the task open."""

    def __init__(self, refusals: list[pb.RejectReason.ValueType], open_s: float = 30.0) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), model_messages(small_weights()))
        self.refusals = list(refusals)
        self.closes_at = time.monotonic() + open_s
        self.offers = self.downloads = 0
        self.uploads: list[float] = []  # when each upload arrived (monotonic)
        self.done = False

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if self.done or time.monotonic() >= self.closes_at:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        self.offers += 1
        task = super().GetTask(request, context)
        task.hyperparameters.local_steps = 2
        task.time_budget.FromMilliseconds(60_000)
        return task

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        self.downloads += 1
        yield from super().DownloadModel(request, context)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        for _ in request_iterator:
            pass
        self.uploads.append(time.monotonic())
        if self.refusals:
            reason = self.refusals.pop(0)
            return pb.UploadReply(accepted=False, reason=reason, message="No space left on device")
        self.done = True
        return pb.UploadReply(accepted=True)


def node_config(port: int, tmp_path: Path, **kw: Any) -> NodeConfig:
    return NodeConfig(
        coordinator=f"{HOST}:{port}", group="G", data=tmp_path / "g.csv", insecure=True, **kw
    )


def test_an_update_the_coordinator_could_not_store_is_sent_again_after_a_growing_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review F5: before, every INTERNAL refusal was followed at once by the same task's
    download, training and upload: 142 uploads of one node in 24 s."""
    monkeypatch.setattr(node_module, "UPLOAD_RETRY_INITIAL_S", 0.3)
    monkeypatch.setattr(node_module, "UPLOAD_RETRY_MAX_S", 0.5)
    servicer = CannotStore([pb.REJECT_REASON_INTERNAL] * 3)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        with caplog.at_level(logging.INFO, logger="pluralfed.node"):
            assert node.run() == 0  # it never gave up: the 4th upload counted, the run finished
    assert len(servicer.uploads) == 4 and node.rounds_trained == 1
    assert servicer.downloads == 1  # trained once: the same update was sent again
    gaps = [b - a for a, b in zip(servicer.uploads, servicer.uploads[1:], strict=False)]
    for gap, backoff in zip(gaps, (0.3, 0.5, 0.5), strict=True):  # 0.3, doubled, capped
        assert gap >= backoff - 0.05, gaps
    assert servicer.offers <= 12  # asked again while waiting, but not in a tight loop
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "G: round 1 update not counted: REJECT_REASON_INTERNAL (No space left on device); "
        "sending it again in 0.3 s if the round is open" in messages
    )
    assert messages.count("G: round 1: sending the update again") == 3


class OpenAfterRefusal(CannotStore):
    """Refuses the first upload with `reason` and offers the task for 1 s more (counted from
    the refusal, so that a slow first training, as in a test run alone, does not eat it up)."""

    def __init__(self, reason: pb.RejectReason.ValueType) -> None:
        super().__init__([reason])

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        reply = super().UploadUpdate(request_iterator, context)
        self.closes_at = time.monotonic() + 1.0
        return reply


@pytest.mark.parametrize(
    "reason",
    [
        pb.REJECT_REASON_STALE,
        pb.REJECT_REASON_UNKNOWN_TASK,
        pb.REJECT_REASON_DIGEST_MISMATCH,
        pb.REJECT_REASON_NON_FINITE,
        pb.REJECT_REASON_NORM_BOUND,
        pb.REJECT_REASON_DUPLICATE,
        pb.REJECT_REASON_ALREADY_REJECTED,
    ],
    ids=lambda r: pb.RejectReason.Name(r).removeprefix("REJECT_REASON_").lower(),
)
def test_an_update_rejected_for_good_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reason: pb.RejectReason.ValueType
) -> None:
    """One upload decides a round: a coordinator that still offers the task is waited out.
    Every refusal that answers the task for good, not only NORM_BOUND: a STALE update sent
    again after the back-off of an update the coordinator could not store (here as short as
    the poll) would be refused again, and again, until the round closed."""
    monkeypatch.setattr(node_module, "REFUSED_TASK_POLL_S", 0.2)
    monkeypatch.setattr(node_module, "UPLOAD_RETRY_INITIAL_S", 0.2)
    servicer = OpenAfterRefusal(reason)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        assert node.run() == 0
    assert len(servicer.uploads) == 1 and servicer.downloads == 1
    assert 2 <= servicer.offers <= 12


def test_a_node_leaves_when_the_federation_is_finished(tmp_path: Path) -> None:
    """At SHUTDOWN the node says Leave ("finished") before it exits 0: the coordinator closes its
    session at once instead of waiting for its heartbeats to stop, and sees a clean end."""
    servicer = CannotStore([])  # type: ignore[abstract]  # takes the first upload
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        assert node.run() == 0
    assert node.rounds_trained == 1 and servicer.left == ["finished"]


class RecordsMetrics(CannotStore):
    """Takes the first upload and keeps the metrics its header carries."""

    def __init__(self) -> None:
        super().__init__([])
        self.metrics: dict[str, float] = {}

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        chunks = list(request_iterator)
        header = next(c.header for c in chunks if c.WhichOneof("part") == "header")
        self.metrics = dict(header.metrics)
        return super().UploadUpdate(iter(chunks), context)


def test_an_update_carries_its_training_metrics_and_the_alignment_before_training(
    tmp_path: Path,
) -> None:
    """A coordinator with fairness_q > 0 weights each update by the group's alignment under the
    global model before training (metric alignment_before), and refuses an update without it
    as MALFORMED: every update sends it, with its loss, steps and seconds."""
    servicer = RecordsMetrics()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        assert GroupNode(node_config(port, tmp_path), worker()).run() == 0
    assert set(servicer.metrics) == {"loss", "steps", "seconds", "alignment_before"}
    assert servicer.metrics["steps"] == 2.0 and 0.0 <= servicer.metrics["alignment_before"] <= 1.0


class CutsFirstUpload(CannotStore):
    """Cuts the first upload mid-stream (context.cancel()), as the coordinator's
    StaleTransfers does when a round closes; counts Joins."""

    def __init__(self) -> None:
        super().__init__([], open_s=20)
        self.joins = 0
        self.cut = False

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins += 1
        return super().Join(request, context)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        if not self.cut:
            self.cut = True
            next(request_iterator)
            context.cancel()
            return pb.UploadReply(accepted=False)
        return super().UploadUpdate(request_iterator, context)


def test_a_transfer_the_coordinator_cuts_is_no_reason_to_rejoin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut transfer (CANCELLED from the coordinator) is not an unreachable coordinator: the
    node keeps its session and asks for its next task, which here is the same one again."""
    servicer = CutsFirstUpload()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port, caplog.at_level(logging.INFO):
        node = GroupNode(node_config(port, tmp_path, backoff_initial_s=0.5), worker())
        assert node.run() == 0
    assert servicer.joins == 1
    assert servicer.done and len(servicer.uploads) == 1  # the second upload, accepted
    assert "update cut by the coordinator" in caplog.text
    assert "unreachable" not in caplog.text


class StallsFirstDownload(CutsFirstUpload):
    """Holds the first download until the node's deadline for it has passed; counts Joins."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = True  # uploads are taken
        self.stalled = False

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        if not self.stalled:
            self.stalled = True
            while context.is_active():
                time.sleep(0.02)
            return
        yield from super().DownloadModel(request, context)


def test_a_transfer_past_its_deadline_is_no_reason_to_rejoin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A download that outlasts its task's time (DEADLINE_EXCEEDED: a slow link, a round that
    was too short) refuses that one task: the node keeps its session and asks for its next
    task, here the same one again; it does not back off and rejoin as if the coordinator were
    gone. The first transfer gets 0.5 s, the later ones their usual time."""
    servicer = StallsFirstDownload()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port, caplog.at_level(logging.INFO):
        node = GroupNode(node_config(port, tmp_path, backoff_initial_s=0.5), worker())
        times = [0.5]
        monkeypatch.setattr(node, "_time_left", lambda task: times.pop() if times else 30.0)
        assert node.run() == 0
    assert servicer.joins == 1
    assert servicer.done and servicer.downloads == 1  # the second download, then accepted
    assert "G: round 1 update refused: DEADLINE_EXCEEDED" in caplog.text
    assert "unreachable" not in caplog.text


class ForgetsSessionInFirstDownload(CutsFirstUpload):
    """Answers the first download UNAUTHENTICATED, as a coordinator restarted since the Join
    does (it no longer knows the session); counts Joins."""

    def __init__(self) -> None:
        super().__init__()
        self.cut = True  # uploads are taken
        self.forgot = False

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        if not self.forgot:
            self.forgot = True
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session 's-1': join again"
            )
        yield from super().DownloadModel(request, context)


def test_a_session_lost_during_a_task_is_joined_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A coordinator that restarted while the node worked on a task answers the task's transfer
    UNAUTHENTICATED (unknown session): the node joins again and goes on, as when a GetTask
    says so; it does not stop (exit 2) as if its certificate had been refused."""
    servicer = ForgetsSessionInFirstDownload()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port, caplog.at_level(logging.WARNING):
        node = GroupNode(node_config(port, tmp_path), worker())
        assert node.run() == 0
    assert servicer.joins == 2 and servicer.done and node.rounds_trained == 1
    assert "G: unknown or expired session 's-1'; joining again" in caplog.text


class NextRound(CannotStore):
    """Refuses the upload of task t-1 (INTERNAL: it could not store it), then offers the next
    task, on model v2, and takes its upload; records the task and base model of each upload.
    The next task is t-2, or with `same_id` t-1 again (the protocol fixes no format for task
    ids: a coordinator may name the next round's task as the last)."""

    def __init__(self, same_id: bool = False) -> None:
        super().__init__([pb.REJECT_REASON_INTERNAL])
        self.next_id = "t-1" if same_id else "t-2"
        self.uploaded: list[tuple[str, str, float]] = []  # (task id, base model, when)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        task = super().GetTask(request, context)
        if self.uploads and task.kind == pb.TASK_KIND_TRAIN:
            task.task_id, task.round, task.model_version = self.next_id, 2, "v2"
        return task

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        self.downloads += 1
        for raw in model_messages(small_weights(), request.model_version):
            yield pb.ModelChunk.FromString(raw)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        chunks = list(request_iterator)
        header = next(c.header for c in chunks if c.WhichOneof("part") == "header")
        self.uploaded.append((header.task_id, header.base_model_version, time.monotonic()))
        return super().UploadUpdate(iter(chunks), context)


def test_the_back_off_of_an_update_not_stored_does_not_hold_up_the_next_rounds_task(
    tmp_path: Path,
) -> None:
    """The back-off after an INTERNAL refusal is for sending that same update again: when the
    coordinator moves on to another task (its round closed), the node trains it at once, not
    after the back-off (up to UPLOAD_RETRY_MAX_S, 2 minutes) of an update nobody wants any
    more. Here the back-off is its first, 5 s."""
    servicer = NextRound()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        assert node.run() == 0
    (first, _, refused_at), (second, _, taken_at) = servicer.uploaded
    assert (first, second) == ("t-1", "t-2") and node.rounds_trained == 1
    assert taken_at - refused_at < node_module.UPLOAD_RETRY_INITIAL_S / 2


def test_an_update_not_stored_is_not_sent_again_for_a_task_on_another_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update kept after an INTERNAL refusal answers its task on the model it was trained
    from: offered a task of that id on another model version, the node trains that model
    instead of sending the old update (which the coordinator would refuse as stale)."""
    monkeypatch.setattr(node_module, "UPLOAD_RETRY_INITIAL_S", 0.3)
    servicer = NextRound(same_id=True)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        assert node.run() == 0
    assert [(task, base) for task, base, _ in servicer.uploaded] == [("t-1", "v1"), ("t-1", "v2")]
    assert servicer.downloads == 2 and node.rounds_trained == 1


class ShutsDown(StandIn):
    """Answers GetTask with SHUTDOWN naming `final` as the final model, which it does not have."""

    def __init__(self, final: str) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), [])
        self.final = final

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN, model_version=self.final)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_version}")
        yield from ()


@pytest.mark.parametrize("final", ["", "v9"], ids=["none-named", "not-found"])
def test_a_personalization_without_the_final_model_exits_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, final: str
) -> None:
    """A node asked to personalize (personalize_steps) whose final model could not be had
    (SHUTDOWN names none, or its download fails) says so and exits 1: exit 0 would tell the
    script that started it that the personalized checkpoint is there. It still leaves."""
    servicer = ShutsDown(final)  # type: ignore[abstract]
    folder = tmp_path / "personal"
    with stand_in_coordinator(servicer) as port:
        config = node_config(port, tmp_path, personalize_steps=2, personalized_dir=folder)
        with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
            assert GroupNode(config, worker()).run() == 1
    assert servicer.left == ["finished"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[-1] == "G: no personalized model: the final model was not available"
    assert not folder.exists() or not any(folder.iterdir())


class LongPoll(StandIn):
    """Holds every GetTask for its full `wait` (then WAIT), as a coordinator with no task does."""

    def __init__(self) -> None:
        super().__init__("", [])
        self.polling = threading.Event()

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polling.set()
        until = time.monotonic() + request.wait.ToMilliseconds() / 1000
        while context.is_active() and time.monotonic() < until:
            time.sleep(0.02)
        return pb.Task(kind=pb.TASK_KIND_WAIT)


class HoldsPastTheWait(LongPoll):
    """Holds each GetTask 0.3 s past the `wait` it asks for (a coordinator answers at the end
    of its wait, and the answer takes its time on the way), then WAIT; SHUTDOWN at the 4th;
    records the waits asked for and counts Joins."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.joins = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins += 1
        return super().Join(request, context)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.waits.append(request.wait.ToMilliseconds() / 1000)
        if len(self.waits) > 3:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        time.sleep(0.3)
        return super().GetTask(request, context)


def test_a_long_poll_asks_to_be_held_poll_wait_s_and_waits_for_the_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GetTaskRequest.wait says how long the coordinator may hold the poll (poll_wait_s), and
    the node gives the call more than that: a poll answered at the end of its wait is an
    answer, not a DEADLINE_EXCEEDED that makes the node rejoin as if the coordinator were
    gone. (Without the wait, the coordinator answers at once and the node polls every second.)"""
    servicer = HoldsPastTheWait()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port, caplog.at_level(logging.WARNING):
        node = GroupNode(node_config(port, tmp_path, poll_wait_s=0.5), worker())
        assert node.run() == 0
    assert servicer.waits == [0.5] * 4 and servicer.joins == 1
    assert "unreachable" not in caplog.text


def test_a_stopped_node_cancels_its_long_poll_leaves_and_says_it_was_stopped(
    tmp_path: Path,
) -> None:
    """Review F7: before, a stop waited for the long poll (up to poll_wait_s, 30 s), sent no
    Leave (the open round waited for the node until its session expired) and exited 0."""
    servicer = LongPoll()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path, poll_wait_s=30.0), worker())
        stopped: list[float] = []

        def stop() -> None:
            servicer.polling.wait(20)
            stopped.append(time.monotonic())
            node.stop(signal.SIGTERM)

        threading.Thread(target=stop, daemon=True).start()
        code = node.run()
        took = time.monotonic() - stopped[0]
    assert code == 143
    assert took < 2.0, took
    assert servicer.left == ["stopped by signal SIGTERM"]


def test_the_first_signal_decides_how_a_stopped_node_ends(tmp_path: Path) -> None:
    """A second signal while the node stops (an impatient Ctrl-C after `docker stop`) changes
    neither its exit code nor the reason it gives the coordinator in its Leave."""
    node = GroupNode(node_config(free_port(), tmp_path), worker())
    node.stop(signal.SIGTERM)
    node.stop(signal.SIGINT)
    assert node.run() == 143  # stopped before it joined: no Leave to send
    assert node._stop_reason == "stopped by signal SIGTERM"


def test_sigint_stops_a_node_in_its_long_poll_with_exit_code_130(tmp_path: Path) -> None:
    """The real signal path of `pluralfed node run`: the handler, the node's main thread
    blocked in the poll, and a second signal left to its default action."""
    servicer = LongPoll()  # type: ignore[abstract]
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path, poll_wait_s=30.0), worker())
        try:
            stop_on_signals(node)

            def interrupt() -> None:
                servicer.polling.wait(20)
                signal.raise_signal(signal.SIGINT)

            threading.Thread(target=interrupt, daemon=True).start()
            started = time.monotonic()
            code = node.run()
            took = time.monotonic() - started
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second one: at once
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
    assert code == 130 and took < 5.0, took
    assert servicer.left == ["stopped by signal SIGINT"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("when", ["expired", "not valid yet"])
def test_a_node_whose_certificate_is_no_longer_valid_says_so_when_it_cannot_connect(
    tmp_path: Path,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    when: str,
) -> None:
    """Review F10: a certificate that expired while the node ran (the coordinator down, or its
    handshake refused): before, "coordinator unreachable; retrying" for ever."""
    folder = pki.node("node-g")
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    now = (
        cert.not_valid_after_utc + dt.timedelta(days=1)
        if when == "expired"
        else cert.not_valid_before_utc - dt.timedelta(hours=1)
    )
    config = NodeConfig(
        coordinator=f"{HOST}:{free_port()}",  # nobody listens: UNAVAILABLE
        group="G",
        data=tmp_path / "g.csv",
        tls_dir=folder,
        backoff_initial_s=0.05,
        backoff_max_s=0.1,
        give_up_after_s=2.0,  # without the check: exit 1 after 2 s of "unreachable"
    )
    node = GroupNode(config, worker())  # loads the files now, while they are valid
    monkeypatch.setattr(client_module, "utc_now", lambda: now)
    with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
        assert node.run() == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    path = folder / CERT_FILE
    start = cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    end = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert error.startswith(f"G: cannot connect to {config.coordinator} (UNAVAILABLE): ")
    assert (
        f"this node's certificate {path} {'has expired' if when == 'expired' else 'is not valid yet'}"
        in error
    )
    assert f"valid from {start} until {end}" in error


def test_a_ca_file_of_a_rotation_with_one_ca_expired_is_no_certificate_problem(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """During a CA rotation ca.pem holds the old CA and the new one; one valid CA is enough. An
    unreachable coordinator after the old CA expired is retried (exit 1 at give_up_after_s), not
    blamed on "this node's CA certificate has expired" with exit 2."""
    old = create_ca(tmp_path / "old-ca", common_name="pluralfed old CA", days=30)
    folder = tmp_path / "node"
    shutil.copytree(pki.node("node-g"), folder)
    (folder / CA_CERT_FILE).write_bytes(
        old.cert.read_bytes() + (pki.ca / CA_CERT_FILE).read_bytes()
    )
    config = NodeConfig(
        coordinator=f"{HOST}:{free_port()}",  # nobody listens: UNAVAILABLE
        group="G",
        data=tmp_path / "g.csv",
        tls_dir=folder,
        backoff_initial_s=0.05,
        backoff_max_s=0.1,
        give_up_after_s=0.5,
    )
    node = GroupNode(config, worker())
    later = x509.load_pem_x509_certificate(old.cert.read_bytes()).not_valid_after_utc
    monkeypatch.setattr(client_module, "utc_now", lambda: later + dt.timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
        assert node.run() == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "giving up" in error and "expired" not in error


def test_node_check_names_an_expired_certificate(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = pki.node("node-g")
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    real_client = client_module.NodeClient

    def expired_later(config: NodeConfig) -> client_module.NodeClient:
        client = real_client(config)  # the files are valid when they are loaded
        monkeypatch.setattr(
            client_module, "utc_now", lambda: cert.not_valid_after_utc + dt.timedelta(days=1)
        )
        return client

    monkeypatch.setattr(commands_node, "NodeClient", expired_later)
    argv = ["node", "check", "--group", "G", "--tls-dir", str(folder)]
    assert main([*argv, "--coordinator", f"{HOST}:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "FAILED: UNAVAILABLE" in err
    assert f"meaning: this node's certificate {folder / CERT_FILE} has expired" in err


class NoWait(threading.Event):
    """A stop event whose waits return at once, moving the test's clock on by what they waited."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(round(timeout, 6))
        self.clock[0] += timeout
        if len(self.waits) > 20:  # a node that never gives up: stopped, the test fails at once
            self.set()
        return self.is_set()


def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The node's monotonic clock, as a list a NoWait moves on; its back-off jitter fixed at 1x."""
    clock = [1000.0]
    fake_time = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    monkeypatch.setattr(
        node_module, "time", SimpleNamespace(**{**fake_time, "monotonic": lambda: clock[0]})
    )
    monkeypatch.setattr(node_module, "random", SimpleNamespace(random=lambda: 0.5))
    return clock


def test_retries_of_an_unreachable_coordinator_back_off_to_a_cap_and_stop_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause between joins doubles up to backoff_max_s (a node down for a day still tries
    every few seconds once it is back, not once a week), and the last pause ends exactly at
    give_up_after_s, when the node tries once more and gives up (exit 1). On a clock the waits
    move, with the random jitter fixed at 1x: no sleeping, no timing."""
    clock = fake_clock(monkeypatch)
    config = node_config(
        free_port(), tmp_path, backoff_initial_s=1.0, backoff_max_s=4.0, give_up_after_s=30.0
    )
    node = GroupNode(config, worker())
    node._stop = stop = NoWait(clock)
    assert node.run() == 1
    assert stop.waits == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0]  # 27 s, then the last 3


def test_a_node_that_joined_starts_its_next_retries_from_the_initial_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join that succeeds resets the back-off: a coordinator restarted later finds its nodes
    back within backoff_initial_s, not after the longest pause an earlier outage grew to (and
    give_up_after_s counts from the new outage). The fourth join succeeds, its session ends at
    once, and the coordinator is unreachable from then on."""
    clock = fake_clock(monkeypatch)
    config = node_config(
        free_port(), tmp_path, backoff_initial_s=1.0, backoff_max_s=4.0, give_up_after_s=30.0
    )
    node = GroupNode(config, worker())
    node._stop = stop = NoWait(clock)
    real_join, joins = node._join, [0]

    def join() -> None:
        joins[0] += 1
        if joins[0] != 4:
            real_join()  # a closed port: UNAVAILABLE

    monkeypatch.setattr(node, "_join", join)
    monkeypatch.setattr(node, "_serve_tasks", lambda: False)  # the session ended: join again
    assert node.run() == 1
    # 1, 2, 4 before the join that succeeded; then from 1 again, and 30 s after that outage began
    assert stop.waits == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0]


class RefusesJoin(StandIn):
    """Refuses every Join with the given status, as a coordinator refuses a node set up wrong."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), [])
        self.code = code
        self.joins = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.joins += 1
        context.abort(self.code, "refused for a test")


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,  # a role this group may not take
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,  # another encoder than the federation's
        grpc.StatusCode.INVALID_ARGUMENT,  # a training node with no examples
        grpc.StatusCode.UNIMPLEMENTED,
    ],
    ids=lambda c: c.name.lower(),
)
def test_a_join_refused_for_good_stops_the_node_at_once_with_exit_code_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: grpc.StatusCode,
) -> None:
    """A refusal that no retry can change (the node's setup is wrong) stops it with the
    coordinator's reason and exit code 2, without one back-off: retried as an unreachable
    coordinator, it would knock every few seconds until give_up_after_s, then exit 1, the code
    of a network problem. On a clock the waits move."""
    clock = fake_clock(monkeypatch)
    servicer = RefusesJoin(code)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        config = node_config(port, tmp_path, backoff_initial_s=1.0, give_up_after_s=30.0)
        node = GroupNode(config, worker())
        node._stop = stop = NoWait(clock)
        with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
            assert node.run() == 2
    assert servicer.joins == 1 and stop.waits == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"G: refused by the coordinator ({code.name}): refused for a test"]


class WaitsLong(StandIn):
    """Answers the first GetTask with WAIT for an hour, the next with SHUTDOWN."""

    def __init__(self) -> None:
        super().__init__(json.dumps(SMALL.to_dict()), model_messages(small_weights()))
        self.asked = 0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.asked += 1
        if self.asked > 1:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        task = pb.Task(kind=pb.TASK_KIND_WAIT)
        task.retry_after.FromSeconds(3600)
        return task


def test_a_wait_longer_than_a_minute_is_cut_to_a_minute(tmp_path: Path) -> None:
    """A WAIT's retry_after is honoured up to MAX_RETRY_AFTER_S (60 s), then the node asks
    anyway: a faulty coordinator's "come back in an hour" must not leave a node deaf to a round
    that opens meanwhile (its waits return at once here; no sleeping)."""
    servicer = WaitsLong()  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        node = GroupNode(node_config(port, tmp_path), worker())
        node._stop = stop = NoWait([0.0])
        assert node.run() == 0
    assert stop.waits == [node_module.MAX_RETRY_AFTER_S] == [60.0]
    assert servicer.asked == 2


def test_a_node_replaced_three_times_in_ten_minutes_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes with one certificate take each other's session for ever: the third
    replacement within REPLACEMENT_WINDOW_S (600 s) stops the node; replacements further apart
    (a node restarted now and then) never do. On a clock the test sets."""
    clock = [1000.0]
    fake_time = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    monkeypatch.setattr(
        node_module, "time", SimpleNamespace(**{**fake_time, "monotonic": lambda: clock[0]})
    )

    def replaced_at(node: GroupNode, *moments: float) -> list[bool]:
        stops = []
        for at in moments:
            clock[0] = 1000.0 + at
            stops.append(node._replaced_again("replaced by a Join from ipv4:10.0.0.9:4000"))
        return stops

    node = GroupNode(node_config(free_port(), tmp_path), worker())
    assert replaced_at(node, 0.0, 100.0, 200.0) == [False, False, True]
    node = GroupNode(node_config(free_port(), tmp_path), worker())
    assert replaced_at(node, 0.0, 400.0, 700.0, 1200.0, 1250.0) == [False] * 4 + [True]


def test_a_pause_of_the_run_loop_runs_a_signal_handler_another_thread_took() -> None:
    """The kernel may hand SIGTERM to any thread. Python runs the handler on the main thread
    only when that thread next runs, and a main thread in one long Event.wait (the node's
    back-off, up to backoff_max_s) did not: `docker stop` was ignored until the pause ended.
    Here a helper thread takes the signal; the handler (as `stop_on_signals`'s, it leaves the
    stop to a thread) must end a 60 s pause at once."""
    stop = node_module.StopEvent()
    handled: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        handled.append(signum)
        threading.Thread(target=stop.set, daemon=True).start()

    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:

        def take_the_signal() -> None:
            time.sleep(0.5)  # the main thread is in its pause by then
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

        taker = threading.Thread(target=take_the_signal)
        started = time.monotonic()
        taker.start()
        assert stop.wait(60.0)
        assert handled == [signal.SIGUSR1] and time.monotonic() - started < 10.0
        taker.join(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # and a pause still lasts as long as it was asked to, if nothing stops it
    started = time.monotonic()
    assert not node_module.StopEvent().wait(1.2)
    assert 1.2 <= time.monotonic() - started < 5.0


def test_a_node_backing_off_stops_on_a_signal_another_thread_took() -> None:
    """The node's own pauses are of that kind: a node backing off for up to a minute (its
    coordinator unreachable) leaves its pause at once on a signal the kernel handed to another
    thread, and returns 128 + the signal's number."""
    cfg = NodeConfig(
        coordinator=f"{HOST}:{free_port()}",
        group="G",
        insecure=True,
        backoff_initial_s=60.0,
        backoff_max_s=60.0,
    )
    stub = SimpleNamespace(num_train_examples=4, encoder=SimpleNamespace(identity="e"))
    node = GroupNode(cfg, stub)  # type: ignore[arg-type]
    paused = threading.Event()
    wait = node._stop.wait

    def noted_wait(timeout: float | None = None) -> bool:
        paused.set()
        return wait(timeout)

    node._stop.wait = noted_wait  # type: ignore[method-assign]

    def on_signal(signum: int, _frame: object) -> None:  # as stop_on_signals': stop in a thread
        threading.Thread(target=node.stop, args=(signum,), daemon=True).start()

    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:

        def take_the_signal() -> None:
            assert paused.wait(30), "the node never paused"
            time.sleep(0.3)  # the main thread is in its pause by then
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

        taker = threading.Thread(target=take_the_signal, daemon=True)
        taker.start()
        started = time.monotonic()
        assert node.run() == 128 + signal.SIGUSR1
        assert time.monotonic() - started < 10.0
        taker.join(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        node.client.close()
