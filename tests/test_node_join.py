"""What a node takes from the coordinator's Join reply, against a stand-in coordinator (a real
gRPC server on 127.0.0.1, plain text) that answers Join with a chosen max_chunk_bytes: the node
cuts its uploads to it, uses the protocol's default when the coordinator leaves it unset, and
refuses to go on, saying what is wrong, when the value is out of range. And a TRAIN task
with bad settings: refused once, with the field named, and not asked for again in a tight loop.
And the task an upload or an evaluation report names: the one it was made for."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedharness import stand_in_coordinator

from coordinator.server import task_to_proto
from coordinator.tasks import TaskKind, TaskSpec
from group_node.client import NodeClient
from group_node.config import NodeConfig
from group_node.node import REFUSED_TASK_POLL_S, GroupNode
from pluralfed import protocol
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.transport import (
    DEFAULT_UPLOAD_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    PROTOCOL_VERSION,
    upload_chunk_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES

pytestmark = pytest.mark.timeout(60)


# A stand-in serves only the RPCs it defines; the generated base answers the rest UNIMPLEMENTED.
# The stubs mark those abstract, so making one is `# type: ignore[abstract]`.
class JoinOnly(pb_grpc.FederationServicer):
    def __init__(self, max_chunk_bytes: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        self.join_request = request
        return pb.JoinReply(
            session_id="s-1",
            protocol_version=PROTOCOL_VERSION,
            max_chunk_bytes=self.max_chunk_bytes,
        )

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        chunks = list(request_iterator)
        self.headers = [c.header for c in chunks if c.WhichOneof("part") == "header"]
        self.data_sizes = [len(c.tensor.data) for c in chunks if c.WhichOneof("part") == "tensor"]
        return pb.UploadReply(accepted=True)

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.Ack:
        self.report = request
        return pb.Ack()


@pytest.fixture
def coordinator() -> Iterator[tuple[JoinOnly, int]]:
    servicer = JoinOnly(0)  # type: ignore[abstract]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(None).wait(5)


def client(port: int, tmp_path: Path) -> NodeClient:
    config = NodeConfig(
        coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
    )
    return NodeClient(config)


@pytest.mark.parametrize(
    ("advertised", "used"),
    [
        (0, DEFAULT_CHUNK_BYTES),  # a coordinator that does not say: the protocol's default
        (MIN_CHUNK_BYTES, MIN_CHUNK_BYTES),
        (DEFAULT_UPLOAD_CHUNK_BYTES, DEFAULT_UPLOAD_CHUNK_BYTES),
        (DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_BYTES),
    ],
)
def test_node_uploads_with_the_chunk_size_join_gives(
    coordinator: tuple[JoinOnly, int], tmp_path: Path, advertised: int, used: int
) -> None:
    servicer, port = coordinator
    servicer.max_chunk_bytes = advertised
    node = client(port, tmp_path)
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-1", round=1, model_version="v1")
    weights = {"w": np.ones(640_000, dtype=np.float32)}  # 2.56 MB
    try:
        node.join(10, "enc")
        assert node.upload_chunk_bytes == used
        assert node.upload(task, weights, 10, {}, timeout=30).accepted
    finally:
        node.close()
    # the upload itself is cut to that size (the protocol: at most max_chunk_bytes of data)
    assert max(servicer.data_sizes) <= used and sum(servicer.data_sizes) == 640_000 * 4


@pytest.mark.parametrize("advertised", [1, MIN_CHUNK_BYTES - 1, DEFAULT_CHUNK_BYTES + 1])
def test_node_refuses_a_chunk_size_out_of_range(
    coordinator: tuple[JoinOnly, int], tmp_path: Path, advertised: int
) -> None:
    servicer, port = coordinator
    servicer.max_chunk_bytes = advertised
    node = client(port, tmp_path)
    try:
        with pytest.raises(InputError, match=rf"Join reply: .*max_chunk_bytes.*got {advertised}"):
            node.join(10, "enc")
    finally:
        node.close()


def test_upload_chunk_bytes_range() -> None:
    assert upload_chunk_bytes(0) == DEFAULT_CHUNK_BYTES
    assert upload_chunk_bytes(65536) == 65536
    for bad in (-1, MIN_CHUNK_BYTES - 1, DEFAULT_CHUNK_BYTES + 1):
        with pytest.raises(ValueError, match=str(bad)):
            upload_chunk_bytes(bad)


class OffersABadTrainTask(JoinOnly):
    """Offers one TRAIN task with an out-of-range embedding noise, as a real coordinator keeps
    offering a task until it is answered, then SHUTDOWN after `open_s`."""

    def __init__(self, open_s: float) -> None:
        super().__init__(0)
        self.closes_at = time.monotonic() + open_s
        self.offers = 0
        self.downloads = 0
        self.failed: list[tuple[str, str]] = []  # (task_id, message) of FAILED heartbeats

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if time.monotonic() >= self.closes_at:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        self.offers += 1
        task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-1", round=1, model_version="v1")
        hp = task.hyperparameters
        hp.local_steps, hp.learning_rate, hp.embedding_noise = 6, 3e-4, 7.0
        hp.context_range.min, hp.context_range.max = 9, 90
        hp.target_range.min, hp.target_range.max = 9, 90
        return task

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        self.downloads += 1
        context.abort(grpc.StatusCode.NOT_FOUND, "no model here")

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        if request.state == pb.NODE_STATE_FAILED:
            self.failed.append((request.task_id, request.message))
        return pb.HeartbeatReply()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        return pb.Ack()


def test_node_refuses_a_train_task_with_bad_settings_once_and_waits_the_round_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = OffersABadTrainTask(open_s=3.0)
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}", group="G", data=tmp_path / "g.csv", insecure=True
        )
        node = GroupNode(config, worker=None)  # type: ignore[arg-type]  # never reaches training
        try:
            node.client.join(10, "enc")
            with caplog.at_level(logging.ERROR, logger="pluralfed.node"):
                assert node._serve_tasks() is True  # reached SHUTDOWN
        finally:
            node.client.close()
    refusals = [r.getMessage() for r in caplog.records if "task refused" in r.getMessage()]
    assert refusals == [
        "G: round 1 task refused: TRAIN hyperparameters: embedding_noise 7.0 is not in 0..1.0"
    ]
    assert servicer.downloads == 0
    # ... and told the coordinator at once, so that its round need not wait for it
    assert servicer.failed == [
        ("t-1", "TRAIN hyperparameters: embedding_noise 7.0 is not in 0..1.0")
    ]
    # asked again every REFUSED_TASK_POLL_S while the round was open, not in a tight loop
    assert 1 <= servicer.offers <= 1 + math.ceil(3.0 / REFUSED_TASK_POLL_S) + 1


class AnswersWait(JoinOnly):
    """Answers every GetTask with WAIT and the given retry_after (SHUTDOWN after `open_s`)."""

    def __init__(self, retry_after_s: float, open_s: float) -> None:
        super().__init__(0)
        self.retry_after_ms = int(retry_after_s * 1000)
        self.closes_at = time.monotonic() + open_s
        self.polls = 0

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        if time.monotonic() >= self.closes_at:
            return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)
        self.polls += 1
        task = pb.Task(kind=pb.TASK_KIND_WAIT)
        task.retry_after.FromMilliseconds(self.retry_after_ms)
        return task

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        return pb.HeartbeatReply()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        return pb.Ack()


def test_node_waits_as_long_as_wait_answers_say_before_asking_again(tmp_path: Path) -> None:
    """A node with the shortest poll (0.1 s) that hears WAIT, retry after 0.5 s, asks about
    twice a second, not ten times."""
    servicer = AnswersWait(retry_after_s=0.5, open_s=2.0)  # type: ignore[abstract]
    with stand_in_coordinator(servicer) as port:
        config = NodeConfig(
            coordinator=f"127.0.0.1:{port}",
            group="G",
            data=tmp_path / "g.csv",
            insecure=True,
            poll_wait_s=0.1,
        )
        node = GroupNode(config, worker=None)  # type: ignore[arg-type]  # never trains
        try:
            node.client.join(10, "enc")
            assert node._serve_tasks() is True  # reached SHUTDOWN
        finally:
            node.client.close()
    assert 2 <= servicer.polls <= 5, servicer.polls


@pytest.mark.parametrize("coordinator_clock_off_s", [-600.0, 0.0, 600.0])
def test_transfer_timeouts_follow_the_tasks_time_budget_not_the_coordinators_clock(
    tmp_path: Path, coordinator_clock_off_s: float
) -> None:
    """A coordinator in another organization whose clock is 10 minutes off: before, a node
    behind it gave every transfer 5 s (its downloads of a large model failed), one ahead ~10
    minutes more than the round had."""
    config = NodeConfig(
        coordinator="127.0.0.1:1", group="G", data=tmp_path / "g.csv", insecure=True
    )
    node = GroupNode(config, worker=None)  # type: ignore[arg-type]  # no task is run
    try:
        task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t")
        task.deadline.FromMilliseconds(int((time.time() + coordinator_clock_off_s + 60) * 1000))
        task.time_budget.FromMilliseconds(60_000)
        node._task_received = time.monotonic() - 20.0  # the task came 20 s ago
        assert node._time_left(task) == pytest.approx(45.0, abs=0.5)  # 60 - 20 + 5 s grace
        # a coordinator that sends only the timestamp: that is all there is to go by
        task.ClearField("time_budget")
        assert node._time_left(task) == pytest.approx(
            max(5.0, 65.0 + coordinator_clock_off_s), abs=0.5
        )
    finally:
        node.client.close()


def test_a_task_carries_the_time_left_and_the_wall_clock_end_of_its_round() -> None:
    """The coordinator's half of the test above: time_budget is the time left until the
    round's deadline (kept on the coordinator's monotonic clock), deadline the wall-clock
    moment it ends. Only the node's reading of the two fields was tested; a budget off by a
    factor would set every node's transfer timeouts wrong."""
    task = task_to_proto(TaskSpec(TaskKind.TRAIN, "t", 1, "v", time.monotonic() + 60.0))
    assert task.time_budget.ToMilliseconds() == pytest.approx(60_000, abs=1_000)
    assert task.deadline.ToMilliseconds() / 1000 == pytest.approx(time.time() + 60.0, abs=1.0)
    # a deadline already past: no time left, not a negative budget
    task = task_to_proto(TaskSpec(TaskKind.TRAIN, "t", 1, "v", time.monotonic() - 5.0))
    assert task.time_budget.ToMilliseconds() == 0


def test_a_transfer_never_gets_more_than_a_day_whatever_the_task_says(tmp_path: Path) -> None:
    """A time budget of years (a coordinator's bug) is cut to MAX_TASK_TIME_S, a day: gRPC fails
    at once a call whose deadline is too far out, so the task would fail instead."""
    config = NodeConfig(
        coordinator="127.0.0.1:1", group="G", data=tmp_path / "g.csv", insecure=True
    )
    node = GroupNode(config, worker=None)  # type: ignore[arg-type]  # no task is run
    try:
        task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t")
        task.time_budget.FromSeconds(10 * 365 * 24 * 3600)
        node._task_received = time.monotonic()
        assert node._time_left(task) == 24 * 3600.0
    finally:
        node.client.close()


def test_an_upload_and_a_report_answer_the_task_they_were_made_for(
    coordinator: tuple[JoinOnly, int], tmp_path: Path
) -> None:
    """The coordinator matches an update or an evaluation to its task by the task id, round and
    the model version it was made from: the node sends those of the task it was given."""
    servicer, port = coordinator
    node = client(port, tmp_path)
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, task_id="t-7", round=7, model_version="v6")
    try:
        node.join(10, "enc")
        weights = {"w": np.zeros(3, dtype=np.float32)}
        assert node.upload(task, weights, 10, {"loss": 0.5}, timeout=10).accepted
        node.report(task, "G", {"model": 0.7}, 4)
    finally:
        node.close()
    (header,) = servicer.headers
    assert (header.session_id, header.task_id, header.round) == ("s-1", "t-7", 7)
    assert (header.base_model_version, header.num_examples) == ("v6", 10)
    report = servicer.report
    assert (report.session_id, report.task_id, report.round) == ("s-1", "t-7", 7)
    assert (report.group, report.model_version, report.metrics.num_questions) == ("G", "v6", 4)


@pytest.mark.parametrize(
    ("role", "sent"), [("train", pb.ROLE_TRAIN), ("evaluate-only", pb.ROLE_EVALUATE_ONLY)]
)
def test_a_join_asks_for_the_role_the_node_is_set_to(
    coordinator: tuple[JoinOnly, int], tmp_path: Path, role: str, sent: pb.Role.ValueType
) -> None:
    """An evaluate-only node that joined as a trainer would be refused by a coordinator that
    lists its group as evaluate-only, or, by one that does not, given TRAIN tasks for a group
    meant to be held out of training."""
    servicer, port = coordinator
    config = NodeConfig(
        coordinator=f"127.0.0.1:{port}",
        group="G",
        data=tmp_path / "g.csv",
        insecure=True,
        role=role,
    )
    node = NodeClient(config)
    try:
        node.join(10, "enc")
    finally:
        node.close()
    request = servicer.join_request
    assert (request.group, request.role, request.num_train_examples) == ("G", sent, 10)
    assert request.encoder_id == "enc" and not request.check_only


def test_a_join_reply_without_a_heartbeat_interval_gets_the_protocols_shortest(
    coordinator: tuple[JoinOnly, int], tmp_path: Path
) -> None:
    """A coordinator that sends no interval (0, or one below the protocol's shortest) must not
    make the node send heartbeats in a tight loop: the interval is at least MIN_HEARTBEAT_S."""
    _servicer, port = coordinator
    node = client(port, tmp_path)
    try:
        node.join(10, "enc")
        assert node.heartbeat_interval_s == protocol.MIN_HEARTBEAT_S > 0
    finally:
        node.close()
