"""A group node: joins the coordinator, takes tasks, trains and evaluates locally.

The node opens every connection (it may sit behind a firewall); the coordinator never dials it.
It survives coordinator restarts and network cuts: any lost connection or unknown session leads
to a rejoin with exponential backoff. Only model tensors and aggregate metrics leave the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from group_node.client import (
    PLAIN_TEXT_TO_TLS,
    NodeClient,
    NodeStopped,
    SessionLost,
    SessionReplaced,
    connection_hint,
    container_loopback_note,
    is_tls_cause,
    label_of,
    replaced_by_peer,
    session_lost,
    shortened,
)
from group_node.config import NodeConfig
from group_node.worker import GroupWorker, LocalResult, TaskCancelled, TaskFailed
from pluralfed import __version__, protocol
from pluralfed.errors import InputError, signal_exit_code
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.protocol import (
    ALIGNMENT_BEFORE,
    LOCAL_OPTIMIZER,
    LOCAL_OPTIMIZERS,
    MAX_EMBEDDING_NOISE,
    MIN_POLL_INTERVAL_S,
    REPLACEMENT_WINDOW_S,
    REPLACEMENTS_PER_WINDOW,
)
from pluralfed.tensorfiles import save_tensors
from pluralfed.tls import (
    ServerCheckFailed,
)
from pluralfed.training import TrainingSettings
from pluralfed.wire import digest_of

log = logging.getLogger("pluralfed.node")

# statuses after which retrying cannot help: the node's setup is wrong
FATAL_CODES = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


FINAL_DOWNLOAD_TIMEOUT_S = 120.0


MAX_LOCAL_STEPS = protocol.MAX_LOCAL_STEPS
REFUSED_TASK_POLL_S = 5.0  # how often a node asks again while its refused task is still open
MAX_RETRY_AFTER_S = 60.0  # the longest WAIT.retry_after a node honours (then it asks anyway)
# a node told to wait this long says so (then every IDLE_NOTE_EVERY_S): a coordinator waiting for
# a quorum, or for held-out groups before the end, left a partner's node silent for minutes
IDLE_NOTE_FIRST_S = 60.0
IDLE_NOTE_EVERY_S = 600.0
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
# the longest a node gives one task step (a deadline further out is a coordinator bug; gRPC
# fails a call with a far deadline at once)
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


def reject_reason_name(reason: int) -> str:
    """The enum name of an UploadReply.reason; a number a newer coordinator added, as is."""
    try:
        return pb.RejectReason.Name(reason)  # type: ignore[arg-type]
    except ValueError:
        return f"reject reason {reason}"


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


@dataclass
class TaskWork:
    """The task this node works on: its heartbeats name it (HeartbeatRequest.task_id), and
    `cancelled` is set once the coordinator answers one with cancel_task."""

    task_id: str
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


# how often a pause of the run loop (on the main thread) wakes to run Python's signal handlers
STOP_WAKE_S = 0.5


class StopEvent(threading.Event):
    """The node's stop, whose waits wake every STOP_WAKE_S. The run loop pauses on the main
    thread, where Python runs signal handlers; the kernel may hand SIGTERM to another thread
    (gRPC's), which does not wake a main thread blocked in one long wait: a node backing off
    for a minute then ignored `docker stop` for that minute, and was killed without leaving."""

    # a pause is real time, whichever clock the run loop's bookkeeping reads
    _clock = staticmethod(time.monotonic)

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else self._clock() + timeout
        while True:
            step = STOP_WAKE_S if end is None else min(STOP_WAKE_S, end - self._clock())
            if step <= 0:
                return self.is_set()
            if super().wait(step):
                return True


class GroupNode:
    """The run loop: join, take tasks until SHUTDOWN, rejoin after any loss, with backoff."""

    def __init__(self, config: NodeConfig, worker: GroupWorker) -> None:
        self.config = config
        self.worker = worker
        self.client = NodeClient(config)
        self._stop: threading.Event = StopEvent()
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
        # the TRAIN or EVALUATE task being worked on (None between tasks), which the heartbeat
        # thread names and may cancel; the lock makes "still the current work?" and its
        # cancellation one step, so a late cancel_task never reaches the next task's work
        self._work: TaskWork | None = None
        self._work_lock = threading.Lock()
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
                    elapsed = time.monotonic() - unreachable_since
                    if limit is not None and elapsed >= limit:
                        log.error(
                            "%s: coordinator unreachable for %.1f s (give_up_after_s %g), "
                            "giving up: %s",
                            self.config.group,
                            elapsed,
                            limit,
                            why,
                        )
                        return 1
                    delay = backoff * (0.5 + random.random())
                    if limit is not None:  # the last try when the limit is reached, not after
                        delay = min(delay, limit - elapsed)
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
        if is_tls_cause(details) or (self.config.insecure and PLAIN_TEXT_TO_TLS in details):
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
            self._forget_run()
        self._run_id = reply.run_id
        log.info(
            "%s joined run %s as %s (session %s…)",
            self.config.group,
            reply.run_id,
            self.config.role,
            reply.session_id[:8],
        )

    def _forget_run(self) -> None:
        """Drop the state of the run this node worked for before (a new JoinReply.run_id: the
        proto says the node drops any state of the old run).

        Dropped: the worker's model and local optimizer (keep_local_optimizer_state keeps Adam's
        moments only within one run: the old model's moments would steer the new run's first
        steps); the update the old coordinator could not store (an answer to a task of another
        run, never to be sent to this one); the tasks refused in the old run (their ids mean
        nothing in the new run, which may reuse one for a task this node must not refuse).
        Kept: what concerns this node and not a run: the Joins that replaced its session (two
        processes with one certificate do not stop being so), the task kinds it does not know
        (already said once), its count of rounds trained (this process's total)."""
        self.worker.forget_run()
        self._unsent = None
        self._refused.clear()

    def _heartbeats(self, stop: threading.Event) -> None:
        """Beat every heartbeat interval (the last reply's, `NodeClient.heartbeat`), naming the
        task being worked on; a reply's cancel_task stops that task's work (`_cancel`)."""
        while not stop.wait(self.client.heartbeat_interval_s):
            with self._work_lock:
                work = self._work
            try:
                reply = self.client.heartbeat(self._state, work.task_id if work else "")
            except grpc.RpcError:
                continue  # a lost coordinator is noticed by the task loop; heartbeats keep trying
            if reply.cancel_task and work is not None:
                self._cancel(work)

    def _cancel(self, work: TaskWork) -> None:
        """The coordinator no longer wants `work`'s task (its round closed, or it has this
        node's answer): training stops before its next step, the task's transfer or report in
        flight is cancelled, and the task loop asks for the next task (`_call`). A cancel_task
        that comes after the work ended (the reply to a beat sent just before) is no news."""
        with self._work_lock:
            if self._work is not work or work.cancelled.is_set():
                return
            work.cancelled.set()
            self.client.cancel_task_calls()

    def _serve_tasks(self) -> bool:
        """Take tasks until SHUTDOWN (True) or the session is lost (raises)."""
        stop_beats = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(stop_beats,), daemon=True)
        beats.start()
        idle_since, idle_noted = time.monotonic(), 0.0  # since the last task; seconds said
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
                    idle_noted = self._note_idle(time.monotonic() - idle_since, idle_noted)
                    delay = task.retry_after.ToMilliseconds() / 1000
                    # but a WAIT that was not held (a zero or negative retry_after from a faulty
                    # coordinator) must not make the node ask again in a loop
                    delay = max(delay, MIN_POLL_INTERVAL_S - (self._task_received - asked))
                    if delay > 0:
                        self._stop.wait(min(delay, MAX_RETRY_AFTER_S))
                else:  # a kind added after this node's protocol (enums may grow): not in a loop
                    self._unknown_task_kind(task)
                    self._stop.wait(REFUSED_TASK_POLL_S)
                if task.kind != pb.TASK_KIND_WAIT:
                    idle_since, idle_noted = time.monotonic(), 0.0
            return False
        finally:
            stop_beats.set()

    def _note_idle(self, idle_s: float, noted_s: float) -> float:
        """Say that the node has had no task for `idle_s` seconds, once it is IDLE_NOTE_FIRST_S
        and then every IDLE_NOTE_EVERY_S; returns the idle time last said (`noted_s` if none)."""
        due = IDLE_NOTE_FIRST_S if not noted_s else noted_s + IDLE_NOTE_EVERY_S
        if idle_s < due:
            return noted_s
        log.info(
            "%s: no task for %.0f s: the coordinator is waiting (for a quorum, for other nodes, "
            "or for the groups it evaluates at the end); this node stays connected and takes "
            "the next task when there is one",
            self.config.group,
            idle_s,
        )
        return idle_s

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

    def _call(self, what: str, fn: Callable[[TaskWork], None], task: pb.Task) -> None:
        """Run one task's work, which the heartbeats name meanwhile; a refusal of this one task
        (stale, duplicate) is logged, not fatal, and so is a task that failed here (TaskFailed),
        which the coordinator is told about, and one the coordinator cancelled (TaskCancelled)."""
        work = TaskWork(task.task_id)
        with self._work_lock:
            self._work = work
        try:
            fn(work)
        except TaskCancelled as err:
            log.info(
                "%s: %s cancelled by the coordinator while %s%s: its round closed, or it has "
                "this node's answer; asking for the next task",
                self.config.group,
                what,
                pb.NodeState.Name(self._state).removeprefix("NODE_STATE_").lower(),
                f" ({err})" if str(err) else "",
            )
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
            with self._work_lock:
                self._work = None
                self.client.task_done()
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

        def work(current: TaskWork) -> None:
            if unsent is None:
                self._load(task)
                self._state = pb.NODE_STATE_TRAINING
                result = self.worker.train(
                    steps,
                    settings,
                    task.hyperparameters.keep_local_optimizer_state,
                    cancelled=current.cancelled.is_set,
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
                    if current.cancelled.is_set():  # no audit copy of an update never sent
                        raise TaskCancelled()
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
        def work(current: TaskWork) -> None:  # its report is cancelled with the task
            self._load(task)
            self._state = pb.NODE_STATE_EVALUATING
            ev = self.worker.evaluate(
                task.evaluation.max_context or protocol.EVAL_MAX_CONTEXT, int(task.evaluation.seed)
            )
            self.client.report(task, self.config.group, ev.metrics(), ev.num_questions)
            log.info(
                "%s: evaluated round %d: alignment %.4f", self.config.group, task.round, ev.model
            )

        self._call(f"round {task.round} evaluation", work, task)
