"""No-op pluralfed group nodes for the systems benchmark: the real protocol, no training.

One process hosts one or more nodes, each a thread with its own mutual-TLS channel (its own
client certificate, its own connection). A node joins, long-polls GetTask, and for TRAIN
downloads the global model, adds a fixed random delta (drawn once per node: "training" costs
one vector add) and uploads the result; EVALUATE is answered with constant metrics and no
download. Only the generated stubs, pluralfed.wire, pluralfed.transport and pluralfed.tls are
used: no torch. Each process writes a JSON with per-round timings and its CPU/IO accounting.

    python bench/noop_node.py --port P --pki DIR --ids n0000,n0001 --out OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import ENCODER_ID, HOST, usage, write_json

from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.tls import TlsFiles
from pluralfed.transport import (
    PROTOCOL_VERSION,
    BulkStreamCalls,
    grpc_options,
    receive_model,
    update_stream,
    upload_chunk_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES

EVAL_METRICS = {
    "model": 0.5,
    "uniform_context": 0.5,
    "uniform_baseline": 0.5,
    "prior_baseline": 0.5,
}


class NoopNode:
    def __init__(
        self,
        node_id: str,
        tls_dir: Path,
        port: int,
        seed: int,
        scale: float,
        *,
        role: pb.Role.ValueType = pb.ROLE_TRAIN,
        encoder_id: str = ENCODER_ID,
    ) -> None:
        """`encoder_id`: what Join claims; bench_coordinator.py expects ENCODER_ID, the real
        `pluralfed coordinator` its encoder's identity (its state.json's encoder_identity)."""
        self.node_id = node_id
        self.role = role
        self.encoder_id = encoder_id
        creds = TlsFiles.from_dir(tls_dir).channel_credentials()
        # own subchannel per node: one TCP+TLS connection per node, as separate machines would
        options = [*grpc_options(), ("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.secure_channel(f"{HOST}:{port}", creds, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        bulk = BulkStreamCalls.on(self.channel)  # the same calls as group_node.node
        self.download_model = bulk.download_model
        self.upload_update = bulk.upload_update
        self.session_id = ""
        self.chunk_bytes = DEFAULT_CHUNK_BYTES
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self.delta: dict[str, np.ndarray] | None = None
        self.rounds: list[dict[str, Any]] = []
        self.error: str | None = None
        self.done = False

    def join(self, deadline: float) -> None:
        while True:
            try:
                reply = self.stub.Join(
                    pb.JoinRequest(
                        group=self.node_id,
                        role=self.role,
                        num_train_examples=100,
                        software_version="bench",
                        protocol_version=PROTOCOL_VERSION,
                        encoder_id=self.encoder_id,
                    ),
                    timeout=30,
                )
                self.session_id = reply.session_id
                self.chunk_bytes = upload_chunk_bytes(reply.max_chunk_bytes)
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.time() > deadline:
                    raise
                time.sleep(0.2)

    def download(self, version: str) -> dict[str, np.ndarray]:
        stream = self.download_model(
            pb.DownloadModelRequest(session_id=self.session_id, model_version=version), timeout=600
        )
        return receive_model(stream, lambda message: RuntimeError(f"download: {message}"))

    def upload(self, task: pb.Task, weights: dict[str, np.ndarray]) -> pb.UploadReply:
        header = pb.UpdateHeader(
            session_id=self.session_id,
            task_id=task.task_id,
            round=task.round,
            base_model_version=task.model_version,
            num_examples=100,
            metrics={"seconds": 0.0},
        )
        reply: pb.UploadReply = self.upload_update(
            update_stream(header, weights, self.chunk_bytes), timeout=600
        )
        return reply

    def train(self, task: pb.Task) -> None:
        t0, c0 = time.time(), time.process_time()
        weights = self.download(task.model_version)
        t1, c1 = time.time(), time.process_time()
        if self.delta is None:  # drawn once: "training" is one add per round
            self.delta = {
                k: (self.rng.standard_normal(v.shape, np.float32) * self.scale).astype(v.dtype)
                for k, v in weights.items()
            }
        for k, v in weights.items():
            np.add(v, self.delta[k], out=v)
        t2, c2 = time.time(), time.process_time()
        reply = self.upload(task, weights)
        t3, c3 = time.time(), time.process_time()
        nbytes = sum(v.nbytes for v in weights.values())
        self.rounds.append(
            {
                "round": task.round,
                "dl_start": t0,
                "dl_end": t1,
                "up_start": t2,
                "up_end": t3,
                # the process's CPU seconds in each phase (all its threads: per node only when
                # the process runs one node)
                "cpu_download_s": c1 - c0,
                "cpu_upload_s": c3 - c2,
                "bytes": nbytes,
                "accepted": reply.accepted,
                "reason": pb.RejectReason.Name(reply.reason) if not reply.accepted else "",
            }
        )

    def evaluate(self, task: pb.Task) -> None:
        self.stub.ReportEvaluation(
            pb.EvaluationReport(
                session_id=self.session_id,
                task_id=task.task_id,
                round=task.round,
                group=self.node_id,
                model_version=task.model_version,
                metrics=pb.GroupMetrics(num_questions=1, mean_alignment=0.5, metrics=EVAL_METRICS),
            ),
            timeout=60,
        )

    def step(self) -> bool:
        """One long poll and the task it brings; False once the coordinator says SHUTDOWN (the
        node has then left). RPC errors go to the caller."""
        req = pb.GetTaskRequest(session_id=self.session_id)
        req.wait.FromMilliseconds(30_000)
        task = self.stub.GetTask(req, timeout=60)
        if task.kind == pb.TASK_KIND_SHUTDOWN:
            with contextlib.suppress(grpc.RpcError):
                self.stub.Leave(pb.LeaveRequest(session_id=self.session_id), timeout=10)
            self.done = True
            return False
        if task.kind == pb.TASK_KIND_TRAIN:
            self.train(task)
        elif task.kind == pb.TASK_KIND_EVALUATE:
            self.evaluate(task)
        return True

    def run(self, deadline: float) -> None:
        try:
            while time.time() < deadline:
                if not self.step():
                    return
            self.error = "benchmark deadline passed"
        except Exception as err:  # recorded, reported by the orchestrator
            self.error = f"{type(err).__name__}: {err}"


def heartbeats(nodes: list[NoopNode], stop: threading.Event, every_s: float = 5.0) -> None:
    """One heartbeat thread per process, for all its nodes, until `stop` is set."""
    while not stop.wait(every_s):
        for n in nodes:
            if not n.done:
                with contextlib.suppress(grpc.RpcError):
                    n.stub.Heartbeat(
                        pb.HeartbeatRequest(session_id=n.session_id, state=pb.NODE_STATE_IDLE),
                        timeout=10,
                    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pki", type=Path, required=True)
    ap.add_argument("--ids", required=True, help="comma-separated node ids (= group names)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--scale", type=float, default=1e-3, help="size of the random delta")
    args = ap.parse_args()
    start = usage()
    deadline = time.time() + args.timeout
    ids = args.ids.split(",")
    nodes = [
        NoopNode(nid, args.pki / "nodes" / nid, args.port, seed=i + 1, scale=args.scale)
        for i, nid in enumerate(ids)
    ]
    for n in nodes:
        n.join(deadline)
    joined = usage()
    stop_beats = threading.Event()
    beats = threading.Thread(target=heartbeats, args=(nodes, stop_beats), daemon=True)
    beats.start()
    threads = [threading.Thread(target=n.run, args=(deadline,), name=n.node_id) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.time() + 5))
    stop_beats.set()
    end = usage()
    for n in nodes:
        n.channel.close()
    write_json(
        args.out,
        {
            "ids": ids,
            "start": start,
            "joined": joined,
            "end": end,
            "nodes": {
                n.node_id: {"rounds": n.rounds, "error": n.error, "done": n.done} for n in nodes
            },
        },
    )
    return 0 if all(n.done and n.error is None for n in nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
