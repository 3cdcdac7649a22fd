"""A node refuses a JoinReply it cannot work with: no session id, or a heartbeat interval over
the cap (MAX_HEARTBEAT_INTERVAL_S). It stops with one error line naming the field and exit code
2, before it asks for any task. The coordinator is a stand-in: a real gRPC server on 127.0.0.1
answering Join as each test says (tests/test_validation_node.py's StandIn)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_validation_node import STUB_WORKER, StandIn, run_node

from group_node.client import MAX_HEARTBEAT_INTERVAL_S
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.transport import PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(60)


class JoinStandIn(StandIn):
    """Answers Join with `reply`; counts the calls a node makes only once it has joined, and
    ends the federation at the first task poll (SHUTDOWN)."""

    def __init__(self, reply: pb.JoinReply) -> None:
        super().__init__("", [])
        self.reply = reply
        self.polls = 0
        self.downloads = 0
        self.uploads = 0
        self.reports = 0

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        return self.reply

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        self.polls += 1
        return pb.Task(kind=pb.TASK_KIND_SHUTDOWN)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelChunk]:
        self.downloads += 1
        yield from super().DownloadModel(request, context)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        self.uploads += 1
        return pb.UploadReply(accepted=False, message="the stand-in takes no updates")

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.Ack:
        self.reports += 1
        return pb.Ack()


def join_reply(session_id: str = "s-1", heartbeat_s: float = 5.0) -> pb.JoinReply:
    reply = pb.JoinReply(session_id=session_id, run_id="r-1", protocol_version=PROTOCOL_VERSION)
    reply.heartbeat_interval.FromMilliseconds(round(heartbeat_s * 1000))
    return reply


ERROR_LINE = re.compile(r"^G: stopping: coordinator 127\.0\.0\.1:\d+: (.*)$")


@pytest.mark.parametrize(
    ("reply", "refusal", "left"),
    [
        (join_reply(session_id=""), "JoinReply.session_id is empty", []),
        (
            join_reply(heartbeat_s=MAX_HEARTBEAT_INTERVAL_S + 1),
            "JoinReply.heartbeat_interval 3601 s is over 3600 s",
            ["stopped on an error"],
        ),
        (
            join_reply(heartbeat_s=1e9),
            "JoinReply.heartbeat_interval 1e+09 s is over 3600 s",
            ["stopped on an error"],
        ),
    ],
    ids=["empty session id", "heartbeat just over the cap", "heartbeat of 31 years"],
)
def test_the_node_refuses_a_join_reply_it_cannot_work_with(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    reply: pb.JoinReply,
    refusal: str,
    left: list[str],
) -> None:
    servicer = JoinStandIn(reply)
    code, errors = run_node(servicer, tmp_path, STUB_WORKER, caplog)
    assert code == 2
    assert len(errors) == 1 and errors[0].exc_info is None, [e.getMessage() for e in errors]
    match = ERROR_LINE.match(errors[0].getMessage())
    assert match is not None and match.group(1) == refusal, errors[0].getMessage()
    # nothing of the session was used: no task asked for, no model fetched
    assert (servicer.polls, servicer.downloads, servicer.uploads, servicer.reports) == (0, 0, 0, 0)
    assert servicer.left == left  # a session id it was given is left at once


def test_a_join_reply_at_the_cap_is_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The control: the same stand-in with a heartbeat interval of exactly the cap is joined,
    and the node goes on to ask for its task (here: the federation is over)."""
    servicer = JoinStandIn(join_reply(heartbeat_s=MAX_HEARTBEAT_INTERVAL_S))
    code, errors = run_node(servicer, tmp_path, STUB_WORKER, caplog)
    assert (code, errors) == (0, [])
    assert servicer.polls == 1 and servicer.left == ["finished"]
