"""A node that stalls a bulk stream (an upload that stops after its header, a download it
stops reading) must not hold a stream slot past its round's deadline, nor run two of a kind at
once; a coordinator that cannot store an update says so in the UploadReply (INTERNAL). Real
coordinator server and nodes' RPCs over gRPC on 127.0.0.1 (plain text: TLS is not the point)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedharness import HOST, FakeNode, reject_name, update_messages, wait_until

import coordinator.server as server_module
from coordinator.rounds import RoundEngine, RoundSettings
from coordinator.server import StreamSlots, start_server
from pluralfed.auth import AllowList
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb

pytestmark = pytest.mark.timeout(90)

ENC = "enc"
NODES = {"node-a": "A", "node-b": "B"}


class Federation:
    def __init__(self, tmp: Path, weights: dict[str, np.ndarray], **slots: Any) -> None:
        settings = RoundSettings(
            rounds=2,
            min_nodes=2,
            round_timeout_s=3.0,
            eval_every=0,
            heartbeat_interval_s=1.0,
            session_timeout_s=120.0,
        )
        self.engine = RoundEngine(settings, weights, tmp / "state", ENC, {})
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
        # a second upload of the same session at the same time is ignored, not queued
        second = fed.a.stub.UploadUpdate(iter(mine), timeout=10)
        assert reject_name(second) == "DUPLICATE" and "already being read" in second.message
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


def test_a_download_nobody_reads_frees_its_slot_and_one_runs_per_node(tmp_path: Path) -> None:
    slots = StreamSlots(1)
    fed = Federation(tmp_path, {"w": np.zeros(2_000_000, np.float32)}, download_slots=slots)
    try:
        tb = fed.b.wait_task(pb.TASK_KIND_TRAIN)
        request = pb.DownloadModelRequest(
            session_id=fed.a.session_id, model_version=tb.model_version
        )
        stuck = fed.a.stub.DownloadModel(request)
        next(stuck)  # the header: a slot is taken; A reads no more (8 MB stay unsent)
        assert slots.active == 1
        with pytest.raises(grpc.RpcError) as second:
            next(fed.a.stub.DownloadModel(request, timeout=10))
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # at round 1's deadline (3 s) + grace the stuck download is cut; before, it held the
        # slot for ever and no node got the model again
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
        assert sum(1 for _ in fed.b.stub.DownloadModel(theirs, timeout=20)) > 2
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
