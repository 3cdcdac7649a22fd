"""What a node does with its heartbeats (protocol review P4), against stand-in coordinators
(real gRPC servers on 127.0.0.1):

- the node beats at the interval of the last HeartbeatReply, clamped as the Join's is.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import grpc
import pytest
from fedharness import HOST, stand_in_coordinator
from test_validation_node import StandIn

from group_node.client import MAX_HEARTBEAT_INTERVAL_S
from group_node.config import NodeConfig
from group_node.node import GroupNode
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb

pytestmark = pytest.mark.timeout(60)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("INSECURE")
    ]


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
        self.beats, self.waits = beats, []

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
    servicer = ChangesInterval([2.0, 7.0, None, 0.001, 1e6, 1e6, 4.0])
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
