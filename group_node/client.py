"""The node's side of the wire: `NodeClient` holds the TLS channel to the coordinator (the
coordinator's certificate checked and pinned when a revocation list is set), makes each RPC and
says in plain words why a call failed. It does not train: of the model it only checks that the
config the coordinator sends is one this node can build."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from group_node.config import NodeConfig
from group_node.worker import GroupWorker, TaskCancelled
from pluralfed import __version__, protocol
from pluralfed.errors import InputError
from pluralfed.fsutil import in_container
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.protocol import (
    REPLACED_SESSION_MARK,
)
from pluralfed.tls import (
    RevocationList,
    ServerCheckFailed,
    checked_server_certificate,
    format_time,
    load_client_material,
    load_revocation_list,
    parse_certs,
    read_file,
    revocation_check_context,
    secure_channel,
    utc_now,
)
from pluralfed.transport import (
    PROTOCOL_VERSION,
    BulkStreamCalls,
    grpc_options,
    receive_model,
    update_stream,
    upload_chunk_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES, WireError

log = logging.getLogger("pluralfed.node")

# the longest heartbeat interval a node takes from Join
MAX_HEARTBEAT_INTERVAL_S = protocol.MAX_HEARTBEAT_S


def model_config_of(text: str, where: str) -> dict[str, object]:
    """The model config a JoinReply carries (JSON; empty means GPO's defaults), checked to be
    one: a coordinator's bad config must stop the node with this message, not a traceback."""
    if not text:
        return {}
    what = f"{where}: JoinReply.model_config_json"

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        raw = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{what} is a JSON {type(raw).__name__}, not an object")
    try:
        GroupWorker.check_model_config(raw)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise InputError(f"{what} is not a valid model config: {err}") from None
    return raw


def validity_problem(
    certs: list[tuple[Path, str, x509.Certificate]], now: dt.datetime | None = None
) -> str | None:
    """Why one of this node's certificates cannot make a TLS connection now, or None.
    `certs` holds (file, what, x509 certificate). A failed connection says only UNAVAILABLE
    (gRPC keeps the handshake's reason to itself); a certificate that expired while the node ran
    (or a clock that jumped) is a cause the node can name without the network."""
    now = now or utc_now()
    for path, what, cert in certs:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        valid = f"valid from {format_time(start)} until {format_time(end)}"
        if now < start:
            return (
                f"this node's {what} {path} is not valid yet ({valid}; now is "
                f"{format_time(now)}): check this machine's clock"
            )
        if now > end:
            return (
                f"this node's {what} {path} has expired ({valid}; now is {format_time(now)}): "
                "ask the federation's operator for a new one, then restart the node"
            )
    return None


MAX_DETAILS_CHARS = 300  # gRPC's details in a log line: enough for its cause, not a screen


def shortened(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """`text` on one line, at most `limit` characters: a coordinator's details go in log lines."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def replaced_by_peer(details: str) -> str:
    """The peer the coordinator says replaced this node's session ("(from ipv4:...)"), or "?"."""
    found = re.search(r"\(from ([^)]*)\)", details)
    return found.group(1) if found else "?"


# what gRPC says when one side speaks TLS and the other plain text: a TLS server closes a
# plain-text client's connection; a TLS client reads a plain HTTP/2 server's bytes as a TLS
# record of a version it does not know
PLAIN_TEXT_TO_TLS = "Socket closed"
TLS_TO_PLAIN_TEXT = "WRONG_VERSION_NUMBER"


def connection_hint(details: str, config: NodeConfig) -> str | None:
    """What gRPC's details of a failed call say about this node's setup, when they name the
    cause: gRPC reports a wrong CA, a certificate for another name and a closed port alike as
    UNAVAILABLE, and only its details tell them apart. None when they name no cause we know."""
    host, _, port = config.coordinator.rpartition(":")
    if "Hostname Verification Check failed" in details:
        name = config.tls_server_name or host
        if config.tls_server_name:
            return (
                f"the coordinator's certificate does not name {name} (tls_server_name): set "
                "tls_server_name to one of its names, or unset it"
            )
        return (
            f"the coordinator's certificate does not name {name}: dial one of its names or set "
            "tls_server_name"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        if "expired" in details:
            return "the coordinator's certificate has expired: tell the federation's operator"
        return (
            "the coordinator's certificate is not from the CA in your ca.pem: get the "
            "federation's ca.pem from its operator"
        )
    if config.insecure and PLAIN_TEXT_TO_TLS in details:
        return (
            "this node is set to insecure (plain text, `insecure = true` or --insecure) and the "
            "coordinator probably expects TLS: remove insecure and give the node its tls_dir"
        )
    if not config.insecure and TLS_TO_PLAIN_TEXT in details:
        return (
            f"{host}:{port} does not speak TLS: the coordinator probably runs insecure (plain "
            "text); start it with its TLS files, or (on a trusted network only) set insecure on "
            "this node too"
        )
    if "Connection refused" in details:
        return (
            f"nothing listens on {host}:{port}: wrong address or port, or the coordinator is down"
            + container_loopback_note(host)
        )
    if "errors resolving" in details or "Domain name not found" in details:
        return f"the host name {host} does not resolve: check the coordinator address"
    role = re.search(r"may only join as ([\w-]+)", details)
    if role:
        return f"set role = {role.group(1)} (this group's role in this federation)"
    return None


def is_loopback(host: str) -> bool:
    """`host` (from host:port, IPv6 in brackets) names this machine's loopback."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def container_loopback_note(host: str) -> str:
    """For a loopback coordinator address dialled from a container: there, localhost is the
    container itself, not the host the coordinator runs on (`docker run` without `--network
    host`). Empty otherwise."""
    if not (is_loopback(host) and in_container()):
        return ""
    return (
        f"; this node runs in a container: unless it shares the host's network (`docker run "
        f"--network host`), {host} there is the container itself, not the host: run it with "
        "`--network host`, or dial the host's address (and set tls_server_name to a name in "
        "the coordinator's certificate)"
    )


def is_tls_cause(details: str) -> bool:
    """The coordinator's certificate does not pass this node's checks, or it answers TLS in
    plain text: a setup problem that looks like a coordinator that is down."""
    return any(
        cause in details
        for cause in (
            "Hostname Verification Check failed",
            "CERTIFICATE_VERIFY_FAILED",
            TLS_TO_PLAIN_TEXT,
        )
    )


class SessionLost(Exception):
    """The coordinator no longer knows our session (it restarted or dropped us): join again."""


class SessionReplaced(SessionLost):
    """A newer Join with this node's certificate replaced our session: a restart of this node,
    or another process running as it."""


def session_lost(details: str) -> SessionLost:
    """The exception for an UNAUTHENTICATED call: replaced, or unknown/expired."""
    return SessionReplaced(details) if REPLACED_SESSION_MARK in details else SessionLost(details)


class NodeStopped(Exception):
    """A call was cancelled because the node is stopping (`GroupNode.stop`)."""


POLLER_STOP_WAIT_S = 1.0  # gRPC's connectivity poller looks for subscribers every 0.2 s


def close_channel(
    channel: grpc.Channel, subscriber: Callable[[grpc.ChannelConnectivity], None] | None
) -> None:
    """Close `channel`, after unsubscribing `subscriber`. gRPC's connectivity poller (a thread
    of its own while anyone is subscribed) raises "Cannot monitor channel state: Channel
    closed!" in that thread, a traceback on stderr, if the channel closes while it polls; it
    stops by itself within 0.2 s of the last unsubscribe, so the close waits for that first."""
    if subscriber is not None:
        channel.unsubscribe(subscriber)
        state = getattr(channel, "_connectivity_state", None)  # grpc._channel's own record
        deadline = time.monotonic() + POLLER_STOP_WAIT_S
        while getattr(state, "polling", False) and time.monotonic() < deadline:
            time.sleep(0.02)
    channel.close()


class NodeClient:
    """The node's side of the protocol, one RPC per method; no retry logic here."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        files = config.tls_files()
        self._files = files
        # the certificates this node presents and trusts, as loaded at start: a failed
        # connection checks their validity dates (`certificate_problem`) without any I/O
        self._certs: list[tuple[Path, str, x509.Certificate]] = []
        if files is not None:
            for path, what in ((files.cert, "certificate"), (files.ca, "CA certificate")):
                certs = parse_certs(read_file(path, what), path, what)
                # the node's own: the first. The CA file may hold several CAs (a rotation): the
                # newest-expiring one stands for them, since one valid CA is enough
                first = (
                    certs[0]
                    if path == files.cert
                    else max(certs, key=lambda c: c.not_valid_after_utc)
                )
                self._certs.append((path, what, first))
        # RPCs in flight that `cancel_calls` cancels (a stopping node does not sit out a long
        # poll or a transfer); once cancelled, every later one is cancelled as it starts
        self._calls: set[grpc.Future] = set()
        self._calls_lock = threading.Lock()
        self._cancelled = False
        # the coordinator cancelled the current task (`cancel_task_calls`): its RPCs in flight
        # are cancelled, and so is every one started until `task_done`
        self._task_cancelled = False
        self._revocations: RevocationList | None = None
        self._check_context: ssl.SSLContext | None = None
        if files is not None and config.tls_crl is not None:  # a bad list: refused at start
            self._revocations = load_revocation_list(config.tls_crl, files.ca)
            self._check_context = revocation_check_context(files)
        # connections gRPC has made (it reconnects by itself) and the last one checked against
        # the revocation list: a new connection is checked again before the next task's RPCs
        self._connections = 0
        self._checked_connection = -1
        # gRPC's own reconnect timer (up to 120 s by default) would otherwise decide how soon a
        # node notices that a cut link is back, whatever our backoff says
        options: list[tuple[str, object]] = [
            *grpc_options(),
            ("grpc.initial_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(config.backoff_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(config.backoff_max_s * 1000)),
        ]
        self._channel_options = options
        # read once, as gRPC reads them: a channel made again later (pinned) uses these bytes
        self._material = None if files is None else load_client_material(files)
        # with tls_crl, the coordinator certificate the node's own check last passed, which
        # gRPC then trusts alone (`_pin`)
        self._pinned: x509.Certificate | None = None
        if files is None:
            log.warning("INSECURE: connecting to %s in plain text, without TLS", config.coordinator)
        self._open_channel()
        self.session_id = ""
        self.model_config: dict[str, object] = {}
        self.heartbeat_interval_s = 5.0
        # a HeartbeatReply.heartbeat_interval over the limit, last said (`_adopt_heartbeat_interval`)
        self._clamped_interval_s: float | None = None
        self.upload_chunk_bytes = DEFAULT_CHUNK_BYTES

    def _open_channel(self) -> None:
        """The channel and its stubs: plain text, trusting the CA, or trusting only the pinned
        coordinator certificate."""
        if self._material is None:
            self.channel = grpc.insecure_channel(
                self.config.coordinator, options=self._channel_options
            )
        else:
            self.channel = secure_channel(
                self.config.coordinator,
                self._material,
                server_name_override=self.config.tls_server_name,
                options=self._channel_options,
                pinned=self._pinned,
            )
        self.stub = pb_grpc.FederationStub(self.channel)
        bulk = BulkStreamCalls.on(self.channel)  # tensor data without protobuf's copies
        self._download_model = bulk.download_model
        self._upload_update = bulk.upload_update

    def _pin(self, cert: x509.Certificate) -> None:
        """From now on gRPC trusts only `cert`, which the node's own handshake has just checked
        against the CA and the revocation list. That handshake is not gRPC's connection: without
        the pin, someone on the path holding a revoked coordinator key could let the check reach
        the real coordinator and answer gRPC's connection himself. A coordinator that presents
        another certificate later (a renewal) is checked and pinned anew; the channel is made
        again for it (calls in flight on the old one end)."""
        if self._pinned is not None and cert == self._pinned:
            return
        if self._pinned is not None:
            log.warning(
                "%s: the coordinator now presents another certificate (serial %x, before %x), "
                "checked against the revocation list: trusting it from now on",
                self.config.group,
                cert.serial_number,
                self._pinned.serial_number,
            )
        self._pinned = cert
        old = self.channel
        self._open_channel()
        self._connections = 0
        self.channel.subscribe(self._on_connectivity)
        close_channel(old, self._on_connectivity if self._checked_connection >= 0 else None)

    def certificate_problem(self) -> str | None:
        """After a failed connection: this node's certificate or the CA's is expired or not
        valid yet (which file, its dates), or None."""
        return validity_problem(self._certs)

    @contextlib.contextmanager
    def _tracked(self, call: Any) -> Iterator[None]:
        """`call` (a grpc.Future or response stream) may be cancelled by `cancel_calls`."""
        with self._calls_lock:
            self._calls.add(call)
            if self._cancelled or self._task_cancelled:
                call.cancel()
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def _not_cancelled(self) -> None:
        """Before a call starts: none once the node stops or the current task is cancelled. The
        call's own cancel (`_tracked`) comes only after gRPC has started sending it, by which
        time a small upload may have reached the coordinator whole."""
        with self._calls_lock:
            if self._cancelled or self._task_cancelled:
                raise self._cancellation()

    def _result(self, call: Any) -> Any:
        """The result of a unary-response call started with `.future`, cancellable."""
        with self._tracked(call):
            try:
                return call.result()
            except grpc.FutureCancelledError:
                raise self._cancellation() from None
            except grpc.RpcError as err:  # cancelled once under way, it may end as CANCELLED
                if err.code() == grpc.StatusCode.CANCELLED and self._task_cancelled:
                    raise self._cancellation() from None
                raise

    def _cancellation(self) -> Exception:
        """Why a call of ours was cancelled: the node stops, or the coordinator cancelled the
        task the call was for."""
        if self._cancelled or not self._task_cancelled:
            return NodeStopped("call cancelled: the node is stopping")
        return TaskCancelled()

    def cancel_calls(self) -> None:
        """Cancel the RPCs in flight and every one started from now on (the node stops). Leave
        and Heartbeat are not cancelled: they are short, and Leave is what a stop sends."""
        self._cancel_in_flight(stopping=True)

    def cancel_task_calls(self) -> None:
        """Cancel the current task's RPCs in flight (a download, upload or report) and every one
        started until `task_done`: the coordinator no longer wants the task
        (HeartbeatReply.cancel_task). The call raises TaskCancelled. Only the task's RPCs are in
        flight meanwhile: the node asks for no task while it works on one."""
        self._cancel_in_flight(stopping=False)

    def _cancel_in_flight(self, *, stopping: bool) -> None:
        """Mark the node stopping or the task cancelled, so calls started from now on are
        cancelled too (`_tracked`), then cancel the calls in flight."""
        with self._calls_lock:
            if stopping:
                self._cancelled = True
            else:
                self._task_cancelled = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def task_done(self) -> None:
        """The current task's work has ended: the next calls are not cancelled."""
        with self._calls_lock:
            self._task_cancelled = False

    def close(self) -> None:
        subscribed = self._revocations is not None and self._checked_connection >= 0
        close_channel(self.channel, self._on_connectivity if subscribed else None)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self._connections += 1

    def _check_coordinator_certificate(self, *, only_if_reconnected: bool = False) -> None:
        """With tls_crl: the coordinator's certificate must not be revoked (re-read the list,
        which may have changed; a changed list that does not load keeps the one in force).
        InputError if it is; ServerCheckFailed (handled as an unreachable coordinator) if the
        check cannot complete. Before every Join, and before a task's RPCs when gRPC has
        connected anew since the last check."""
        if (
            self._files is None
            or self._revocations is None
            or self._check_context is None
            or self.config.tls_crl is None
        ):
            return
        if self._checked_connection < 0:  # first use: follow gRPC's own (re)connections
            self.channel.subscribe(self._on_connectivity)
            self._checked_connection = 0
        connections = self._connections
        if only_if_reconnected and connections <= self._checked_connection:
            return
        try:
            self._revocations = load_revocation_list(
                self.config.tls_crl, self._files.ca, in_force=self._revocations
            )
        except InputError as err:
            log.warning("%s; the revocation list read before stays in force", err)
        cert = checked_server_certificate(
            self.config.coordinator,
            self._check_context,
            self._revocations,
            server_name=self.config.tls_server_name,
        )
        if self._pinned is None or cert != self._pinned:
            self._pin(cert)
            connections = self._connections  # of the new channel
        self._checked_connection = max(connections, 1)

    def join(
        self, num_examples: int, encoder_id: str, timeout: float = 30.0, *, check_only: bool = False
    ) -> pb.JoinReply:
        """Join (open a session), or with `check_only` ask whether the coordinator would admit
        this node without opening one (`pluralfed node check`: a running node with this
        certificate keeps its session). A coordinator older than check_only opens a session
        anyway: its id is kept, so that the caller can leave it."""
        self._check_coordinator_certificate()
        role = pb.ROLE_TRAIN if self.config.role == "train" else pb.ROLE_EVALUATE_ONLY
        reply: pb.JoinReply = self._result(
            self.stub.Join.future(
                pb.JoinRequest(
                    group=self.config.group,
                    role=role,
                    num_train_examples=num_examples,
                    software_version=__version__,
                    protocol_version=PROTOCOL_VERSION,
                    encoder_id=encoder_id,
                    check_only=check_only,
                ),
                timeout=timeout,
            )
        )
        where = f"coordinator {self.config.coordinator}"
        self.session_id = reply.session_id
        if not reply.session_id and not check_only:
            raise InputError(f"{where}: JoinReply.session_id is empty")
        self.model_config = model_config_of(reply.model_config_json, where)
        interval = reply.heartbeat_interval.ToMilliseconds() / 1000
        if interval > MAX_HEARTBEAT_INTERVAL_S:
            raise InputError(
                f"{where}: JoinReply.heartbeat_interval {interval:g} s is over "
                f"{MAX_HEARTBEAT_INTERVAL_S:g} s"
            )
        self.heartbeat_interval_s = max(interval, protocol.MIN_HEARTBEAT_S)
        try:
            self.upload_chunk_bytes = upload_chunk_bytes(reply.max_chunk_bytes)
        except ValueError as err:
            raise InputError(f"{where}: Join reply: {err}") from None
        return reply

    def get_task(self, wait_s: float) -> pb.Task:
        self._check_coordinator_certificate(only_if_reconnected=True)
        self._not_cancelled()
        req = pb.GetTaskRequest(session_id=self.session_id)
        req.wait.FromMilliseconds(int(wait_s * 1000))
        task: pb.Task = self._result(self.stub.GetTask.future(req, timeout=wait_s + 30))
        return task

    def download(self, version: str, timeout: float) -> dict:
        """Model `version`, checked against its header (InputError saying what is wrong)."""
        self._check_coordinator_certificate(only_if_reconnected=True)
        self._not_cancelled()
        stream = self._download_model(
            pb.DownloadModelRequest(session_id=self.session_id, model_version=version),
            timeout=timeout,
        )
        where = f"coordinator {self.config.coordinator}: model {version!r} download"
        try:
            with self._tracked(stream):
                return receive_model(
                    stream, lambda message: InputError(f"{where}: {message}"), model_version=version
                )
        except WireError as err:
            raise InputError(f"{where}: {err}") from None
        except grpc.RpcError as err:  # a stream we cancelled ends as CANCELLED
            if err.code() == grpc.StatusCode.CANCELLED and self._task_cancelled:
                raise self._cancellation() from None
            raise

    def upload(
        self,
        task: pb.Task,
        weights: dict,
        num_examples: int,
        metrics: dict[str, float],
        timeout: float,
    ) -> pb.UploadReply:
        self._check_coordinator_certificate(only_if_reconnected=True)
        self._not_cancelled()
        header = pb.UpdateHeader(
            session_id=self.session_id,
            task_id=task.task_id,
            round=task.round,
            base_model_version=task.model_version,
            num_examples=num_examples,
            metrics=metrics,
        )
        reply: pb.UploadReply = self._result(
            self._upload_update.future(
                update_stream(header, weights, self.upload_chunk_bytes), timeout=timeout
            )
        )
        return reply

    def report(self, task: pb.Task, group: str, metrics: dict[str, float], n: int) -> None:
        self._check_coordinator_certificate(only_if_reconnected=True)
        self._not_cancelled()
        self._result(
            self.stub.ReportEvaluation.future(
                pb.EvaluationReport(
                    session_id=self.session_id,
                    task_id=task.task_id,
                    round=task.round,
                    group=group,
                    model_version=task.model_version,
                    metrics=pb.GroupMetrics(
                        num_questions=n, mean_alignment=metrics["model"], metrics=metrics
                    ),
                ),
                timeout=60,
            )
        )

    def heartbeat(
        self, state: pb.NodeState.ValueType, task_id: str = "", message: str = ""
    ) -> pb.HeartbeatReply:
        """Report `state` (and the task worked on, `task_id`); the reply's heartbeat_interval is
        used from now on (`heartbeat_interval_s`). The caller acts on its cancel_task."""
        reply: pb.HeartbeatReply = self.stub.Heartbeat(
            pb.HeartbeatRequest(
                session_id=self.session_id, state=state, task_id=task_id, message=message
            ),
            timeout=10,
        )
        self._adopt_heartbeat_interval(reply)
        return reply

    def _adopt_heartbeat_interval(self, reply: pb.HeartbeatReply) -> None:
        """HeartbeatReply.heartbeat_interval is "the interval to use from now on"; a reply
        without one keeps the interval. Clamped as the Join value is (never below
        MIN_HEARTBEAT_S); a value over the Join limit, which stops a joining node, is cut to it
        (said once per value): a heartbeat is no place to stop a node in the middle of its work."""
        if not reply.HasField("heartbeat_interval"):
            return
        interval = reply.heartbeat_interval.ToMilliseconds() / 1000
        if interval > MAX_HEARTBEAT_INTERVAL_S:
            if interval != self._clamped_interval_s:
                self._clamped_interval_s = interval
                log.warning(
                    "%s: HeartbeatReply.heartbeat_interval %g s is over %g s: beating every %g s",
                    self.config.group,
                    interval,
                    MAX_HEARTBEAT_INTERVAL_S,
                    MAX_HEARTBEAT_INTERVAL_S,
                )
            interval = MAX_HEARTBEAT_INTERVAL_S
        self.heartbeat_interval_s = max(interval, protocol.MIN_HEARTBEAT_S)

    def leave(self, reason: str, timeout: float = 10.0) -> None:
        self.stub.Leave(pb.LeaveRequest(session_id=self.session_id, reason=reason), timeout=timeout)


def label_of(err: grpc.RpcError | ServerCheckFailed) -> str:
    """A failed connection's gRPC status name, or what the tls_crl check is."""
    return err.code().name if isinstance(err, grpc.RpcError) else "revocation check"
