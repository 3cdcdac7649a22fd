"""What the nodes' calls do to the federation: the half of the round engine the transport
calls into, one method per call (join, heartbeat, leave, the next task's long poll, the model's
download, an update's upload, an evaluation's report).

`NodeCalls` is not used on its own: `RoundEngine` (rounds.py) inherits it, and the state these
methods read and change is the engine's, made in `RoundEngine.__init__` (listed below, for the
reader and for mypy). rounds.py holds that state and the driver that opens and closes rounds;
this file holds what a node may do to an open round, and the checks that keep it to that.

Locking: each call takes the engine's one lock (`_lock`, an RLock, with `_changed` its
condition) for the engine state it reads and changes, and notifies `_changed` when the driver may
have something new to see. Two things happen without the lock: an update's replay and fold (a pass
over the whole update, see `accept_update`), and a long poll's sleep, which waits on its own
session's `wakeup` condition (made on the same lock, so the wait releases it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from coordinator.sessions import NodeSession, Role, SessionTable
from coordinator.settings import RoundSettings
from coordinator.state import RunState
from coordinator.strategy import fairness_weight, streaming_update_norm
from coordinator.tasks import ClosedTask, GlobalModel, OpenTask, TaskKind, TaskSpec
from coordinator.validation import (
    MAX_FREE_TEXT,
    MAX_NODE_EXAMPLES,
    MAX_REASON_TEXT,
    MAX_VERSION_TEXT,
    MAX_WAIT_S,
    Rejection,
    checked_labels,
    checked_text,
    checked_update_metrics,
    clipped,
)
from pluralfed.errors import InputError, quoted
from pluralfed.logthrottle import LogThrottle
from pluralfed.metrics import GroupEvaluation
from pluralfed.protocol import ALIGNMENT_BEFORE
from pluralfed.wire import TensorSlice

log = logging.getLogger("pluralfed.coordinator")

STOPPING_POLL_S = 0.5  # how often a long poll looks whether its call was cancelled, once stopping


class NodeCalls:
    """The node-facing half of `RoundEngine`: thread-safe, on the engine's lock."""

    # the engine's state these calls use (RoundEngine.__init__ sets each, and says what it is)
    settings: RoundSettings
    encoder_identity: str
    state: RunState
    model_version: str
    model_digest: bytes
    _lock: threading.RLock
    _changed: threading.Condition
    _sessions: SessionTable
    _task: OpenTask | None
    _closed: ClosedTask | None
    _done: bool
    _stop: threading.Event
    _joined: set[str]
    _told_end: set[str]
    _check_lines: LogThrottle
    _rejection_lines: LogThrottle

    def join(
        self,
        group: str,
        role: Role,
        num_examples: int,
        encoder: str,
        software_version: str,
        labels: Mapping[str, str] | None = None,
        *,
        peer: str = "",
        check_only: bool = False,
    ) -> NodeSession:
        """Admit a node (its group already authenticated by the transport). Its version and
        labels are only logged, but kept short and printable for that. `check_only`: check as
        for a join, but open (and replace) nothing: the session returned has no id."""
        if encoder != self.encoder_identity:
            raise Rejection(
                "FAILED_PRECONDITION",
                f"encoder mismatch: node {group!r} embeds with {quoted(encoder)}, the federation "
                f"uses {self.encoder_identity!r}",
            )
        checked_text("software_version", software_version, MAX_VERSION_TEXT)
        extras = checked_labels(labels or {})
        allowed = self.settings.evaluate_only
        if allowed is not None:
            expected = Role.EVALUATE_ONLY if group in allowed else Role.TRAIN
            if role != expected:
                raise Rejection(
                    "PERMISSION_DENIED",
                    f"group {group!r} may only join as {expected.value} in this federation (the "
                    f"coordinator's evaluate_only); it asked to join as {role.value}",
                )
        if role == Role.TRAIN and num_examples < 1:
            raise Rejection("INVALID_ARGUMENT", f"training node {group!r} reports no examples")
        if num_examples > MAX_NODE_EXAMPLES:
            raise Rejection(
                "INVALID_ARGUMENT",
                f"node {group!r} reports {num_examples} training examples; at most "
                f"{MAX_NODE_EXAMPLES} are accepted",
            )
        now = time.monotonic()
        if check_only:  # a check run in a loop (a health probe) logs a line a minute
            more = self._check_lines.admit(group)
            if more is not None:
                log.info("node %s passed a connection check (from %s)%s", group, peer or "?", more)
            return NodeSession("", group, role, num_examples, software_version, now, now, peer=peer)
        with self._changed:
            # a restarted node replaces its old session (whose poll ends)
            session, replaced = self._sessions.open(
                group, role, num_examples, software_version, peer, now
            )
            t = self._task
            for old in replaced:
                # ... and keeps its place in the open round (the protocol: a node restarted
                # mid-task gets the same task again), and what it already answered
                session.answered |= old.answered
                if t is not None and old.role == role and old.session_id in t.selected:
                    del t.selected[old.session_id]
                    t.selected[session.session_id] = group
                elif t is not None:  # back in another role: the round stops waiting for it
                    self._give_up_on(t, old, "left")
            self._joined.add(group)
            self._changed.notify_all()
        log.info(
            "node %s joined as %s (%d examples, version %r%s)",
            group,
            role.value,
            num_examples,
            software_version,
            f", labels {extras}" if extras else "",
        )
        return session

    def heartbeat(
        self,
        session_id: str,
        group: str | None,
        task_id: str = "",
        failed: bool = False,
        message: str = "",
    ) -> tuple[int, bool]:
        """(completed rounds, whether the node should drop `task_id`: it is not the open task,
        or the node's answer to it is already recorded). A node reporting its task as `failed`
        gives that answer: the round stops waiting for it."""
        with self._changed:
            s = self._sessions.lookup(session_id, group)
            t = self._task
            current = t is not None and bool(task_id) and t.task_id == task_id
            if failed and current and t is not None:
                outcome = f"failed: {clipped(message, MAX_REASON_TEXT)}" if message else "failed"
                if self._give_up_on(t, s, outcome):
                    log.warning(
                        "%s round %d: %s reports %s", t.kind.value, t.round, s.group, outcome
                    )
            answered = current and t is not None and s.group in t.answered
            return self.state.completed_rounds, bool(task_id) and (not current or answered)

    def leave(self, session_id: str, group: str | None, reason: str = "") -> None:
        """End the session; the node's `reason` (free text, LeaveRequest.reason) is logged. A
        round that handed it a task it has not answered stops waiting for it."""
        checked_text("reason", reason, MAX_FREE_TEXT, printable=False)
        with self._changed:
            s = self._sessions.lookup(session_id, group)
            self._sessions.remove(session_id)
            if self._task is not None:
                self._give_up_on(self._task, s, "left")
            self._changed.notify_all()
            self._sessions.wake_polls([s])
        log.info("node %s left: %s", s.group, quoted(reason, MAX_REASON_TEXT))

    def _give_up_on(self, t: OpenTask, s: NodeSession, outcome: str) -> bool:
        """Record `outcome` as the answer of a node the round handed `t` to and still waits
        for (it left, failed or fell silent), so the round need not wait for its deadline.
        Called with the lock held; False if the node had no such open part in `t`."""
        if s.session_id not in t.selected or not self._give_up_on_group(t, s.session_id, outcome):
            return False
        s.mark_answered(t.task_id, self._open_task_id())
        return True

    def _give_up_on_group(self, t: OpenTask, session_id: str, outcome: str) -> bool:
        """`_give_up_on` for a selected session, also one that no longer exists (it expired)."""
        group = t.selected[session_id]
        if group in t.answered or group in t.folding:
            return False
        t.answered[group] = outcome
        self._changed.notify_all()
        return True

    def next_task(
        self,
        session_id: str,
        group: str | None,
        wait_s: float,
        alive: Callable[[], bool] | None = None,
    ) -> TaskSpec:
        """Long poll: the node's next task, or WAIT after `wait_s` with nothing for it.

        `alive` tells whether the caller is still connected: a node that dies while it waits
        must not be kept alive (its session refreshed) by its own abandoned poll. A session
        waits in one poll at a time: a newer poll answers an older one WAIT, so no node can hold
        more than one RPC thread by polling (a node asks again after a lost reply, too)."""
        deadline = time.monotonic() + max(0.0, min(wait_s, MAX_WAIT_S))
        with self._changed:
            s = self._sessions.lookup(session_id, group)  # the call itself shows the node is alive
            s.polls += 1
            mine = s.polls
            self._sessions.wake_polls([s])  # an older poll of this session stops waiting
            while True:
                if alive is not None and not alive():
                    return TaskSpec(TaskKind.WAIT)  # nobody is listening any more
                # waiting is no sign of life: a node cut off mid-poll must be able to expire
                s = self._sessions.lookup(session_id, group, touch=False)
                if s.polls != mine:
                    return TaskSpec(TaskKind.WAIT)  # a newer poll of this session waits now
                if self._done:
                    # the final model stays downloadable while nodes linger: nodes that
                    # personalize fetch it before they leave
                    self._told_end.add(s.group)
                    return TaskSpec(
                        TaskKind.SHUTDOWN,
                        round=self.state.completed_rounds,
                        model_version=self.model_version,
                        settings=self.settings,
                    )
                t = self._task
                if t is not None and session_id in t.selected and t.task_id not in s.answered:
                    return TaskSpec(
                        t.kind, t.task_id, t.round, t.model_version, t.deadline, self.settings
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskSpec(TaskKind.WAIT)
                # once stopping, look at `alive` every STOPPING_POLL_S: the server cancels the
                # calls after stop()'s wake-up, and a poll asleep for a whole heartbeat interval
                # held the process's exit (its thread pool is joined) for up to a minute
                slice_s = (
                    STOPPING_POLL_S if self._stop.is_set() else self.settings.heartbeat_interval_s
                )
                (s.wakeup or self._changed).wait(min(remaining, slice_s))

    def model_for(self, session_id: str, group: str | None, version: str) -> GlobalModel:
        """The current global model if `version` is current (or not given); its weights must
        not be changed. Version, round and weights are read together, so they always agree."""
        with self._lock:
            self._sessions.lookup(session_id, group)
            if version and version != self.model_version:
                raise Rejection(
                    "NOT_FOUND",
                    f"model version {quoted(version)} is not current ({self.model_version!r})",
                )
            return GlobalModel(
                self.model_version,
                self.state.completed_rounds,
                self.state.weights,
                self.model_digest,
                "" if self._task is None else self._task.task_id,
            )

    def check_update(
        self, session_id: str, group: str | None, task_id: str, round_: int, base_model_version: str
    ) -> None:
        """Early refusal of an upload that can never count (before its bytes are read)."""
        with self._lock:
            self._current_train_task(
                self._sessions.lookup(session_id, group), task_id, round_, base_model_version
            )

    def _current_train_task(
        self, s: NodeSession, task_id: str, round_: int, base_model_version: str
    ) -> OpenTask:
        if s.role != Role.TRAIN:  # the protocol: a role refusal is a status, not a reject reason
            raise Rejection(
                "PERMISSION_DENIED",
                f"{s.group} is an evaluate-only node: it may not upload updates",
            )
        t = self._task
        if t is None or t.kind != TaskKind.TRAIN or t.task_id != task_id or t.round != round_:
            self._refuse_repeat_after_close(s, TaskKind.TRAIN, task_id, round_)
            raise Rejection(
                "FAILED_PRECONDITION",
                f"stale update from {s.group}: task {quoted(task_id)} round {round_} is not the "
                "open training task",
                reason="STALE",
            )
        if s.session_id not in t.selected:
            raise Rejection(
                "FAILED_PRECONDITION", f"{s.group} is not part of round {round_}", "UNKNOWN_TASK"
            )
        outcome = t.answered.get(s.group)
        if outcome == "accepted" or s.group in t.folding:
            raise Rejection(
                "ALREADY_EXISTS",
                f"{s.group} already sent its update for round {round_}; this copy is ignored",
                reason="DUPLICATE",
            )
        if outcome is not None:
            raise Rejection(
                "FAILED_PRECONDITION",
                f"{s.group}'s update for round {round_} was already refused ({outcome})",
                reason="ALREADY_REJECTED",
            )
        if time.monotonic() > t.deadline:
            raise Rejection(
                "DEADLINE_EXCEEDED",
                f"round {round_} closed before the update from {s.group}",
                "STALE",
            )
        if base_model_version != t.model_version:
            # trained from another model than the round's: averaging it in would mix versions
            raise Rejection(
                "FAILED_PRECONDITION",
                f"update from {s.group} for round {round_} starts from model version "
                f"{quoted(base_model_version)}, not the round's {t.model_version!r}",
                reason="STALE",
            )
        return t

    def transfer_deadline(self) -> float:
        """Until when (time.monotonic() seconds) a model download or an update upload is of use: the open
        task's deadline, or a round's length from now when none is open (the final model)."""
        with self._changed:
            if self._task is not None:
                return self._task.deadline
        return time.monotonic() + max(self.settings.round_timeout_s, self.settings.eval_timeout_s)

    def open_task_id(self, session_id: str) -> str | None:
        """The open task's id ("" when none is open) while `session_id` is live; None once it
        left, was replaced or fell silent past session_timeout_s. The transport cancels a
        transfer when this stops matching what it started with: no session can answer for it
        any more, or its task closed. Does not touch the session: a stream is no sign of life."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or time.monotonic() - s.last_seen > self.settings.session_timeout_s:
                return None
            return "" if self._task is None else self._task.task_id

    def accept_update(
        self,
        session_id: str,
        group: str | None,
        task_id: str,
        round_: int,
        num_examples: int,
        metrics: Mapping[str, float],
        replay: Callable[[], Iterator[TensorSlice]],
        nbytes: int,
        base_model_version: str,
    ) -> None:
        """Fold a whole, validated update into the round's running sum (or refuse it).

        The checks run under the engine lock; the replay and fold (a pass over the whole update,
        ~0.1 s per 100 MB) run outside it, so heartbeats, task polls and other uploads' checks
        do not wait for them. The update is claimed first (`folding`): a copy sent meanwhile is
        a duplicate, and the round does not close until the fold is over.
        """
        with self._changed:
            s = self._sessions.lookup(session_id, group)
            t = self._current_train_task(s, task_id, round_, base_model_version)
            try:
                if not 1 <= num_examples <= s.num_examples:
                    # the weight a node asks for must be the one it joined with
                    raise Rejection(
                        "INVALID_ARGUMENT",
                        f"update from {s.group} claims {num_examples} examples; it joined with "
                        f"{s.num_examples}",
                        reason="MALFORMED",
                    )
                node_metrics = checked_update_metrics(s.group, metrics)
                weight = self._update_weight(s.group, num_examples, node_metrics)
            except Rejection as refused:
                # final, as the transport's refusals of bad values: the round need not wait
                s.mark_answered(task_id, self._open_task_id())
                t.answered[s.group] = f"rejected: {refused.message}"
                self._changed.notify_all()
                raise
            s.mark_answered(task_id, self._open_task_id())
            t.folding.add(s.group)
        outcome = "accepted"
        try:
            self._fold(t, s.group, replay, weight)
        except Rejection as refused:
            norm = refused.reason == "NORM_BOUND"
            outcome = "rejected: norm bound" if norm else f"rejected: {refused.message}"
            raise
        except Exception as err:  # the spool's disk, or a sum an earlier fold broke
            outcome = f"rejected: the update could not be folded ({err})"
            raise Rejection(
                "INTERNAL", f"the coordinator could not fold the update: {err}", "INTERNAL"
            ) from err
        finally:
            with self._changed:
                t.folding.discard(s.group)
                t.answered[s.group] = outcome
                if outcome == "accepted":
                    t.bytes_in += nbytes
                    t.node_metrics[s.group] = node_metrics
                    t.weights[s.group] = weight
                self._changed.notify_all()
        # one a node a round: -v shows them; the round's line counts them
        log.debug("round %d: update from %s accepted (%d examples)", round_, s.group, num_examples)

    def _fold(
        self,
        t: OpenTask,
        group: str,
        replay: Callable[[], Iterator[TensorSlice]],
        weight: float,
    ) -> None:
        """The norm bound's check, then the fold; called without the engine lock (the weights
        it reads are replaced only when the round closes, after every fold is over)."""
        if self.settings.norm_bound is not None:
            norm = streaming_update_norm(replay(), self.state.weights)
            if norm > self.settings.norm_bound:
                raise Rejection(
                    "INVALID_ARGUMENT",
                    f"update from {group} moves the model by {norm:.4g} (L2), beyond the "
                    f"bound {self.settings.norm_bound:.4g}",
                    reason="NORM_BOUND",
                )
        assert t.aggregate is not None
        t.aggregate.fold_update(replay(), weight)

    def _update_weight(self, group: str, num_examples: int, metrics: Mapping[str, float]) -> float:
        """The update's averaging weight: its examples (or 1 when weighting is uniform), times
        (1 - alignment_before) ** fairness_q when the aggregation is fairness-aware."""
        st = self.settings
        base = 1.0 if st.weighting == "uniform" else float(num_examples)
        if st.fairness_q == 0:
            return base
        before = metrics.get(ALIGNMENT_BEFORE)
        try:
            if before is None:
                raise InputError("the update does not send it")
            return fairness_weight(base, before, st.fairness_q)
        except InputError as err:
            raise Rejection(
                "INVALID_ARGUMENT",
                f"update from {group}: fairness_q = {st.fairness_q:g} needs the metric "
                f"{ALIGNMENT_BEFORE!r}: {err}",
                reason="MALFORMED",
            ) from None

    def note_rejected_update(
        self, session_id: str, group: str | None, task_id: str, reason: str, final: bool
    ) -> None:
        """Record an upload the transport's checks refused. A `final` refusal (bad values, wrong
        shapes, bad digest) drops the node from this round so the round need not wait for it; a
        broken-off stream is not final, since the node may send its update again."""
        with self._changed:
            s = self._sessions.get(session_id)
            t = self._task
            if (
                s is None
                or t is None
                or t.task_id != task_id
                or s.group in t.answered
                or s.group in t.folding
            ):
                return
            reason = clipped(reason)  # it may quote what the node sent
            # a broken-off stream is not final, so a node may repeat it: a line a minute; a final
            # rejection comes once per round and node, and its reason is always told
            more = "" if final else self._rejection_lines.admit(s.group)
            if more is not None:
                log.warning(
                    "round %d: update from %s rejected: %s%s", t.round, s.group, reason, more
                )
            if final:
                t.answered[s.group] = f"rejected: {reason}"
                s.mark_answered(task_id, self._open_task_id())
                self._changed.notify_all()

    def accept_evaluation(
        self,
        session_id: str,
        group: str | None,
        task_id: str,
        round_: int,
        evaluation: GroupEvaluation,
        model_version: str,
    ) -> None:
        """Record a node's report for the open EVALUATE task: its own group, once, in time, and
        of the model version the task named (a report on another model would be mixed in)."""
        with self._changed:
            s = self._sessions.lookup(session_id, group)
            t = self._evaluation_task(s, task_id, round_, model_version)
            if evaluation.group != s.group:
                raise Rejection(
                    "PERMISSION_DENIED",
                    f"{s.group} may report only its own group, not {quoted(evaluation.group)}",
                )
            t.evaluations[s.group] = (s.role, evaluation)
            t.answered[s.group] = "evaluated"
            s.mark_answered(task_id, self._open_task_id())
            self._changed.notify_all()

    def check_session(self, session_id: str, group: str | None) -> None:
        """Rejection (UNAUTHENTICATED, PERMISSION_DENIED) unless `session_id` is the caller's
        live session; marks nothing seen."""
        with self._lock:
            self._sessions.lookup(session_id, group, touch=False)

    def check_evaluation(
        self, session_id: str, group: str | None, task_id: str, round_: int, model_version: str
    ) -> None:
        """Early refusal of a report that can never count, before its figures are checked: a
        stale, repeated or late report is told so whatever its figures (the protocol's order)."""
        with self._lock:
            s = self._sessions.lookup(session_id, group)
            self._evaluation_task(s, task_id, round_, model_version)

    def _evaluation_task(
        self, s: NodeSession, task_id: str, round_: int, model_version: str
    ) -> OpenTask:
        """The open EVALUATE task a report of `s` for `task_id` may still answer."""
        t = self._open_evaluation(s, task_id, round_)
        if s.group in t.evaluations:
            raise Rejection("ALREADY_EXISTS", f"{s.group} already reported this evaluation")
        if s.group in t.answered:  # its report was refused: one report decides a round
            raise Rejection(
                "FAILED_PRECONDITION",
                f"{s.group}'s evaluation for round {round_} was already refused "
                f"({t.answered[s.group]})",
            )
        if model_version != t.model_version:
            raise Rejection(
                "FAILED_PRECONDITION",
                f"evaluation from {s.group} is of model version {quoted(model_version)}, not "
                f"the task's {t.model_version!r}",
            )
        if time.monotonic() > t.deadline:
            raise Rejection(
                "DEADLINE_EXCEEDED",
                f"evaluation round {round_} closed before {s.group}'s report",
            )
        return t

    def _open_evaluation(self, s: NodeSession, task_id: str, round_: int) -> OpenTask:
        """The open EVALUATE task if `task_id` and `round_` name it and `s` was asked."""
        t = self._task
        if t is None or t.kind != TaskKind.EVALUATE or t.task_id != task_id or t.round != round_:
            self._refuse_repeat_after_close(s, TaskKind.EVALUATE, task_id, round_)
            raise Rejection(
                "FAILED_PRECONDITION", f"evaluation for task {quoted(task_id)} is not the open one"
            )
        if s.session_id not in t.selected:
            raise Rejection("FAILED_PRECONDITION", f"{s.group} was not asked to evaluate")
        return t

    def note_rejected_evaluation(
        self, session_id: str, group: str | None, task_id: str, round_: int, reason: str
    ) -> None:
        """Record an evaluation report refused for its values (malformed, out of range): final,
        as for a refused update, so the round does not wait for the node until its deadline.
        Session refusals (UNAUTHENTICATED, PERMISSION_DENIED) are raised as for any call; a report
        for a task that is not open changes nothing."""
        with self._changed:
            s = self._sessions.lookup(session_id, group)
            try:
                t = self._open_evaluation(s, task_id, round_)
            except Rejection:
                return
            if s.group in t.answered:
                return
            reason = clipped(reason)
            log.warning("evaluation round %d: report from %s refused: %s", t.round, s.group, reason)
            t.answered[s.group] = f"rejected: {reason}"
            s.mark_answered(task_id, self._open_task_id())
            self._changed.notify_all()

    def _refuse_repeat_after_close(
        self, s: NodeSession, kind: TaskKind, task_id: str, round_: int
    ) -> None:
        """For an answer to the round closed last: the refusal that says what became of the
        group's first answer (counted, refused) or that the round closed before any came."""
        closed = self._closed
        if closed is None or not closed.is_task(kind, task_id, round_):
            return
        outcome = closed.answered.get(s.group)
        if kind == TaskKind.TRAIN:
            if outcome == "accepted" or s.group in closed.folding:
                raise Rejection(
                    "ALREADY_EXISTS",
                    f"{s.group}'s update for round {round_} was accepted; this copy is ignored",
                    reason="DUPLICATE",
                )
            if outcome is not None and outcome.startswith("rejected"):
                raise Rejection(
                    "FAILED_PRECONDITION",
                    f"{s.group}'s update for round {round_} was already refused ({outcome})",
                    reason="ALREADY_REJECTED",
                )
            raise Rejection(
                "DEADLINE_EXCEEDED",
                f"round {round_} closed before the update from {s.group}",
                "STALE",
            )
        if outcome == "evaluated":
            raise Rejection("ALREADY_EXISTS", f"{s.group} already reported this evaluation")
        if outcome is not None and outcome.startswith("rejected"):
            raise Rejection(
                "FAILED_PRECONDITION",
                f"{s.group}'s evaluation for round {round_} was already refused ({outcome})",
            )
        raise Rejection(
            "DEADLINE_EXCEEDED", f"evaluation round {round_} closed before {s.group}'s report"
        )

    def _open_task_id(self) -> str | None:
        return self._task.task_id if self._task is not None else None
