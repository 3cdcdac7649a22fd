"""A group node: joins the coordinator, takes tasks, trains and evaluates locally.

The node opens every connection (it may sit behind a firewall); the coordinator never dials it.
It survives coordinator restarts and network cuts: any lost connection or unknown session leads
to a rejoin with exponential backoff. Only model tensors and aggregate metrics leave the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from group_node.worker import GroupWorker, LocalResult, TaskFailed
from pluralfed import __version__, protocol
from pluralfed.config import ConfigValueError
from pluralfed.errors import InputError, signal_exit_code
from pluralfed.fsutil import in_container
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.proto.pluralfed.v1 import federation_pb2_grpc as pb_grpc
from pluralfed.protocol import (
    ALIGNMENT_BEFORE,
    LOCAL_OPTIMIZER,
    LOCAL_OPTIMIZERS,
    MAX_EMBEDDING_NOISE,
    MIN_POLL_INTERVAL_S,
    REPLACED_SESSION_MARK,
    REPLACEMENT_WINDOW_S,
    REPLACEMENTS_PER_WINDOW,
)
from pluralfed.tensorfiles import save_tensors
from pluralfed.tls import (
    RevocationList,
    ServerCheckFailed,
    TlsFiles,
    checked_server_certificate,
    format_time,
    load_client_material,
    load_revocation_list,
    parse_certs,
    read_file,
    resolve_tls_files,
    revocation_check_context,
    secure_channel,
    utc_now,
)
from pluralfed.training import TrainingSettings
from pluralfed.transport import (
    PROTOCOL_VERSION,
    BulkStreamCalls,
    grpc_options,
    receive_model,
    update_stream,
    upload_chunk_bytes,
)
from pluralfed.wire import DEFAULT_CHUNK_BYTES, WireError, digest_of

log = logging.getLogger("pluralfed.node")

# statuses after which retrying cannot help: the node's setup is wrong
FATAL_CODES = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


MAX_PERSONALIZE_STEPS = 100_000
MAX_THREADS = 1024  # torch CPU threads; more is a typo, not a machine
# Sane ranges of the node's timings (seconds). The coordinator caps a poll at 60 s anyway; a
# poll or backoff beyond an hour is a typo, and gRPC refuses deadlines far in the future.
MIN_POLL_WAIT_S, MAX_POLL_WAIT_S = 0.1, 3600.0
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.01, 3600.0
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _refuse(key: str, message: str, *, related: tuple[str, ...] = ()) -> ConfigValueError:
    """A node config error naming `key`, so that `load_config` can say where it was set (file,
    environment variable or option)."""
    return ConfigValueError(key, message, "node config", related=related)


def _check_seconds(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(name, f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise _refuse(name, f"{name} must be {low:g}..{high:g} seconds, got {value!r}")


def check_address(address: str) -> None:
    """Raise InputError unless `address` is host:port or [IPv6]:port, port 1..65535: the
    coordinator address goes to gRPC as a target, which would take anything and fail later."""
    host, colon, port = address.rpartition(":")
    problem = ""
    if not colon:
        problem = "no :port"
    elif not host:
        problem = "no host"
    elif host.startswith("["):
        try:
            if not host.endswith("]"):
                raise ValueError
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            problem = f"{host!r} is not an IPv6 address in brackets"
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        problem = f"{host!r} is not a host name or IPv4 address (IPv6 goes in brackets)"
    if not problem and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        problem = f"port {port!r} is not a number in 1..65535"
    if problem:
        raise _refuse(
            "coordinator",
            f"coordinator must be host:port or [IPv6]:port, got {address!r}: {problem}",
        )


@dataclass
class NodeConfig:
    """Everything a node needs; see `pluralfed node run --help` and docs for each field."""

    coordinator: str = "localhost:7443"
    group: str = ""
    role: str = "train"  # or "evaluate-only"
    data: Path | None = None
    tls_dir: Path | None = None  # folder with ca.pem, cert.pem, key.pem
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None  # expected name in the coordinator's cert, if not the host
    # the CA's revocation list (crl.pem): before every Join the node refuses a coordinator whose
    # certificate is in it (a stolen coordinator key, revoked)
    tls_crl: Path | None = None
    insecure: bool = False
    encoder: str = "all-MiniLM-L6-v2"
    cache_dir: Path | None = None
    threads: int = 1
    seed: int = 0
    poll_wait_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 15.0
    give_up_after_s: float | None = None  # stop retrying after this long unreachable
    # Audit copy of exactly what the node sends: before each upload, the update's tensors go to
    # <dir>/round-<round>-<task id>.safetensors (one file per TRAIN task, so one per round unless
    # a round is retried), with metadata group, round, task_id, base_model_version, num_examples
    # and digest (the BLAKE3 digest, hex, that the upload's trailer carries). No upload without
    # its copy.
    save_updates_dir: Path | None = None
    # Personalization, node-local: after a finished run, download the final model, fine-tune a
    # copy on this group's own TRAIN questions for this many steps (the run's learning rate and
    # episode sizes, fresh Adam state) and save it as a checkpoint in personalized_dir. Nothing
    # of it is sent anywhere. 0 = off.
    personalize_steps: int = 0
    personalized_dir: Path | None = None

    def data_file(self) -> Path:
        """The group's data file, which running needs (checking the connection does not)."""
        if self.data is None:
            raise InputError(
                "node config: data is required to run (a CSV or JSONL file with the group; "
                "data in the config file, PLURALFED_NODE_DATA or --data)"
            )
        return self.data

    def __post_init__(self) -> None:
        if not self.group.strip():
            raise _refuse("group", "group is required (the group whose data this node holds)")
        if self.role not in ("train", "evaluate-only"):
            raise _refuse("role", f"role must be train or evaluate-only, got {self.role!r}")
        if not self.group.isprintable():
            raise _refuse("group", f"group {self.group!r} holds control characters")
        if not 1 <= self.threads <= MAX_THREADS:
            raise _refuse("threads", f"threads must be 1..{MAX_THREADS}, got {self.threads}")
        if not 0 <= self.personalize_steps <= MAX_PERSONALIZE_STEPS:
            raise _refuse(
                "personalize_steps",
                f"personalize_steps must be 0..{MAX_PERSONALIZE_STEPS}, got {self.personalize_steps}",
            )
        if self.personalize_steps and self.personalized_dir is None:
            raise _refuse(
                "personalized_dir",
                "personalize_steps is set, so personalized_dir is required (the folder where "
                "the personalized checkpoint is written)",
                related=("personalize_steps",),
            )
        check_address(self.coordinator)
        if self.insecure and self.tls_crl is not None:
            raise _refuse(
                "tls_crl", "tls_crl needs TLS; it cannot go with insecure", related=("insecure",)
            )
        _check_seconds("poll_wait_s", self.poll_wait_s, MIN_POLL_WAIT_S, MAX_POLL_WAIT_S)
        _check_seconds("backoff_initial_s", self.backoff_initial_s, MIN_BACKOFF_S, MAX_BACKOFF_S)
        _check_seconds("backoff_max_s", self.backoff_max_s, MIN_BACKOFF_S, MAX_BACKOFF_S)
        if self.backoff_max_s < self.backoff_initial_s:
            raise _refuse(
                "backoff_max_s",
                f"backoff_max_s ({self.backoff_max_s:g}) must be at least backoff_initial_s "
                f"({self.backoff_initial_s:g})",
                related=("backoff_initial_s",),
            )
        limit = self.give_up_after_s
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not (math.isfinite(limit) and limit > 0)
        ):
            raise _refuse(
                "give_up_after_s",
                "give_up_after_s must be a finite number of seconds > 0 (leave it unset to retry "
                f"forever), got {limit!r}",
            )

    def tls_files(self) -> TlsFiles | None:
        if self.insecure:
            return None
        return resolve_tls_files("node", self.tls_dir, self.tls_ca, self.tls_cert, self.tls_key)


FINAL_DOWNLOAD_TIMEOUT_S = 120.0


MAX_LOCAL_STEPS = protocol.MAX_LOCAL_STEPS
REFUSED_TASK_POLL_S = 5.0  # how often a node asks again while its refused task is still open
MAX_RETRY_AFTER_S = 60.0  # the longest WAIT.retry_after a node honours (then it asks anyway)
# An upload the coordinator could not store (REJECT_REASON_INTERNAL, e.g. its disk is full)
# leaves the task open, and the coordinator offers it again at once: the node sends the same
# update again only after this back-off, doubled after each such refusal up to the cap, so a
# coordinator in trouble is not hit by an upload several times a second (it may recover).
UPLOAD_RETRY_INITIAL_S = REFUSED_TASK_POLL_S
UPLOAD_RETRY_MAX_S = 120.0
# refusals that answer the task for good ("one upload decides a round"): never sent again
FINAL_REJECTIONS = frozenset(
    {
        pb.REJECT_REASON_STALE,
        pb.REJECT_REASON_UNKNOWN_TASK,
        # not MALFORMED: the coordinator refuses a stream cut before its trailer as MALFORMED
        # and keeps the task open; a MALFORMED it meant for good answers ALREADY_REJECTED next
        pb.REJECT_REASON_DIGEST_MISMATCH,
        pb.REJECT_REASON_NON_FINITE,
        pb.REJECT_REASON_NORM_BOUND,
        pb.REJECT_REASON_DUPLICATE,
        pb.REJECT_REASON_ALREADY_REJECTED,
    }
)
LEAVE_TIMEOUT_S = 5.0  # the Leave of a stopping node: well within Docker's 10 s stop timeout
# longest heartbeat interval a node takes from Join, and longest it gives one task step (a
# deadline further out is a coordinator bug; gRPC fails a call with a far deadline at once)
MAX_HEARTBEAT_INTERVAL_S = protocol.MAX_HEARTBEAT_S
MAX_TASK_TIME_S = 24 * 3600.0


SAFE_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def audit_file_name(round_: int, task_id: str) -> str:
    """The audit copy's file name. The task id is the coordinator's free text (the protocol
    fixes no format): used only when it is a plain short name, else its digest, so no id can
    name a path elsewhere or one too long for the file system (the metadata keeps the id)."""
    if not SAFE_TASK_ID.fullmatch(task_id):
        task_id = "id-" + hashlib.sha256(task_id.encode("utf-8", "replace")).hexdigest()[:32]
    return f"round-{round_:05d}-{task_id}.safetensors"


def training_settings(hp: pb.Hyperparameters, task: str) -> TrainingSettings:
    """The run's learning rate, episode sizes and embedding noise from a task's hyperparameters
    (`task`: TRAIN, or SHUTDOWN for personalization), checked before any of it is used."""
    lr = hp.learning_rate
    if not (math.isfinite(lr) and 0 < lr <= protocol.MAX_LEARNING_RATE):
        raise InputError(
            f"{task} hyperparameters: learning_rate {lr!r} is not in "
            f"(0, {protocol.MAX_LEARNING_RATE:g}]"
        )
    ranges = {"context_range": hp.context_range, "target_range": hp.target_range}
    for name, r in ranges.items():
        if not 1 <= r.min <= r.max:
            raise InputError(
                f"{task} hyperparameters: {name} {r.min}..{r.max} is not a range of at least 1"
            )
    noise = hp.embedding_noise
    if not (math.isfinite(noise) and 0 <= noise <= MAX_EMBEDDING_NOISE):
        raise InputError(
            f"{task} hyperparameters: embedding_noise {noise!r} is not in 0..{MAX_EMBEDDING_NOISE}"
        )
    if hp.optimizer not in ("", *LOCAL_OPTIMIZERS):
        raise InputError(
            f"{task} hyperparameters: optimizer {hp.optimizer[:40]!r} is not one this node has "
            f"(only {', '.join(repr(o) for o in LOCAL_OPTIMIZERS)})"
        )
    return TrainingSettings(
        learning_rate=lr,
        context_range=(hp.context_range.min, hp.context_range.max),
        target_range=(hp.target_range.min, hp.target_range.max),
        embedding_noise=noise,
        optimizer=hp.optimizer or LOCAL_OPTIMIZER,
    )


def personalization_settings(hp: pb.Hyperparameters) -> TrainingSettings:
    """How a node fine-tunes the final model on its own data: the run's settings, with Adam. A run
    whose nodes take plain gradient steps (local_optimizer = "sgd") sends a learning rate that
    scales a gradient for the server's Adam, not one to fine-tune with: then the protocol's."""
    settings = training_settings(hp, "SHUTDOWN")
    if settings.optimizer == "adam":
        return settings
    return dataclasses.replace(settings, optimizer="adam", learning_rate=protocol.LEARNING_RATE)


def local_steps_of(hp: pb.Hyperparameters) -> int:
    """A TRAIN task's local steps, checked."""
    if not 1 <= hp.local_steps <= MAX_LOCAL_STEPS:
        raise InputError(
            f"TRAIN hyperparameters: local_steps {hp.local_steps} is not in 1..{MAX_LOCAL_STEPS}"
        )
    return hp.local_steps


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


def reject_reason_name(reason: int) -> str:
    """The enum name of an UploadReply.reason; a number a newer coordinator added, as is."""
    try:
        return pb.RejectReason.Name(reason)  # type: ignore[arg-type]
    except ValueError:
        return f"reject reason {reason}"


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
    """The coordinator's certificate does not pass this node's checks: a setup problem that
    looks like a coordinator that is down."""
    return "Hostname Verification Check failed" in details or "CERTIFICATE_VERIFY_FAILED" in details


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


@dataclass
class UnsentUpdate:
    """A trained update the coordinator could not store, and when to send it again."""

    task_id: str
    model_version: str
    weights: dict
    metrics: dict[str, float]
    result: LocalResult
    backoff_s: float
    retry_at: float  # monotonic clock


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
        if self._checked_connection >= 0:
            old.unsubscribe(self._on_connectivity)
        self._open_channel()
        self._connections = 0
        self.channel.subscribe(self._on_connectivity)
        old.close()

    def certificate_problem(self) -> str | None:
        """After a failed connection: this node's certificate or the CA's is expired or not
        valid yet (which file, its dates), or None."""
        return validity_problem(self._certs)

    @contextlib.contextmanager
    def _tracked(self, call: Any) -> Iterator[None]:
        """`call` (a grpc.Future or response stream) may be cancelled by `cancel_calls`."""
        with self._calls_lock:
            self._calls.add(call)
            if self._cancelled:
                call.cancel()
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def _result(self, call: Any) -> Any:
        """The result of a unary-response call started with `.future`, cancellable."""
        with self._tracked(call):
            try:
                return call.result()
            except grpc.FutureCancelledError:
                raise NodeStopped("call cancelled: the node is stopping") from None

    def cancel_calls(self) -> None:
        """Cancel the RPCs in flight and every one started from now on (the node stops). Leave
        and Heartbeat are not cancelled: they are short, and Leave is what a stop sends."""
        with self._calls_lock:
            self._cancelled = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def close(self) -> None:
        if self._revocations is not None:
            self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()

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
        req = pb.GetTaskRequest(session_id=self.session_id)
        req.wait.FromMilliseconds(int(wait_s * 1000))
        task: pb.Task = self._result(self.stub.GetTask.future(req, timeout=wait_s + 30))
        return task

    def download(self, version: str, timeout: float) -> dict:
        """Model `version`, checked against its header (InputError saying what is wrong)."""
        self._check_coordinator_certificate(only_if_reconnected=True)
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

    def upload(
        self,
        task: pb.Task,
        weights: dict,
        num_examples: int,
        metrics: dict[str, float],
        timeout: float,
    ) -> pb.UploadReply:
        self._check_coordinator_certificate(only_if_reconnected=True)
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
    ) -> None:
        self.stub.Heartbeat(
            pb.HeartbeatRequest(
                session_id=self.session_id, state=state, task_id=task_id, message=message
            ),
            timeout=10,
        )

    def leave(self, reason: str, timeout: float = 10.0) -> None:
        self.stub.Leave(pb.LeaveRequest(session_id=self.session_id, reason=reason), timeout=timeout)


def label_of(err: grpc.RpcError | ServerCheckFailed) -> str:
    """A failed connection's gRPC status name, or what the tls_crl check is."""
    return err.code().name if isinstance(err, grpc.RpcError) else "revocation check"


class GroupNode:
    """The run loop: join, take tasks until SHUTDOWN, rejoin after any loss, with backoff."""

    def __init__(self, config: NodeConfig, worker: GroupWorker) -> None:
        self.config = config
        self.worker = worker
        self.client = NodeClient(config)
        self._stop = threading.Event()
        self._state: pb.NodeState.ValueType = pb.NODE_STATE_IDLE
        self.rounds_trained = 0
        # TRAIN tasks refused for bad settings, or whose update was rejected for good: the
        # coordinator offers a task until it is answered, so one may come back until its round
        # closes
        self._refused: set[str] = set()
        self._unknown_kinds: set[int] = set()  # task kinds this node does not know, logged once
        # the update the coordinator could not store (REJECT_REASON_INTERNAL), kept to be sent
        # again, not trained again, once the back-off after that refusal has passed
        self._unsent: UnsentUpdate | None = None
        # how a stop ends the run: set by the first `stop`
        self._exit_code = 0
        self._stop_reason = ""
        # the final model, downloaded at SHUTDOWN when this node personalizes
        self._final: tuple[pb.Task, dict] | None = None
        # when the current task arrived (monotonic clock), which its time budget counts from
        self._task_received = time.monotonic()
        # when this node's sessions were replaced by another Join with its certificate (monotonic)
        self._replaced_at: list[float] = []
        self._run_id = ""  # the run this node last joined, to notice a coordinator's new run
        # the details of the last failed connection, logged in full only when they change
        self._unreachable_details: str | None = None

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop soon (on signal `signum`): cancel the RPCs in flight, so a long poll of up to
        poll_wait_s or a transfer does not delay it, then `run` leaves (so an open round stops
        waiting for this node) and returns 128 + signum, the shell's code for a death by that
        signal (143 SIGTERM, 130 SIGINT), never 0, which says the federation finished. Local
        training in progress finishes first. Not for a signal handler: it takes locks."""
        if not self._stop.is_set():
            name = signal.Signals(signum).name
            self._exit_code = signal_exit_code(signum)
            self._stop_reason = f"stopped by signal {name}"
            log.info("%s: %s; stopping", self.config.group, name)
        self._stop.set()
        self.client.cancel_calls()

    def _stopped(self) -> int:
        """After `stop`: leave (briefly; the coordinator may be gone) and say so."""
        if self.client.session_id:
            with contextlib.suppress(grpc.RpcError):
                self.client.leave(self._stop_reason, timeout=LEAVE_TIMEOUT_S)
        log.info("%s: %s (exit code %d)", self.config.group, self._stop_reason, self._exit_code)
        return self._exit_code

    def run(self) -> int:
        """Returns 0 when the federation finished, 2 on a configuration problem or a message
        from the coordinator that breaks the protocol (retrying cannot help either, nor with a
        certificate that expired, nor when another process keeps joining as this node), 1 when
        the coordinator stayed unreachable, a requested personalization failed or an unexpected
        error stopped it (logged with its traceback, after leaving), 128 + the signal's number
        after `stop`."""
        backoff = self.config.backoff_initial_s
        unreachable_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    self._join()
                    backoff = self.config.backoff_initial_s
                    unreachable_since = None
                    self._unreachable_details = None  # a later failure is told in full again
                    if self._serve_tasks():
                        return self._personalize()
                except SessionReplaced as err:
                    if self._replaced_again(str(err)):
                        return 2
                except SessionLost as err:
                    # the coordinator's details end in "join again": said once
                    lost = str(err).removesuffix(": join again")
                    log.warning("%s: %s; joining again", self.config.group, lost)
                except InputError as err:
                    log.error("%s: stopping: %s", self.config.group, err)
                    if self.client.session_id:
                        with contextlib.suppress(grpc.RpcError):
                            self.client.leave("stopped on an error")  # its text stays here
                    return 2
                except (grpc.RpcError, ServerCheckFailed, NodeStopped) as err:
                    if self._stop.is_set():  # a call that `stop` cancelled: no failure
                        break
                    if isinstance(err, NodeStopped):
                        raise
                    # (the tls_crl check of the coordinator's certificate that could not be
                    # made counts as an unreachable coordinator: never joined unchecked)
                    code = err.code() if isinstance(err, grpc.RpcError) else None
                    if code in FATAL_CODES:
                        log.error(
                            "%s: refused by the coordinator (%s): %s",
                            self.config.group,
                            code.name if code else "?",
                            err.details() if hasattr(err, "details") else err,
                        )
                        return 2
                    problem = self.client.certificate_problem()
                    if problem is not None:  # no handshake can succeed: retrying cannot help
                        log.error(
                            "%s: cannot connect to %s (%s): %s",
                            self.config.group,
                            self.config.coordinator,
                            code.name if code else err,
                            problem,
                        )
                        return 2
                    unreachable_since = unreachable_since or time.monotonic()
                    why = self._unreachable_why(err)
                    limit = self.config.give_up_after_s
                    if limit is not None and time.monotonic() - unreachable_since > limit:
                        log.error(
                            "%s: coordinator unreachable for %g s, giving up: %s",
                            self.config.group,
                            limit,
                            why,
                        )
                        return 1
                    delay = backoff * (0.5 + random.random())
                    changed = why != self._unreachable_details
                    self._unreachable_details = why
                    log.warning(
                        "%s: coordinator unreachable %s; retrying in %.1f s",
                        self.config.group,
                        why
                        if changed
                        else f"({label_of(err)}) at {self.config.coordinator}, as before",
                        delay,
                    )
                    self._stop.wait(delay)
                    backoff = min(backoff * 2, self.config.backoff_max_s)
                except Exception:
                    # a bug, or the machine (no temporary folder in a read-only container, ...):
                    # its traceback in the log, and the round stops waiting for this node
                    log.exception("%s: stopping on an unexpected error", self.config.group)
                    if self.client.session_id:
                        with contextlib.suppress(grpc.RpcError):
                            self.client.leave("stopped on an unexpected error")
                    return 1
            return self._stopped()
        finally:
            self.client.close()

    def _unreachable_why(self, err: grpc.RpcError | ServerCheckFailed) -> str:
        """The coordinator's address and why it cannot be reached (gRPC's details, shortened;
        what a TLS cause means): a coordinator that is down and a node set up wrong both fail
        as UNAVAILABLE, and only the details tell them apart."""
        details = err.details() if isinstance(err, grpc.RpcError) else str(err)
        details = shortened(details or "no details")
        why = f"({label_of(err)}) at {self.config.coordinator}: {details}"
        if is_tls_cause(details):
            why += (
                f"; meaning: {connection_hint(details, self.config)} "
                "(`pluralfed node check` says what is wrong)"
            )
        elif "Connection refused" in details and container_loopback_note(
            self.config.coordinator.rpartition(":")[0]
        ):
            # a coordinator that is down looks the same, but from a container a loopback
            # address never reaches the host's coordinator: worth saying while it retries
            why += f"; meaning: {connection_hint(details, self.config)}"
        return why

    def _replaced_again(self, details: str) -> bool:
        """Log that another Join with this node's certificate replaced its session; True (stop)
        when that happened REPLACEMENTS_PER_WINDOW times within REPLACEMENT_WINDOW_S: two processes
        with one certificate take each other's session every few seconds, for ever."""
        now = time.monotonic()
        self._replaced_at = [t for t in self._replaced_at if now - t < REPLACEMENT_WINDOW_S]
        self._replaced_at.append(now)
        peer = replaced_by_peer(details)
        if len(self._replaced_at) >= REPLACEMENTS_PER_WINDOW:
            log.error(
                "%s: stopping: another process joins as this node (its session was replaced %d "
                "times in %.0f s, the latest by a Join from %s): two processes with one "
                "certificate? stopping this one",
                self.config.group,
                len(self._replaced_at),
                now - self._replaced_at[0],
                peer,
            )
            return True
        log.warning(
            "%s: this node's session was replaced by a newer Join with its certificate from %s: "
            "if this node did not restart, another process runs as it; joining again",
            self.config.group,
            peer,
        )
        return False

    def _join(self) -> None:
        reply = self.client.join(self.worker.num_train_examples, self.worker.encoder.identity)
        if self._run_id and reply.run_id != self._run_id:
            log.warning(
                "%s: the coordinator now runs another run (%s, before %s): it restarted with "
                "another or an empty state folder, so the earlier run was not resumed; this node "
                "works for the new one",
                self.config.group,
                reply.run_id,
                self._run_id,
            )
        self._run_id = reply.run_id
        log.info(
            "%s joined run %s as %s (session %s…)",
            self.config.group,
            reply.run_id,
            self.config.role,
            reply.session_id[:8],
        )

    def _heartbeats(self, stop: threading.Event) -> None:
        while not stop.wait(self.client.heartbeat_interval_s):
            # a lost coordinator is noticed by the task loop; heartbeats just keep trying
            with contextlib.suppress(grpc.RpcError):
                self.client.heartbeat(self._state)

    def _serve_tasks(self) -> bool:
        """Take tasks until SHUTDOWN (True) or the session is lost (raises)."""
        stop_beats = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(stop_beats,), daemon=True)
        beats.start()
        try:
            while not self._stop.is_set():
                asked = time.monotonic()
                try:
                    task = self.client.get_task(self.config.poll_wait_s)
                    self._task_received = time.monotonic()
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise session_lost(err.details() or "") from err
                    raise
                if task.kind == pb.TASK_KIND_SHUTDOWN:
                    log.info("%s: the federation is finished", self.config.group)
                    if self.config.personalize_steps:
                        self._fetch_final(task)
                    with contextlib.suppress(grpc.RpcError):
                        self.client.leave("finished")
                    return True
                if task.kind == pb.TASK_KIND_TRAIN and task.task_id in self._refused:
                    self._stop.wait(REFUSED_TASK_POLL_S)  # not again at once: wait the round out
                elif task.kind == pb.TASK_KIND_TRAIN and (wait := self._upload_backoff(task)):
                    # ask again meanwhile (the round may close or the run end), as for a refusal
                    self._stop.wait(min(wait, REFUSED_TASK_POLL_S))
                elif task.kind == pb.TASK_KIND_TRAIN:
                    self._train(task)
                elif task.kind == pb.TASK_KIND_EVALUATE:
                    self._evaluate(task)
                elif task.kind == pb.TASK_KIND_WAIT:  # the coordinator says when to ask again
                    delay = task.retry_after.ToMilliseconds() / 1000
                    # but a WAIT that was not held (a zero or negative retry_after from a faulty
                    # coordinator) must not make the node ask again in a loop
                    delay = max(delay, MIN_POLL_INTERVAL_S - (self._task_received - asked))
                    if delay > 0:
                        self._stop.wait(min(delay, MAX_RETRY_AFTER_S))
                else:  # a kind added after this node's protocol (enums may grow): not in a loop
                    self._unknown_task_kind(task)
                    self._stop.wait(REFUSED_TASK_POLL_S)
            return False
        finally:
            stop_beats.set()

    def _unknown_task_kind(self, task: pb.Task) -> None:
        """Logged once per kind: the node asks again every REFUSED_TASK_POLL_S meanwhile."""
        if task.kind in self._unknown_kinds:
            return
        self._unknown_kinds.add(task.kind)
        log.warning(
            "%s: the coordinator sent a task of kind %d, which this node (software %s) does not "
            "know: is the coordinator newer? Asking again every %g s",
            self.config.group,
            task.kind,
            __version__,
            REFUSED_TASK_POLL_S,
        )

    def _upload_backoff(self, task: pb.Task) -> float:
        """Seconds before the update of `task` the coordinator could not store may be sent
        again; 0 to go ahead."""
        unsent = self._unsent
        if unsent is None or unsent.task_id != task.task_id:
            return 0.0
        return max(0.0, unsent.retry_at - time.monotonic())

    def _fetch_final(self, task: pb.Task) -> None:
        """Download the final model named by SHUTDOWN (before leaving: the coordinator serves
        it only while nodes are still there). A failure is logged; `_personalize` reports it."""
        if not task.model_version:
            log.error(
                "%s: SHUTDOWN names no final model (the coordinator dismissed this node or is "
                "older than personalization): nothing to personalize",
                self.config.group,
            )
            return
        try:
            weights = self.client.download(task.model_version, timeout=FINAL_DOWNLOAD_TIMEOUT_S)
        except (grpc.RpcError, InputError) as err:
            details = err.details() if isinstance(err, grpc.RpcError) else str(err)
            log.error(
                "%s: could not download the final model %s: %s",
                self.config.group,
                task.model_version,
                details,
            )
            return
        self._final = (task, weights)

    def _personalize(self) -> int:
        """After a finished run: fine-tune the final model on this group's data and save it
        locally (`NodeConfig.personalize_steps`). 0 if done or not asked for, 1 if it failed."""
        steps = self.config.personalize_steps
        if not steps:
            return 0
        if self._final is None:
            log.error(
                "%s: no personalized model: the final model was not available", self.config.group
            )
            return 1
        task, weights = self._final
        folder = self.config.personalized_dir
        assert folder is not None  # NodeConfig requires it with personalize_steps
        try:
            settings = personalization_settings(task.hyperparameters)
            self.worker.load_global(self.client.model_config, weights)
            started = time.perf_counter()
            self.worker.save_personalized(folder, steps, settings, task.model_version, task.round)
        except (InputError, OSError, ValueError) as err:
            log.error("%s: personalization failed: %s", self.config.group, err)
            return 1
        log.info(
            "%s: final model (round %d) fine-tuned %d steps on this group's data in %.1f s; "
            "saved to %s (kept here, never sent)",
            self.config.group,
            task.round,
            steps,
            time.perf_counter() - started,
            folder,
        )
        return 0

    def _time_left(self, task: pb.Task) -> float:
        """Seconds a transfer for `task` may take: until its deadline, plus 5 s, at least 5 s.

        Counted from the task's time budget on this node's monotonic clock: the deadline is a
        timestamp by the coordinator's clock, which in another organization may be minutes off
        (a node ahead of it cut its downloads to 5 s). The timestamp serves only a coordinator
        that sends no budget.
        """
        if task.HasField("time_budget"):
            elapsed = time.monotonic() - self._task_received
            left = task.time_budget.ToMilliseconds() / 1000 - elapsed
        else:
            left = task.deadline.ToMilliseconds() / 1000 - time.time()
        return min(MAX_TASK_TIME_S, max(5.0, left + 5.0))

    def _load(self, task: pb.Task) -> None:
        self._state = pb.NODE_STATE_DOWNLOADING
        weights = self.client.download(task.model_version, timeout=self._time_left(task))
        self.worker.load_global(self.client.model_config, weights)

    def _call(self, what: str, fn: Callable[[], None], task: pb.Task) -> None:
        """Run one task step; a refusal of this one task (stale, duplicate) is logged, not fatal,
        and so is a task that failed here (TaskFailed), which the coordinator is told about."""
        try:
            fn()
        except TaskFailed as err:
            log.error("%s: %s failed: %s", self.config.group, what, err)
            self._refused.add(task.task_id)
            with contextlib.suppress(grpc.RpcError):  # so the round need not wait for us
                self.client.heartbeat(pb.NODE_STATE_FAILED, task.task_id, str(err)[:1000])
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.CANCELLED and not self._stop.is_set():
                # the coordinator cut the transfer: its round closed or it took our session
                # for gone; the next GetTask says which (a new task, or rejoin)
                log.warning(
                    "%s: %s cut by the coordinator (its round closed?)", self.config.group, what
                )
                return
            if code in (
                grpc.StatusCode.NOT_FOUND,  # the model version moved on: the task is superseded
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ALREADY_EXISTS,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,  # a download of ours still runs there
            ):
                log.warning(
                    "%s: %s refused: %s %s", self.config.group, what, code.name, err.details()
                )
                return
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise session_lost(err.details() or "") from err
            raise
        finally:
            self._state = pb.NODE_STATE_IDLE

    def _train(self, task: pb.Task) -> None:
        try:
            steps = local_steps_of(task.hyperparameters)
            settings = training_settings(task.hyperparameters, "TRAIN")
        except InputError as err:
            # a coordinator bug or a version mismatch: this round goes on without us
            log.error("%s: round %d task refused: %s", self.config.group, task.round, err)
            self._refused.add(task.task_id)
            # tell the coordinator, so the round need not wait for its deadline (the message
            # names only the task's own field, nothing of this node's data)
            with contextlib.suppress(grpc.RpcError):
                self.client.heartbeat(pb.NODE_STATE_FAILED, task.task_id, str(err)[:1000])
            return

        unsent = self._unsent
        if unsent is not None and (unsent.task_id, unsent.model_version) != (
            task.task_id,
            task.model_version,
        ):
            unsent = self._unsent = None  # another task: that update is of no use any more

        def work() -> None:
            if unsent is None:
                self._load(task)
                self._state = pb.NODE_STATE_TRAINING
                result = self.worker.train(
                    steps, settings, task.hyperparameters.keep_local_optimizer_state
                )
                self._state = pb.NODE_STATE_UPLOADING
                weights = self.worker.weights()
                metrics = {
                    "loss": result.mean_loss,
                    "steps": float(result.steps),
                    "seconds": result.seconds,
                    ALIGNMENT_BEFORE: result.alignment_before,
                }
                if self.config.save_updates_dir is not None:
                    self._save_update(task, weights, metrics)
            else:  # the same update again: training twice would also step the optimizer twice
                self._state = pb.NODE_STATE_UPLOADING
                weights, metrics, result = unsent.weights, unsent.metrics, unsent.result
                log.info("%s: round %d: sending the update again", self.config.group, task.round)
            reply = self.client.upload(
                task,
                weights,
                self.worker.num_train_examples,
                metrics,
                timeout=self._time_left(task),
            )
            if not reply.accepted:
                final = reply.reason in FINAL_REJECTIONS
                if final:
                    self._unsent = None
                    self._refused.add(task.task_id)
                else:  # the coordinator could not store it: the task stays open
                    backoff = UPLOAD_RETRY_INITIAL_S
                    if unsent is not None:
                        backoff = min(unsent.backoff_s * 2, UPLOAD_RETRY_MAX_S)
                    self._unsent = UnsentUpdate(
                        task.task_id,
                        task.model_version,
                        weights,
                        metrics,
                        result,
                        backoff,
                        time.monotonic() + backoff,
                    )
                log.warning(
                    "%s: round %d update not counted: %s (%s)%s",
                    self.config.group,
                    task.round,
                    reject_reason_name(reply.reason),
                    reply.message,
                    "" if final else f"; sending it again in {backoff:g} s if the round is open",
                )
                return
            self._unsent = None
            self.rounds_trained += 1
            log.info(
                "%s: round %d trained (%d steps, lr %g, embedding noise %g, loss %.4f, %.1f s) "
                "and uploaded",
                self.config.group,
                task.round,
                result.steps,
                settings.learning_rate,
                settings.embedding_noise,
                result.mean_loss,
                result.seconds,
            )

        self._call(f"round {task.round} update", work, task)

    def _save_update(self, task: pb.Task, weights: dict, metrics: dict[str, float]) -> None:
        """The audit copy (`NodeConfig.save_updates_dir`) of the update about to be uploaded,
        with the metrics sent along (metadata `metric.NAME`, as repr of the float)."""
        folder = self.config.save_updates_dir
        assert folder is not None
        path = folder / audit_file_name(task.round, task.task_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_tensors(
                path,
                weights,
                metadata={
                    "group": self.config.group,
                    "round": str(task.round),
                    "task_id": task.task_id,
                    "base_model_version": task.model_version,
                    "num_examples": str(self.worker.num_train_examples),
                    "digest": digest_of(weights).hex(),
                    **{f"metric.{name}": repr(float(value)) for name, value in metrics.items()},
                },
            )
        except OSError as err:  # an update that cannot be audited is not uploaded
            raise TaskFailed(f"cannot save the audit copy of the update to {path}: {err}") from None
        log.info("%s: round %d update saved to %s", self.config.group, task.round, path)

    def _evaluate(self, task: pb.Task) -> None:
        def work() -> None:
            self._load(task)
            self._state = pb.NODE_STATE_EVALUATING
            ev = self.worker.evaluate(task.evaluation.max_context or 90, int(task.evaluation.seed))
            self.client.report(task, self.config.group, ev.metrics(), ev.num_questions)
            log.info(
                "%s: evaluated round %d: alignment %.4f", self.config.group, task.round, ev.model
            )

        self._call(f"round {task.round} evaluation", work, task)
