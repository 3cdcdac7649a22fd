"""The coordinator's round state machine, apart from any transport.

`RoundEngine` is what the gRPC servicer calls into: nodes join, ask for their next task (a long
poll), download the global model, hand in validated updates and evaluation reports. A driver
thread (`run`) moves the federation along:

    wait for a quorum -> TRAIN round (all live training nodes) -> aggregate if enough updates
    arrived by the deadline, else retry the round -> checkpoint -> every N rounds an EVALUATE
    round (every node, the evaluate-only ones too) -> ... -> DONE

Nodes are never dialled: they come to the engine. Stragglers and failed nodes are dropped from a
round, never from the federation. After every round the state is checkpointed atomically, so a
coordinator killed at any moment resumes from its last completed round.

The engine is in five files, each about one thing:

    rounds.py       `RoundEngine`: the run's state (all made in its __init__) and the driver
                    that opens, waits for and closes the rounds, averages and checkpoints
    node_calls.py   what each node call does to the open round (`NodeCalls`, which the engine
                    inherits: the node-facing half of its methods)
    sessions.py     the node sessions: joined, live, expired, replaced (`SessionTable`)
    tasks.py        the task kinds, a task as a node is told it, the global model as it is
                    downloaded, and the open round's record (`OpenTask`)
    evaluations.py  the evaluation figures, and which groups the run's evaluations had

Locking: one RLock (`_lock`, with `_changed` its condition) guards all of the engine's state,
the session table's too (which takes no lock of its own); a long poll waits on its session's
`wakeup`, a condition on that same lock. Model-sized work runs without the lock: an update's
fold (NodeCalls.accept_update), and a round's average and checkpoint (`_training_round`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.evaluations import EvaluatedGroups, combine_evaluations
from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE, EvaluationLog, RoundHistory
from coordinator.metrics_file import MetricsFile
from coordinator.node_calls import NodeCalls
from coordinator.sessions import NodeSession, Role, SessionTable
from coordinator.settings import RoundSettings
from coordinator.state import RunState, load_state, save_state
from coordinator.strategy import (
    AggregationError,
    ServerOptimizer,
    StreamingFedAvg,
    make_server_optimizer,
)
from coordinator.tasks import ClosedTask, OpenTask, TaskKind
from pluralfed.errors import InputError
from pluralfed.logthrottle import LogThrottle
from pluralfed.records import EvaluationRecord, RoundRecord, describe_record
from pluralfed.wire import TensorSpec, digest_of, specs_of

log = logging.getLogger("pluralfed.coordinator")

QUORUM_LOG_INTERVAL_S = 60.0  # a coordinator waiting for its quorum says so again this often


# a round whose average (or its server step) is unusable this many times in a row stops the run:
# the same updates would fail again, and every node would train for it for ever
MAX_UNUSABLE_ROUNDS = 3
# a round that every node answered early, too few of them with an update (each reporting its
# task failed: a full disk, a bad folder), is tried again after a pause that doubles up to this:
# at once, it was tried again about 3 times a second, for ever, with log lines each time
RETRY_PAUSE_FIRST_S = 1.0
RETRY_PAUSE_MAX_S = 60.0


class RoundEngine(NodeCalls):
    """All federation state and the rules for changing it; thread-safe (one lock, one condition).
    The node-facing calls are inherited from `NodeCalls` (node_calls.py)."""

    def __init__(
        self,
        settings: RoundSettings,
        initial_weights: Mapping[str, np.ndarray],
        state_dir: Path,
        encoder_identity: str,
        model_config: Mapping[str, Any],
        on_round: Callable[[RoundRecord | EvaluationRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self.encoder_identity = encoder_identity
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir = self.state_dir / "spool"
        try:
            self.spool_dir.mkdir(exist_ok=True)
            for stale in self.spool_dir.glob("*.spool"):
                stale.unlink()
        except OSError as err:  # a file of that name, say: a traceback before
            raise InputError(
                f"{self.spool_dir}: cannot use it for the updates being received ({err}); "
                "it must be a folder the coordinator may write"
            ) from err
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._rejection_lines = LogThrottle()  # lines nodes can cause, one a minute per kind
        self._check_lines = LogThrottle()  # `node check`s that passed, per group
        self._sessions = SessionTable(settings, self._lock, self._changed)  # under the lock
        self._task: OpenTask | None = None
        self._closed: ClosedTask | None = None  # the last round closed, for repeated answers
        self._aggregate: StreamingFedAvg | None = None
        self._done = False
        self._stop = threading.Event()
        self._unusable_in_a_row = 0  # tries of the current round that gave no usable model
        self._early_retries = 0  # tries of it that every node answered early, too few updating
        self._pause_s = 0.0  # before the next try of the current round (_retry_pause)
        self._on_round = on_round
        optimizer_args = {} if settings.server_lr is None else {"server_lr": settings.server_lr}
        self.optimizer: ServerOptimizer = make_server_optimizer(
            settings.server_optimizer, **optimizer_args
        )
        # a run finished (final evaluation included) before this process started it again
        self.finished_at_start = False
        self.evaluated_again = False  # ... whose final evaluation this process replaced
        self._joined: set[str] = set()  # groups that joined this process
        self._evaluated = EvaluatedGroups()  # what the run's evaluations had
        self._told_end: set[str] = set()  # groups whose node was handed SHUTDOWN
        resumed = load_state(self.state_dir)
        if resumed is not None:
            self.state = resumed
            self._check_resumed(initial_weights, model_config)
            if resumed.optimizer_state:
                try:
                    self.optimizer.load_state_dict(resumed.optimizer_state)
                except InputError as err:
                    raise InputError(
                        f"{self.state_dir}: cannot resume this run with server_optimizer "
                        f"{settings.server_optimizer!r}: {err}. Resume it with the optimizer it "
                        "was started with, or start a new run in another state folder"
                    ) from err
            log.info(
                "resumed run %s after round %d from %s",
                resumed.run_id,
                resumed.completed_rounds,
                self.state_dir,
            )
            if resumed.completed_rounds >= settings.rounds:
                # a finished run started again evaluates its final model again once its nodes
                # are back, so nodes started with it hear the run's end (a coordinator that left
                # at once left them retrying for ever)
                self.finished_at_start = self._has_eval(resumed.completed_rounds)
                log.warning(
                    "%s holds run %s, which has done %d rounds (rounds = %d here): nothing is "
                    "left to train; the final evaluation runs %sonce the nodes are back (for a "
                    "fresh run use an empty state folder)",
                    self.state_dir,
                    resumed.run_id,
                    resumed.completed_rounds,
                    settings.rounds,
                    "again " if self.finished_at_start else "",
                )
        else:
            self.state = RunState(
                run_id=uuid.uuid4().hex[:12],
                completed_rounds=0,
                weights={k: np.array(v, copy=True) for k, v in initial_weights.items()},
                model_config=dict(model_config),
                encoder_identity=encoder_identity,
                history=RoundHistory.create(self.state_dir / HISTORY_FILE),
                evaluations=EvaluationLog.create(self.state_dir / EVALUATIONS_FILE),
            )
            save_state(self.state_dir, self.state)
        self._evaluated.reload(self.state.evaluations.records())  # a resumed run's
        self.specs: list[TensorSpec] = specs_of(self.state.weights)
        self._refresh_version()
        self.metrics = MetricsFile(self.state_dir, self.state)
        if resumed is not None:
            self.metrics.mend()

    # ---------------------------------------------------------------- bookkeeping

    def _check_resumed(self, initial: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
        fresh = "resume it with the same settings, or start a new run in another state folder"
        if self.state.encoder_identity != self.encoder_identity:
            raise InputError(
                f"{self.state_dir}: the saved run used encoder {self.state.encoder_identity!r}, "
                f"this coordinator is configured with {self.encoder_identity!r}; {fresh}"
            )
        saved = dict(self.state.model_config)
        differ = sorted(k for k in {*saved, *config} if saved.get(k) != config.get(k))
        if differ:
            changes = ", ".join(f"{k} {saved.get(k)!r} -> {config.get(k)!r}" for k in differ)
            raise InputError(
                f"{self.state_dir}: the saved run's model differs from the configured one "
                f"({changes}); {fresh}"
            )
        if specs_of(self.state.weights) != specs_of(initial):
            raise InputError(
                f"{self.state_dir}: the saved run's weights do not fit the configured model; "
                f"{fresh}"
            )

    def _refresh_version(self, weights_digest: bytes | None = None) -> None:
        """The model's version and digest, after its weights changed (`weights_digest`: theirs,
        if known: hashing a large model once per round is enough)."""
        self.model_digest = weights_digest or digest_of(self.state.weights)
        digest = self.model_digest.hex()[:12]
        self.model_version = f"{self.state.run_id}-r{self.state.completed_rounds}-{digest}"

    @property
    def run_id(self) -> str:
        return self.state.run_id

    def completed_rounds(self) -> int:
        """Rounds done, read under the lock: once it says n, round n's record, checkpoint and
        metrics.jsonl are all written (state.completed_rounds alone is set before them)."""
        with self._lock:
            return self.state.completed_rounds

    @property
    def done(self) -> bool:
        return self._done

    def live_sessions(self, role: Role | None = None) -> list[NodeSession]:
        with self._lock:
            return self._sessions.live(role)

    def has_session(self, session_id: str) -> bool:
        """Whether `session_id` is a session the engine still knows (a node's join replaces its
        earlier session, so that one is gone)."""
        with self._lock:
            return session_id in self._sessions

    # ---------------------------------------------------------------- the driver

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
            # their calls are cut next: they look every STOPPING_POLL_S (node_calls.py)
            self._sessions.wake_polls()

    def run(self) -> None:
        """Drive rounds until the configured number completed (or stop()). Raises
        CheckpointError when the state cannot be written (state.json keeps the last
        checkpoint): a run that cannot checkpoint must not go on."""
        st = self.settings
        if self.finished_at_start:
            self._evaluate_again()
            with self._changed:
                self._done = True  # finished before; whatever happened to the evaluation
                self._task = None
                self._changed.notify_all()
                self._sessions.wake_polls()
            return
        fresh = self.state.completed_rounds == 0 and not self._has_eval(0)
        # (evaluating before anyone joined would evaluate nothing: wait for the quorum first)
        if st.eval_at_start and fresh and self._wait_for_quorum():
            self._evaluation_round()
        tried_final = False
        r = self.state.completed_rounds
        if 0 < r < st.rounds and self._eval_due(r) and self._wait_for_evaluators():
            self._evaluation_round()  # due when the coordinator stopped last time, before it ran
        while self.state.completed_rounds < st.rounds and not self._stop.is_set():
            if not self._wait_for_quorum():
                break
            before = self.state.completed_rounds
            self._training_round()
            r = self.state.completed_rounds
            if r == before:  # the round was retried: nothing new to evaluate
                pause, self._pause_s = self._pause_s, 0.0
                self._stop.wait(pause)
                continue
            if self._eval_due(r) and not self._stop.is_set():
                self._evaluation_round()
                tried_final = r == st.rounds
        finished = self.state.completed_rounds >= st.rounds
        # the final evaluation is of the model the run ends with: past `rounds` when a run was
        # resumed with fewer rounds than it had done (its evaluation of round `rounds` is older)
        final = self.state.completed_rounds
        if (
            finished
            and not self._has_eval(final)
            and not self._stop.is_set()
            # resumed after the last round: wait for the nodes to be back, the groups of the
            # run's evaluations too (after a final evaluation tried here and unanswered, once
            # more with whoever is left)
            and (tried_final or self._wait_for_evaluators())
        ):
            self._evaluation_round()
        with self._changed:
            # stopped before the final evaluation: not done, so a resume runs it
            self._done = finished and (self._has_eval(final) or not self._stop.is_set())
            self._task = None
            self._changed.notify_all()
            self._sessions.wake_polls()

    def _evaluate_again(self) -> None:
        """Evaluate a finished run's final model again, once every group of its last evaluation
        (those it had and those it missed) and every evaluate-only group has a node here, or
        with whoever came within eval_timeout_s: restarting a finished run is how an operator
        gets the figures of a group that was away at its end. The new evaluation replaces the
        old only if it covers every group the old one did (a partial one would drop, say, the
        held-out figures); otherwise the old one stays and the log says why."""
        last = self.state.evaluations.last  # of the last round: finished_at_start says so
        assert last is not None and last["round"] == self.state.completed_rounds
        wanted = set(last["groups"]) | set(last.get("missing", ()))
        wanted |= set(self.settings.evaluate_only or ())
        limit = self.settings.eval_timeout_s
        started = time.monotonic()
        announced = False
        with self._changed:
            while not self._stop.is_set():
                here = {s.group for s in self.live_sessions()}
                absent = sorted(wanted - here)
                if not absent:
                    break
                if time.monotonic() - started > limit:
                    if here:
                        log.warning(
                            "evaluating the finished run again without %s: not back within "
                            "eval_timeout_s (%.0f s)",
                            absent,
                            limit,
                        )
                        break
                    log.warning(
                        "no node came back within %.0f s to evaluate the finished run again: "
                        "its evaluation stays as it was",
                        limit,
                    )
                    return
                if not announced:
                    log.info(
                        "waiting up to %.0f s for %s to evaluate the finished run again",
                        limit,
                        absent,
                    )
                    announced = True
                self._changed.wait(1.0)
            else:
                return
        self._evaluation_round()

    def _eval_due(self, round_: int) -> bool:
        """Round `round_` is evaluated (every eval_every rounds, and the last) and is not yet."""
        st = self.settings
        due = (st.eval_every and round_ % st.eval_every == 0) or round_ == st.rounds
        return bool(due) and not self._has_eval(round_)

    def open_task(self) -> str | None:
        """What is open now ("train round 3"), or None (waiting for a quorum, say). Without the
        lock: a signal handler asks, and one read of `_task` is a consistent answer."""
        t = self._task
        return None if t is None else f"{t.kind.value} round {t.round}"

    def _has_eval(self, round_: int) -> bool:
        return round_ in self.state.evaluations.rounds

    def _evaluated_groups(self) -> set[str]:
        """The groups the run's evaluations so far had (reported, or asked and silent). A
        held-out group missing only because no node of it was connected is left out: its node
        may never have come, and the run's end is not held up for it (the evaluations count it
        via _held_out_groups)."""
        return set(self._evaluated.groups)

    def _held_out_groups(self, t: OpenTask) -> set[str]:
        """The run's held-out groups: evaluate_only when set; else those whose node joined as
        evaluate-only, in this evaluation or an earlier one (each node says its role)."""
        if self.settings.evaluate_only is not None:
            return set(self.settings.evaluate_only)
        held = {g for g, (role, _) in t.evaluations.items() if role == Role.EVALUATE_ONLY}
        for session_id, group in t.selected.items():
            s = self._sessions.get(session_id)
            if s is not None and s.role == Role.EVALUATE_ONLY:
                held.add(group)
        return held | self._evaluated.held_out

    def _wait_for_evaluators(self) -> bool:
        """Before an evaluation a stopped coordinator owed (after a restart): the quorum, then
        up to eval_timeout_s for a node of every group the run's evaluations had, the held-out
        groups (evaluate_only) and the last round's trainers, since nodes reconnect one by one
        and the quorum alone would leave the later ones, say the held-out figures, out; then
        whoever is here. False if stopped."""
        if not self._wait_for_quorum():
            return False
        wanted = self._evaluated_groups() | set(self.settings.evaluate_only or ())
        if self.state.history.last is not None:
            wanted.update(self.state.history.last["participants"])
        limit = self.settings.eval_timeout_s
        started = time.monotonic()
        announced = False
        with self._changed:
            while not self._stop.is_set():
                absent = sorted(wanted - {s.group for s in self.live_sessions()})
                if not absent:
                    return True
                if time.monotonic() - started > limit:
                    log.warning(
                        "evaluating without %s: not back within eval_timeout_s (%.0f s)",
                        absent,
                        limit,
                    )
                    return True
                if not announced:
                    log.info("waiting up to %.0f s for %s to evaluate too", limit, absent)
                    announced = True
                self._changed.wait(1.0)
        return False

    def unaware_of_end(self) -> list[str]:
        """Groups of the run (joined this process, trained or evaluated in it) whose node has
        not been handed SHUTDOWN: a node between reconnects would otherwise retry for ever."""
        with self._lock:
            groups = set(self._joined) | self._evaluated_groups()
            groups |= self.state.history.groups
            return sorted(groups - self._told_end)

    # the groups that may train (the allow-list's, less evaluate_only), which the service sets:
    # the quorum wait names those not here (the engine alone knows only who joined)
    allowed_trainers: frozenset[str] = frozenset()

    def _wait_for_quorum(self) -> bool:
        """Wait for min_nodes live training nodes; False if stopped (or no quorum within
        quorum_timeout_s). Says who is missing when the wait starts, whenever that changes,
        and every QUORUM_LOG_INTERVAL_S meanwhile: one line at the start of a long wait told an
        operator neither that it was still waiting nor for whom."""
        started = time.monotonic()
        said: tuple[int, list[str]] | None = None
        said_at = 0.0
        with self._changed:
            while not self._stop.is_set():
                n = len(self.live_sessions(Role.TRAIN))
                if n >= self.settings.min_nodes:
                    return True
                here = {s.group for s in self.live_sessions()}
                absent = sorted(self.allowed_trainers - here)
                now = time.monotonic()
                if said != (n, absent) or now - said_at >= QUORUM_LOG_INTERVAL_S:
                    log.info(
                        "waiting for a quorum: %d of %d training nodes%s",
                        n,
                        self.settings.min_nodes,
                        # allow-listed, not all trainers: without evaluate_only a group's role
                        # is known only once it joins
                        f"; allow-listed groups not connected: {', '.join(absent)}"
                        if absent
                        else "",
                    )
                    said, said_at = (n, absent), now
                limit = self.settings.quorum_timeout_s
                if limit is not None and now - started > limit:
                    log.error(
                        "no quorum after %.0f s%s; stopping",
                        limit,
                        f" (allow-listed groups not connected: {', '.join(absent)})"
                        if absent
                        else "",
                    )
                    self._stop.set()
                    return False
                self._changed.wait(1.0)
        return False

    def _round_aggregate(self) -> StreamingFedAvg:
        """The running sum for a new training round: one aggregate reused round after round.

        Safe to reset: updates fold only into the open task's aggregate, and the previous
        round's task was closed (self._task = None, then every claimed fold waited for).
        """
        if self._aggregate is None:
            st = self.settings
            self._aggregate = StreamingFedAvg(
                self.specs, uniform=st.weighting == "uniform" and st.fairness_q == 0
            )
        else:
            self._aggregate.reset()
        return self._aggregate

    def _open(self, kind: TaskKind, sessions: list[NodeSession], timeout: float) -> OpenTask:
        round_ = self.state.completed_rounds + (1 if kind == TaskKind.TRAIN else 0)
        with self._changed:
            aggregate = self._round_aggregate() if kind == TaskKind.TRAIN else None
        t = OpenTask(
            kind=kind,
            task_id=uuid.uuid4().hex,
            round=round_,
            model_version=self.model_version,
            deadline=time.monotonic() + timeout,
            selected={s.session_id: s.group for s in sessions},
            aggregate=aggregate,
        )
        with self._changed:
            self._task = t
            self._changed.notify_all()
            self._sessions.wake_polls()
        log.info(
            "%s round %d opened for %d nodes (deadline %.0f s)",
            kind.value,
            round_,
            len(sessions),
            timeout,
        )
        return t

    def _wait_for_answers(self, t: OpenTask) -> None:
        with self._changed:
            while not self._stop.is_set():
                self._give_up_on_silent(t)
                if len(t.answered) + len(t.folding) >= len(t.selected):
                    return
                remaining = t.deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(t.selected.values()) - set(t.answered) - t.folding)
                    log.warning(
                        "%s round %d: deadline passed without %s", t.kind.value, t.round, missing
                    )
                    return
                self._changed.wait(min(remaining, 1.0))

    def _give_up_on_silent(self, t: OpenTask) -> None:
        """Nodes of `t` whose session expired (no call for session_timeout_s: heartbeats keep a
        working node's alive) are that task's missing answers: waiting longer cannot help."""
        now = time.monotonic()
        for session_id, group in list(t.selected.items()):
            s = self._sessions.get(session_id)
            if s is None and self._take_over(t, session_id, group):
                continue
            if s is None:  # its session expired (a rejoin in the same role takes over the id)
                gave_up = self._give_up_on_group(t, session_id, "silent")
            else:
                gave_up = now - s.last_seen > self.settings.session_timeout_s and (
                    self._give_up_on(t, s, "silent")
                )
            if gave_up:
                log.warning(
                    "%s round %d: the session of %s expired, the round stops waiting for it",
                    t.kind.value,
                    t.round,
                    group,
                )

    def _take_over(self, t: OpenTask, session_id: str, group: str) -> bool:
        """A node that rejoined between the round's choice of sessions and its opening keeps its
        place: its new session takes over the old one's (as `join` does once a round is open)."""
        if group in t.answered or group in t.folding:
            return False
        for s in self._sessions.values():
            fits = s.role == Role.TRAIN or t.kind != TaskKind.TRAIN
            if s.group == group and fits and s.session_id not in t.selected:
                del t.selected[session_id]
                t.selected[s.session_id] = group
                self._changed.notify_all()
                self._sessions.wake_polls([s])
                return True
        return False

    def _retry_pause(self, t: OpenTask) -> float:
        """Seconds to wait before trying round `t` again: none after a deadline passed (that
        wait was the pause), else one that doubles with each early failure in a row."""
        if time.monotonic() >= t.deadline:
            self._early_retries = 0
            return 0.0
        self._early_retries += 1
        return min(RETRY_PAUSE_FIRST_S * 2 ** (self._early_retries - 1), RETRY_PAUSE_MAX_S)

    def _training_round(self) -> None:
        st = self.settings
        t = self._open(TaskKind.TRAIN, self.live_sessions(Role.TRAIN), st.round_timeout_s)
        self._wait_for_answers(t)
        with self._changed:
            self._task = None  # late uploads are now stale
            self._closed = ClosedTask.of(t)
            while t.folding:  # updates claimed in time count: wait for their folds
                self._changed.wait(1.0)
            assert t.aggregate is not None
            accepted = t.aggregate.num_updates
            if self._stop.is_set():
                return
            if accepted < st.min_updates:
                pause = self._retry_pause(t)
                log.warning(
                    "round %d: %d updates, %d needed: retrying the round%s",
                    t.round,
                    accepted,
                    st.min_updates,
                    f" in {pause:.0f} s" if pause else "",
                )
                self._pause_s = pause  # run() waits it, outside the lock
                return
            record: RoundRecord = {
                "round": t.round,
                "task_id": t.task_id,
                "participants": sorted(g for g, o in t.answered.items() if o == "accepted"),
                "selected": sorted(t.selected.values()),
                "outcomes": dict(sorted(t.answered.items())),
                "seconds": 0.0,  # set once the model is averaged
                "bytes_in": t.bytes_in,
                "bytes_out_model": sum(s.nbytes for s in self.specs) * len(t.selected),
                "total_weight": t.aggregate.total_weight,
                "update_weights": dict(sorted(t.weights.items())),
                "node_metrics": t.node_metrics,
                "finished_at": 0.0,  # set once the model is checkpointed
            }
            aggregate = t.aggregate
        # The average, its digest and the checkpoint are model-sized work: done without the
        # lock, so nodes' calls (heartbeats, polls, joins) are answered meanwhile; with the lock
        # held a 512 MB model stalled every call for 3.5 s. Nothing else writes the state, and
        # with the task closed no call can see or change the next model before it is published.
        try:
            averaged = aggregate.result()  # fails if an update was only partly folded
            new_weights = self.optimizer.apply(self.state.weights, averaged)  # or not finite
        except AggregationError as err:
            self._unusable_in_a_row += 1
            if self._unusable_in_a_row >= MAX_UNUSABLE_ROUNDS:
                log.error(
                    "round %d: no usable model %d times in a row (%s): stopping the run, "
                    "which would retry for ever; the last checkpoint stays, and a start "
                    "with the cause fixed (norm_bound, server_lr, the spool's disk) resumes",
                    t.round,
                    self._unusable_in_a_row,
                    err,
                )
                self._stop.set()
                return
            log.error("round %d: no usable average (%s): retrying the round", t.round, err)
            return
        self._unusable_in_a_row = self._early_retries = 0
        # the model served until this checkpoint is written: a failed one leaves it (the run
        # stops, and the server answers a little longer while it stops)
        checkpoint = dataclasses.replace(
            self.state,
            weights=new_weights,
            completed_rounds=t.round,
            optimizer_state=self.optimizer.state_dict(),
        )
        record["seconds"] = time.monotonic() - t.started
        record["finished_at"] = time.time()
        digest = digest_of(new_weights)
        save_state(self.state_dir, checkpoint, digest, record)
        with self._changed:  # published: the next model, its round and version at once
            self.state.weights = checkpoint.weights
            self.state.completed_rounds = checkpoint.completed_rounds
            self.state.optimizer_state = checkpoint.optimizer_state
            self._refresh_version(digest)
        self.metrics.write({"kind": "round", **record})
        log.info("%s", describe_record(record, st.rounds))
        if self._on_round:
            self._on_round(record)

    def _evaluation_round(self) -> None:
        st = self.settings
        t = self._open(TaskKind.EVALUATE, self.live_sessions(), st.eval_timeout_s)
        self._wait_for_answers(t)
        with self._changed:
            self._task = None
            self._closed = ClosedTask.of(t)
            if self._stop.is_set() or not t.evaluations:
                if not t.evaluations:
                    log.warning("evaluation at round %d: no reports", t.round)
                return
            reports = combine_evaluations(t.evaluations.values())
            held_out = self._held_out_groups(t)
            # asked and silent, absent though earlier evaluations had them, or held out and
            # not connected (figures of 1 of 6 held-out groups must not pass for all 6)
            expected = set(t.selected.values()) | self._evaluated_groups() | held_out
            missing = sorted(expected - set(t.evaluations))
            asked = set(t.selected.values())
            record: EvaluationRecord = {
                "round": t.round,
                "kind": "evaluation",
                "groups": sorted(t.evaluations),
                "missing": missing,
                "missing_held_out": [g for g in missing if g in held_out],
                "held_out_unconnected": [g for g in missing if g in held_out and g not in asked],
                "seconds": time.monotonic() - t.started,
                "reports": {name: rep.to_dict() for name, rep in reports.items()},
                "per_group": {
                    g: {"role": role.value, "num_questions": e.num_questions, **e.metrics()}
                    for g, (role, e) in sorted(t.evaluations.items())
                },
            }
            earlier = self.state.evaluations.last
            if earlier is not None and earlier["round"] != t.round:
                earlier = None
            if earlier is not None:  # evaluated again (a finished run started again)
                left_out = sorted(set(earlier["groups"]) - set(record["groups"]))
                if left_out:
                    log.warning(
                        "evaluation after round %d again: %s, without %s, which the earlier "
                        "evaluation had: the earlier one stays (%s)",
                        t.round,
                        describe_record(record),
                        left_out,
                        describe_record(earlier),
                    )
                    return
                log.info(
                    "evaluation after round %d replaces the earlier one (%s)",
                    t.round,
                    describe_record(earlier),
                )
                self.evaluated_again = True
            save_state(self.state_dir, self.state, self.model_digest, evaluation=record)
            if earlier is None:
                self._evaluated.note(record)
            else:  # what the replaced one had may be gone
                self._evaluated.reload(self.state.evaluations.records())
            self.metrics.write(None if earlier else record)
        log.info("%s", describe_record(record))
        if self._on_round:
            self._on_round(record)

    def final_evaluation(self) -> EvaluationRecord | None:
        return self.state.evaluations.last

    def describe(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "completed_rounds": self.state.completed_rounds,
            "settings": asdict(self.settings),
        }
