"""The coordinator's gRPC transport: protobuf messages in, `RoundEngine` calls out.

Nothing here knows about models or training. Authentication happened before any handler runs
(`pluralfed.auth.AuthInterceptor`); handlers only check that a node acts as itself and turn
messages into engine calls, engine refusals into gRPC statuses. The bookkeeping of the bulk
streams (how many run at once, cutting stale ones, one upload and one download per node) is in
`coordinator.streams`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.rounds import RoundEngine
from coordinator.sessions import NodeSession, Role
from coordinator.streams import NodeStreams, RunningStream, StaleTransfers, StreamSlots
from coordinator.tasks import GlobalModel, TaskKind, TaskSpec
from coordinator.validation import (
    MAX_FREE_TEXT,
    MAX_NODE_EXAMPLES,
    MAX_WAIT_S,
    Rejection,
    checked_metrics,
    checked_text,
    clipped,
)
from pluralfed import __version__
from pluralfed.auth import (
    AllowList,
    AuthInterceptor,
    RevocationWatch,
    authenticated_node,
    present,
    require_self,
)
from pluralfed.logthrottle import LogThrottle
from pluralfed.metrics import GroupEvaluation
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.protocol import KEEP_LOCAL_OPTIMIZER_STATE, MAX_GROUP_NAME, MIN_POLL_INTERVAL_S
from pluralfed.tls import TlsFiles
from pluralfed.transport import (
    DEFAULT_UPLOAD_CHUNK_BYTES,
    DOWNLOAD_METHOD,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SERVER_STREAM_WINDOW_BYTES,
    UPLOAD_METHOD,
    StreamDeadlines,
    bind_port,
    check_chunk_bytes,
    check_window_bytes,
    chunk_from_proto,
    decode_update_chunk,
    dtype_to_proto,
    serialize_message,
    serialized_tensor_part,
    server_grpc_options,
)
from pluralfed.wire import (
    DEFAULT_CHUNK_BYTES,
    WIRE_FORMAT,
    Chunk,
    DigestMismatchError,
    NonFiniteError,
    TensorSpec,
    UpdateSpool,
    WireError,
    digest_of,
    iter_chunks,
)

log = logging.getLogger("pluralfed.coordinator")

# how long a GetTask without `wait` is held (the protocol: the coordinator's default), so that a
# node leaving it unset does not busy-poll on WAIT answers with a zero retry_after
DEFAULT_WAIT_S = 10.0
# HeartbeatRequest.task_id: the coordinator's task ids are 32 hex digits
MAX_TASK_ID = 64
# how far EvaluationReport.metrics.mean_alignment may differ from the "model" metric it repeats
MEAN_ALIGNMENT_TOLERANCE = 1e-9
# uploads read at once (CoordinatorConfig.max_concurrent_uploads); more wait for a slot
DEFAULT_MAX_CONCURRENT_UPLOADS = 4
# downloads sent at once (CoordinatorConfig.max_concurrent_downloads); more wait for a slot
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4
# Calls one node may have in flight (a long poll, a heartbeat, a transfer, an evaluation report,
# and room for the calls of a connection it is replacing): one node cannot take every RPC thread.
MAX_CALLS_PER_NODE = 8
# HTTP/2 streams one connection may have open at once (gRPC's `grpc.max_concurrent_streams`,
# unbounded by default). A node's connection carries a few calls at once (its task loop's one
# call, its heartbeat, the Leave of a node stopping); `node check` and the health check connect
# on their own. Without a bound, one connection could open thousands of streams: each is a call
# gRPC hands to Python and counts against `maximum_concurrent_rpcs`, which is server-wide (past
# it, every node's calls are refused), and the health check's Check, which needs no allow-listed
# identity and so no MAX_CALLS_PER_NODE, holds an RPC thread while it waits for its request.
# gRPC refuses a stream past the bound (REFUSED_STREAM: UNAVAILABLE at the client) before Python
# sees it, counting the streams it has not yet freed (finished or cancelled calls whose handler
# still runs), hence twice a node's call limit. A peer that opens more connections gets this
# many streams on each (a bound per connection, not per peer).
MAX_STREAMS_PER_CONNECTION = 2 * MAX_CALLS_PER_NODE

_TASK_KINDS = {
    TaskKind.TRAIN: pb.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE,
    TaskKind.WAIT: pb.TASK_KIND_WAIT,
    TaskKind.SHUTDOWN: pb.TASK_KIND_SHUTDOWN,
}


def _abort(context: grpc.ServicerContext, rejection: Rejection) -> NoReturn:
    context.abort(getattr(grpc.StatusCode, rejection.code), rejection.message)
    raise AssertionError("unreachable: abort raises")


def _reject(reason: str, message: str) -> pb.UploadReply:
    return pb.UploadReply(
        accepted=False, reason=pb.RejectReason.Value(f"REJECT_REASON_{reason}"), message=message
    )


@dataclass(frozen=True)
class ModelDownload:
    """A model version's DownloadModel stream: header and trailer serialized once per version
    (the header carries the model's digest, computed once), tensor parts serialized chunk by
    chunk as each download sends them, straight from the global weights (which the engine
    replaces, never mutates). A serialized copy of the whole model kept for all downloads was
    one more model in the coordinator's memory; each chunk is now copied once per download
    instead, and gRPC copies it again whichever way it comes.
    """

    version: str
    header: bytes
    trailer: bytes
    weights: Mapping[str, np.ndarray]
    data_bytes: int
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @classmethod
    def of(
        cls,
        model: GlobalModel,
        specs: Sequence[TensorSpec],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> ModelDownload:
        header = pb.ModelHeader(
            model_version=model.version,
            round=model.round,
            total_bytes=sum(s.nbytes for s in specs),
            digest=model.digest or digest_of(model.weights),
            wire_format=WIRE_FORMAT,
        )
        for s in specs:
            header.tensors.add(name=s.name, dtype=dtype_to_proto(s.dtype), shape=list(s.shape))
        return cls(
            model.version,
            pb.ModelChunk(header=header).SerializeToString(),
            pb.ModelChunk(trailer=pb.StreamTrailer(digest=header.digest)).SerializeToString(),
            model.weights,
            header.total_bytes,
            chunk_bytes,
        )

    def messages(self) -> Iterator[bytes]:
        yield self.header
        for chunk in iter_chunks(self.weights, self.chunk_bytes):
            yield serialized_tensor_part(chunk)
        yield self.trailer


class BulkStreamCodecs(grpc.ServerInterceptor):
    """Swaps in the (de)serializers of the two bulk streams, which skip protobuf's copies:
    DownloadModel yields already serialized messages (`ModelDownload`), and UploadUpdate
    receives tensor parts as `Chunk`s viewing the received bytes (`decode_update_chunk`)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None and method == DOWNLOAD_METHOD:
            return grpc.unary_stream_rpc_method_handler(
                present(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=serialize_message,
            )
        if handler is not None and method == UPLOAD_METHOD:
            return grpc.stream_unary_rpc_method_handler(
                present(handler.stream_unary, method),
                request_deserializer=decode_update_chunk,
                response_serializer=handler.response_serializer,
            )
        return handler


# past a transfer's deadline before it is cut: a transfer that ends just in time still counts
TRANSFER_GRACE_S = 10.0


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(
        self,
        engine: RoundEngine,
        upload_slots: StreamSlots | None = None,
        upload_chunk_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
        download_slots: StreamSlots | None = None,
        download_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        transfer_grace_s: float = TRANSFER_GRACE_S,
    ) -> None:
        self.engine = engine
        self.upload_slots = upload_slots or StreamSlots(DEFAULT_MAX_CONCURRENT_UPLOADS)
        self.download_slots = download_slots or StreamSlots(DEFAULT_MAX_CONCURRENT_DOWNLOADS)
        # what Join tells nodes to cut their uploads to, and the most an upload chunk may carry
        self.upload_chunk_bytes = check_chunk_bytes(upload_chunk_bytes)
        # the largest tensor part a download message carries
        self.download_chunk_bytes = check_chunk_bytes(download_chunk_bytes, "download_chunk_bytes")
        self.deadlines = StreamDeadlines("a bulk stream outlived its round's deadline: cancelled")
        self.transfer_grace_s = transfer_grace_s
        # ... and streams of a session or task that ended are cut at once, not at that deadline
        self.stale = StaleTransfers(engine)
        # a refused upload is a line per (node, reason) a minute: a node repeating one in a loop
        # must not fill the log
        self.refusal_lines = LogThrottle()
        # the running upload and download of each node: one of each per node at a time
        self.node_streams = NodeStreams(engine)
        self._download_lock = threading.Lock()
        self._current_download: ModelDownload | None = None

    # who is calling: the certificate's node name, or None in --insecure mode (no ownership check)
    def _caller(self, context: grpc.ServicerContext) -> str | None:
        return authenticated_node(context)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        group = request.group
        # as the allow-list, the node's config and the data files name groups: exactly
        if not 0 < len(group) <= MAX_GROUP_NAME or group != group.strip():
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group must be 1..{MAX_GROUP_NAME} characters without leading or trailing "
                f"whitespace, got {clipped(repr(group), 100)}",
            )
        if not group.isprintable():
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"group {clipped(repr(group), 100)} holds control characters",
            )
        require_self(context, group)
        try:
            session = self._join(group, request, context)
        except Rejection as r:
            # the node is told why; the operator, who only sees the group missing from the
            # quorum, is told here (throttled: a node retries a refused join for ever)
            who = self._caller(context) or context.peer().rsplit(":", 1)[0]
            checking = " (node check)" if request.check_only else ""
            self._log_refusal(f"join of group {group!r} refused{checking}", who, r)
            _abort(context, r)
        reply = pb.JoinReply(
            session_id=session.session_id,
            protocol_version=PROTOCOL_VERSION,
            encoder_id=self.engine.encoder_identity,
            software_version=__version__,
            run_id=self.engine.run_id,
            max_chunk_bytes=self.upload_chunk_bytes,
            model_config_json=json.dumps(self.engine.state.model_config),
        )
        reply.heartbeat_interval.FromMilliseconds(
            int(self.engine.settings.heartbeat_interval_s * 1000)
        )
        reply.session_timeout.FromMilliseconds(int(self.engine.settings.session_timeout_s * 1000))
        return reply

    def _join(
        self, group: str, request: pb.JoinRequest, context: grpc.ServicerContext
    ) -> NodeSession:
        """The engine's session for a Join that passed authentication; Rejection if refused."""
        if request.protocol_version != PROTOCOL_VERSION:
            raise Rejection(
                "FAILED_PRECONDITION",
                f"protocol version {request.protocol_version} is not supported; the coordinator "
                f"speaks version {PROTOCOL_VERSION}",
            )
        roles = {pb.ROLE_TRAIN: Role.TRAIN, pb.ROLE_EVALUATE_ONLY: Role.EVALUATE_ONLY}
        if request.role not in roles:
            raise Rejection("INVALID_ARGUMENT", "role must be TRAIN or EVALUATE_ONLY")
        return self.engine.join(
            group,
            roles[request.role],
            int(request.num_train_examples),
            request.encoder_id,
            request.software_version,
            dict(request.labels),
            peer=clipped(context.peer(), 100),
            check_only=request.check_only,
        )

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        wait_s = (
            min(max(request.wait.ToMilliseconds() / 1000.0, 0.0), MAX_WAIT_S)
            if request.HasField("wait")
            else DEFAULT_WAIT_S
        )
        try:
            spec = self.engine.next_task(
                request.session_id, self._caller(context), wait_s, alive=context.is_active
            )
        except Rejection as r:
            _abort(context, r)
        task = task_to_proto(spec)
        # a WAIT answer to a poll held shorter than MIN_POLL_INTERVAL_S asks the node to wait out
        # the difference: a node asking for no wait at all still polls about once a second
        if spec.kind == TaskKind.WAIT and wait_s < MIN_POLL_INTERVAL_S:
            task.retry_after.FromMilliseconds(int((MIN_POLL_INTERVAL_S - wait_s) * 1000))
        return task

    def DownloadModel(  # type: ignore[override]  # serialized ModelChunks: BulkStreamCodecs
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Streams the model version's messages (see `ModelDownload`)."""
        try:
            model = self.engine.model_for(
                request.session_id, self._caller(context), request.model_version
            )
        except Rejection as r:
            _abort(context, r)
        download = self._download_of(model)
        caller = self._caller(context)
        with self.node_streams.one_per_node(
            "download", caller, request.session_id, context
        ) as mine:
            if mine is None:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "a download of a newer session of this node is running: one at a time",
                )
            # of use while the task open when the model was read is (with none open, the final
            # model: while the node is here), and only while its session lives
            what = f"download of model {model.version} by {caller or request.session_id}"
            with (
                self.deadlines.watch(context, self._transfer_seconds()),
                self.stale.watch(context, request.session_id, model.task_id, what),
            ):
                if not self.download_slots.acquire(context.is_active):
                    log.info("download cancelled while waiting for a slot")
                    return
                try:
                    yield from download.messages()
                finally:  # also when the node goes away mid-stream (gRPC closes this generator)
                    self.download_slots.release()

    def _transfer_seconds(self) -> float:
        """How long a transfer may run: until the open task's deadline (after it the update is
        stale, the model of no use), with some grace."""
        return self.engine.transfer_deadline() - time.monotonic() + self.transfer_grace_s

    def _download_of(self, model: GlobalModel) -> ModelDownload:
        """The download stream of this model version, built by the first download that needs it;
        a newer version replaces it (downloads still streaming the old one keep it alive)."""
        with self._download_lock:
            current = self._current_download
            if current is not None and current.version == model.version:
                return current
            self._current_download = None  # let the old one go before building
            self._current_download = ModelDownload.of(
                model, self.engine.specs, self.download_chunk_bytes
            )
            return self._current_download

    def UploadUpdate(  # tensor parts arrive as Chunks: BulkStreamCodecs
        self, request_iterator: Iterator[pb.UpdateChunk | Chunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        """Every refusal of the update itself is an UploadReply (accepted=false, reason), as the
        protocol says; only a bad session or identity is a status error."""
        caller = self._caller(context)
        # the whole stream, header included, runs at most until its round's deadline
        with self.deadlines.watch(context, self._transfer_seconds()):
            try:
                first = next(request_iterator, None)
            except grpc.RpcError:  # cancelled before its header
                return _reject("STALE", "the upload was cancelled before its header")
            except WireError as err:  # its first message did not decode
                return _reject(
                    "MALFORMED", f"an upload starts with its header: {clipped(str(err))}"
                )
            if not isinstance(first, pb.UpdateChunk) or first.WhichOneof("part") != "header":
                return _reject("MALFORMED", "an upload starts with its header")
            h = first.header
            refusal = self._refuse_upload(h, caller, context)
            if refusal is not None:
                return refusal
            key = ("upload", caller or h.session_id)
            with self.node_streams.one_per_node(*key, h.session_id, context) as mine:
                if mine is None:  # cancelled while waiting, or its session was replaced
                    return _reject(
                        "STALE", "a newer upload of this node is running: this copy is ignored"
                    )
                who = caller or h.session_id
                what = f"upload from {who} for round {h.round}"
                with self.stale.watch(context, h.session_id, h.task_id, what) as unwatch:

                    def received(mine: RunningStream = mine) -> bool:
                        unwatch()
                        return self.node_streams.received(key, mine)

                    # refused uploads never wait; an admitted one is read once it holds a slot
                    if not self.upload_slots.acquire(context.is_active):
                        log.info("upload from %s cancelled while waiting for a slot", who)
                        return _reject("STALE", "the upload was cancelled while waiting")
                    try:
                        return self._read_update(h, caller, request_iterator, context, received)
                    finally:
                        self.upload_slots.release()

    def _refuse_upload(
        self, h: pb.UpdateHeader, caller: str | None, context: grpc.ServicerContext
    ) -> pb.UploadReply | None:
        """The refusal of an upload the engine does not accept now (None: go on); identity and
        session failures abort the call instead."""
        try:
            self.engine.check_update(h.session_id, caller, h.task_id, h.round, h.base_model_version)
        except Rejection as r:
            if r.reason is None:
                _abort(context, r)
            self._log_refusal("upload refused before reading it", caller or h.session_id, r)
            return _reject(r.reason, r.message)
        return None

    def _read_update(
        self,
        h: pb.UpdateHeader,
        caller: str | None,
        request_iterator: Iterator[pb.UpdateChunk | Chunk],
        context: grpc.ServicerContext,
        received: Callable[[], bool] = lambda: True,
    ) -> pb.UploadReply:
        """Read, check and spool an admitted upload, then hand it to the engine. `received` is
        called once every byte is in (before the engine takes the update); False: a newer copy
        replaced this one, which is dropped."""
        # the round may have closed while the upload waited for its slot
        refusal = self._refuse_upload(h, caller, context)
        if refusal is not None:
            return refusal
        spool: UpdateSpool | None = None
        try:
            spool = UpdateSpool(self.engine.specs, self.engine.spool_dir)
            trailer = None
            for msg in request_iterator:
                if isinstance(msg, Chunk):
                    spool.add(self._within_chunk_limit(msg))
                    del msg  # free the received bytes before waiting for the next message
                    continue
                part = msg.WhichOneof("part")
                if part == "tensor":
                    spool.add(self._within_chunk_limit(chunk_from_proto(msg.tensor)))
                elif part == "trailer":
                    trailer = msg.trailer
                    break
                else:
                    raise WireError(f"unexpected {part!r} message inside an upload")
            if trailer is None:
                message = "the upload stream ended before its trailer (truncated)"
                self.engine.note_rejected_update(h.session_id, caller, h.task_id, message, False)
                return _reject("MALFORMED", message)
            if next(request_iterator, None) is not None:
                raise WireError("messages after the trailer")
            if not received():
                return _reject("STALE", "a newer upload of this node replaced this one")
            spool.finish(
                trailer.digest,
                total_bytes=h.total_bytes or None,
                tensor_count=h.tensor_count or None,
            )
            self.engine.accept_update(
                h.session_id,
                caller,
                h.task_id,
                h.round,
                int(h.num_examples),
                dict(h.metrics),
                spool.replay,
                spool.total_bytes,
                h.base_model_version,
            )
        except WireError as err:
            reason = (
                "DIGEST_MISMATCH"
                if isinstance(err, DigestMismatchError)
                else "NON_FINITE"
                if isinstance(err, NonFiniteError)
                else "MALFORMED"
            )
            self.engine.note_rejected_update(h.session_id, caller, h.task_id, str(err), True)
            return _reject(reason, f"update rejected: {clipped(str(err))}")
        except Rejection as r:
            if r.reason is None:
                _abort(context, r)
            self._log_refusal("update refused", caller or h.session_id, r)
            return _reject(r.reason, r.message)
        except OSError as err:  # the spool's disk: not the node's fault, so not its answer
            log.error("update from %s could not be stored: %s", caller or h.session_id, err)
            return _reject("INTERNAL", f"the coordinator could not store the update: {err}")
        except grpc.RpcError:  # cancelled: by the node, or at the round's deadline
            return _reject("STALE", "the upload was cancelled before its end")
        finally:
            if spool is not None:
                spool.close()
        return pb.UploadReply(accepted=True, message=f"update for round {h.round} accepted")

    def _log_refusal(self, what: str, who: str, rejection: Rejection) -> None:
        more = self.refusal_lines.admit((who, what, rejection.reason or rejection.code))
        if more is not None:
            log.warning("%s: %s%s", what, rejection.message, more)

    def _within_chunk_limit(self, chunk: Chunk) -> Chunk:
        """`chunk` if it carries at most the max_chunk_bytes this coordinator gave in Join."""
        size = memoryview(chunk.data).nbytes
        if size > self.upload_chunk_bytes:
            raise WireError(
                f"chunk of {chunk.name!r} at offset {chunk.offset} carries {size} bytes, over the "
                f"{self.upload_chunk_bytes} this coordinator asked for (JoinReply.max_chunk_bytes)"
            )
        return chunk

    def ReportEvaluation(
        self, request: pb.EvaluationReport, context: grpc.ServicerContext
    ) -> pb.Ack:
        """A refusal of the report's values is INVALID_ARGUMENT and final (the node's answer to
        the task, as a refused update is); a stale or repeated report changes nothing."""
        caller = self._caller(context)
        if len(request.group) > MAX_GROUP_NAME:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"group must be 1..{MAX_GROUP_NAME} characters"
            )
        if caller is not None:
            require_self(context, request.group)
        try:  # a stale, repeated or late report is told so first, whatever its figures
            self.engine.check_evaluation(
                request.session_id, caller, request.task_id, request.round, request.model_version
            )
        except Rejection as r:
            _abort(context, r)
        try:
            evaluation = _evaluation_of(request)
        except ValueError as err:
            message = str(err)
            try:
                self.engine.note_rejected_evaluation(
                    request.session_id, caller, request.task_id, request.round, message
                )
            except Rejection as r:
                _abort(context, r)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, clipped(message))
        try:
            self.engine.accept_evaluation(
                request.session_id,
                caller,
                request.task_id,
                request.round,
                evaluation,
                request.model_version,
            )
        except Rejection as r:
            _abort(context, r)
        return pb.Ack(message="evaluation recorded")

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        """The node's state is only advisory; a state value this coordinator does not know (a
        newer node's) is accepted, but the other fields must be what the protocol says. A lost
        session is said first (UNAUTHENTICATED: join again), whatever the fields."""
        caller = self._caller(context)
        try:
            if not (math.isfinite(request.progress) and 0.0 <= request.progress <= 1.0):
                raise Rejection(
                    "INVALID_ARGUMENT",
                    f"progress is {request.progress}: a fraction in [0, 1] (0 if unknown)",
                )
            checked_text("task_id", request.task_id, MAX_TASK_ID)
            checked_text("message", request.message, MAX_FREE_TEXT, printable=False)
        except Rejection as invalid:
            try:
                self.engine.check_session(request.session_id, caller)
            except Rejection as r:
                _abort(context, r)
            _abort(context, invalid)
        try:
            current, cancel = self.engine.heartbeat(
                request.session_id,
                caller,
                request.task_id,
                failed=request.state == pb.NODE_STATE_FAILED,
                message=request.message,
            )
        except Rejection as r:
            _abort(context, r)
        reply = pb.HeartbeatReply(current_round=current, cancel_task=cancel)
        reply.heartbeat_interval.FromMilliseconds(
            int(self.engine.settings.heartbeat_interval_s * 1000)
        )
        return reply

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.engine.leave(request.session_id, self._caller(context), request.reason)
        except Rejection as r:
            _abort(context, r)
        return pb.Ack(message="goodbye")


def _evaluation_of(request: pb.EvaluationReport) -> GroupEvaluation:
    """The report's figures, or ValueError naming the field: the four protocol metrics in
    [0, 1], any others finite and few, mean_alignment equal to the "model" metric it repeats,
    a plausible question count, and no per-question scores (this coordinator never asks for
    them: EvaluationConfig.include_per_question)."""
    m = request.metrics
    if request.questions:
        raise ValueError(
            f"questions: {len(request.questions)} per-question scores sent, but the task did not "
            "ask for them (EvaluationConfig.include_per_question)"
        )
    if not 1 <= m.num_questions <= MAX_NODE_EXAMPLES:
        raise ValueError(
            f"metrics.num_questions is {m.num_questions}: the test questions evaluated, "
            f"1..{MAX_NODE_EXAMPLES}"
        )
    try:
        metrics = checked_metrics("metrics.metrics", dict(m.metrics), reason=None)
    except Rejection as r:
        raise ValueError(r.message) from None
    evaluation = GroupEvaluation.from_metrics(request.group, int(m.num_questions), metrics)
    if not abs(m.mean_alignment - evaluation.model) <= MEAN_ALIGNMENT_TOLERANCE:
        raise ValueError(
            f"metrics.mean_alignment is {m.mean_alignment}, but its metric 'model' is "
            f"{evaluation.model}: the same figure twice must agree"
        )
    return evaluation


def task_to_proto(spec: TaskSpec) -> pb.Task:
    task = pb.Task(
        kind=_TASK_KINDS[spec.kind],
        task_id=spec.task_id,
        round=spec.round,
        model_version=spec.model_version,
    )
    if spec.kind == TaskKind.WAIT:
        task.retry_after.FromMilliseconds(0)
    if spec.settings is not None:
        st = spec.settings
        hp = task.hyperparameters
        hp.local_steps = st.local_steps
        hp.learning_rate = st.learning_rate
        hp.embedding_noise = st.embedding_noise
        hp.context_range.min, hp.context_range.max = st.context_range
        hp.target_range.min, hp.target_range.max = st.target_range
        hp.seed = st.seed
        hp.optimizer = st.local_optimizer
        hp.keep_local_optimizer_state = KEEP_LOCAL_OPTIMIZER_STATE
        task.evaluation.max_context = st.max_context
        task.evaluation.seed = st.seed
    if spec.deadline > 0:
        # the engine keeps deadlines on the monotonic clock (a wall-clock step must not end or
        # stretch a round); the wire carries a timestamp and, for nodes whose clock differs,
        # the time left
        left = max(0.0, spec.deadline - time.monotonic())
        task.deadline.FromMilliseconds(int((time.time() + left) * 1000))
        task.time_budget.FromMilliseconds(int(left * 1000))
    return task


# glibc's mallopt parameter for the number of malloc arenas (malloc.h), and the coordinator's cap
_M_ARENA_MAX = -8
COORDINATOR_MALLOC_ARENAS = 1


def limit_malloc_arenas(arenas: int = COORDINATOR_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX does); True if the cap was set.

    glibc gives busy threads their own arenas, up to 8 per core, and each arena keeps the freed
    chunk buffers of the uploads its threads served: with one RPC thread per uploading node, the
    coordinator's memory grew with the number of nodes (32 nodes: +130 MiB peak), not with the
    work. One arena instead of two takes another 8-10 MiB off the peak in every systems-bench
    scenario (C: 52-55 -> 44-46 MiB over start-up) at the same round time. A no-op off glibc,
    and when the operator set MALLOC_ARENA_MAX (their choice wins).
    """
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))


def start_server(
    engine: RoundEngine | Callable[[], RoundEngine],
    address: str,
    tls: TlsFiles | None,
    allow_list: AllowList,
    max_workers: int = 64,
    upload_slots: StreamSlots | int = DEFAULT_MAX_CONCURRENT_UPLOADS,
    upload_chunk_bytes: int = DEFAULT_UPLOAD_CHUNK_BYTES,
    download_slots: StreamSlots | int = DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    download_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    revocations: RevocationWatch | None = None,
    transfer_grace_s: float = TRANSFER_GRACE_S,
    max_calls_per_node: int = MAX_CALLS_PER_NODE,
    upload_window_bytes: int = SERVER_STREAM_WINDOW_BYTES,
) -> tuple[grpc.Server, int]:
    """Start serving on `address` (host:port; port 0 picks one). Returns (server, bound port).

    engine: the engine, or a function that makes it, called once the port is bound: a
    coordinator that cannot listen then writes no run into its state folder (one did, and the
    next start there with other settings was refused as another run).
    tls=None means plain text (--insecure): the caller must have asked for it explicitly.
    upload_slots, download_slots: how many uploads are read (downloads sent) at once (<= 0: no
    bound), or the gate itself.
    upload_chunk_bytes: the largest upload chunk, told to nodes in Join (ValueError if out of
    range); smaller chunks lower the read buffer gRPC keeps per connection, at some speed.
    download_chunk_bytes: the largest tensor part in a download message (ValueError if out of
    range); smaller parts lower what gRPC holds for the downloads being sent, at some speed.
    revocations: node certificates the CA revoked are refused, even if allow-listed.
    transfer_grace_s: how long past its round's deadline an upload or download may still run.
    max_calls_per_node: a node's calls in flight beyond this are refused RESOURCE_EXHAUSTED.
    upload_window_bytes: gRPC's receive window per stream (ValueError if out of range): what
    an upload may have in flight, so about its speed per round trip over a link with latency,
    and about what each connected node may have the coordinator buffer.
    """
    check_window_bytes(upload_window_bytes)
    if isinstance(upload_slots, int):
        upload_slots = StreamSlots(upload_slots)
    if isinstance(download_slots, int):
        download_slots = StreamSlots(download_slots)
    interceptor = AuthInterceptor(
        allow_list,
        insecure=tls is None,
        revocations=revocations,
        max_calls_per_node=max_calls_per_node,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[interceptor, BulkStreamCodecs()],
        options=[
            *server_grpc_options(upload_window_bytes),
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    port = bind_port(server, address, None if tls is None else tls.server_credentials())
    try:
        servicer = FederationServicer(
            engine() if callable(engine) else engine,
            upload_slots,
            upload_chunk_bytes,
            download_slots,
            download_chunk_bytes,
            transfer_grace_s,
        )
    except BaseException:
        # a server never started keeps its bound port until the process ends: start it (with
        # no service yet) to stop it for good, for callers that go on in this process
        server.start()
        server.stop(None).wait()
        raise
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("pluralfed.v1.Federation", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.start()
    if tls is None:
        log.warning(
            "INSECURE: plain text on %s, no TLS and no authentication: any client may join as "
            "any allow-listed group (debugging only)",
            address,
        )
    log.info(
        "coordinator listening on %s (port %d, %s, max message %d bytes)",
        address,
        port,
        "INSECURE plain text" if tls is None else "mutual TLS",
        MAX_MESSAGE_BYTES,
    )
    return server, port
