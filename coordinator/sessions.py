"""The coordinator's node sessions: which nodes are connected, as what, since when.

A node joins (`SessionTable.open`), and every call it makes afterwards names its session and
shows it is alive (`SessionTable.lookup` marks it seen; heartbeats keep an idle node's session
alive). A session ends when its node leaves, when it is silent for longer than
session_timeout_s (it is expired the next time it is looked up, and `live` leaves it out at
once), or when a newer Join of the same group replaces it (a restarted node). Replaced sessions
are remembered for a while, so their calls are told why they are refused, and a group whose
sessions keep replacing each other (two processes with one node's certificate) is warned about.

This is the session half of the round engine, apart from the rounds: what a session's calls
do to the open round is node_calls.py's (`NodeCalls`, which `RoundEngine` in rounds.py
inherits); this file only keeps the table of sessions.

Locking: a `SessionTable` never takes a lock itself. Every method must be called with the
engine's lock held (`RoundEngine._lock`, an RLock; `RoundEngine._changed` is its condition). The
table is handed both so that it can notify `changed` when a session ends, and so that each
session's long-poll condition (`NodeSession.wakeup`) is made on that same lock: a poll waiting on
it releases the engine's lock, exactly as a wait on `changed` does.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.settings import RoundSettings
from coordinator.validation import Rejection
from pluralfed.errors import quoted
from pluralfed.logthrottle import LogThrottle
from pluralfed.protocol import (
    REPLACED_SESSION_MARK,
    REPLACEMENT_WINDOW_S,
    REPLACEMENTS_PER_WINDOW,
)

log = logging.getLogger("pluralfed.coordinator")

MAX_REPLACED_SESSIONS = 4096  # replaced session ids remembered, to tell their calls why


class Role(StrEnum):
    TRAIN = "train"
    EVALUATE_ONLY = "evaluate-only"


@dataclass
class NodeSession:
    session_id: str
    group: str
    role: Role
    num_examples: int
    software_version: str
    joined_at: float
    last_seen: float
    answered: set[str] = field(default_factory=set)  # task ids this session has answered
    polls: int = 0  # GetTask calls so far: a newer one ends the wait of an older one
    peer: str = ""  # the transport's name for where the node called from, for the logs
    # what its long poll waits on (on the engine's lock): woken alone by what concerns it, a
    # poll no longer wakes every other node's (with 200 nodes 6 ms of CPU a poll)
    wakeup: threading.Condition | None = field(default=None, repr=False, compare=False)

    def mark_answered(self, task_id: str, open_task_id: str | None) -> None:
        """Only the open task's answer is ever looked up, so older ids go: a session may live
        for the whole run, and kept one id per round it answered (soak review)."""
        self.answered = {i for i in self.answered if i == open_task_id}
        self.answered.add(task_id)


@dataclass(frozen=True)
class ReplacedSession:
    """A session a newer Join of the same group replaced: its calls are told so, not just
    "unknown", since two processes running as one node replace each other in a loop."""

    at: float  # time.monotonic() of the replacement
    by_peer: str  # where the replacing Join came from
    by_session: str  # the session that replaced it


class SessionTable:
    """The federation's node sessions by id, and the memory of replaced ones. Not thread-safe
    on its own: call it with the engine's lock held (see the module's docstring)."""

    def __init__(
        self, settings: RoundSettings, lock: threading.RLock, changed: threading.Condition
    ) -> None:
        self.settings = settings
        self._lock = lock  # the engine's: each session's `wakeup` is made on it
        self._changed = changed  # the engine's condition on that lock, notified when one ends
        self._sessions: dict[str, NodeSession] = {}
        # sessions replaced by a newer Join of their group (oldest first), and when each group's
        # were replaced lately: two processes with one certificate replace each other in a loop
        self._replaced: OrderedDict[str, ReplacedSession] = OrderedDict()
        self._replacements: dict[str, list[float]] = {}
        self._replacement_lines = LogThrottle()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> NodeSession | None:
        """The session if the table has it, expired or not; no checks, and not marked seen."""
        return self._sessions.get(session_id)

    def values(self) -> Iterator[NodeSession]:
        """Every session the table has, expired ones too (see `live`)."""
        return iter(self._sessions.values())

    def live(self, role: Role | None = None) -> list[NodeSession]:
        """The sessions seen within session_timeout_s (of `role`, if given)."""
        now = time.monotonic()
        return [
            s
            for s in self._sessions.values()
            if now - s.last_seen <= self.settings.session_timeout_s
            and (role is None or s.role == role)
        ]

    def lookup(self, session_id: str, group: str | None, touch: bool = True) -> NodeSession:
        """The caller's session; `touch` marks it seen. An expired one is gone: join again."""
        s = self._sessions.get(session_id)
        now = time.monotonic()
        if s is not None and now - s.last_seen > self.settings.session_timeout_s:
            del self._sessions[session_id]
            self._changed.notify_all()
            self.wake_polls([s])
            log.warning("session of %s expired (silent for %.0f s)", s.group, now - s.last_seen)
            s = None
        if s is None:
            replaced = self._replaced.get(session_id)
            if replaced is not None and replaced.by_session in self._sessions:
                raise Rejection(
                    "UNAUTHENTICATED",
                    f"session {quoted(session_id)} {REPLACED_SESSION_MARK} with this node's "
                    f"certificate {now - replaced.at:.0f} s ago (from {replaced.by_peer or '?'}): "
                    "if this node did not restart, another process runs as this node; join again",
                )
            if replaced is not None:  # e.g. an older `node check`'s join, which left at once
                raise Rejection(
                    "UNAUTHENTICATED",
                    f"session {quoted(session_id)} was taken over by a Join with this node's "
                    f"certificate {now - replaced.at:.0f} s ago (from {replaced.by_peer or '?'}) "
                    "that has ended since: join again",
                )
            raise Rejection(
                "UNAUTHENTICATED",
                f"unknown or expired session {quoted(session_id)}: join again",
            )
        if group is not None and s.group != group:
            raise Rejection(
                "PERMISSION_DENIED", f"session {session_id!r} belongs to {s.group!r}, not {group!r}"
            )
        if touch:
            s.last_seen = now
        return s

    def open(
        self,
        group: str,
        role: Role,
        num_examples: int,
        software_version: str,
        peer: str,
        now: float,
    ) -> tuple[NodeSession, list[NodeSession]]:
        """A new session for a node of `group` that joined (checked by the engine), and the
        sessions of that group it replaced (their polls are woken; their calls are told that
        they were replaced). What the replaced ones meant to the open round is the engine's."""
        replaced = [old for old in self._sessions.values() if old.group == group]
        session_id = uuid.uuid4().hex
        for old in replaced:  # a restarted node replaces its old session
            del self._sessions[old.session_id]
            self._note_replaced(old, session_id, peer, now)
        self.wake_polls(replaced)  # an old session's poll ends
        session = NodeSession(
            session_id=session_id,
            group=group,
            role=role,
            num_examples=num_examples,
            software_version=software_version,
            joined_at=now,
            last_seen=now,
            peer=peer,
            wakeup=threading.Condition(self._lock),
        )
        self._sessions[session.session_id] = session
        return session, replaced

    def remove(self, session_id: str) -> None:
        """End a session (its node left); the caller wakes its poll and the engine."""
        del self._sessions[session_id]

    def _note_replaced(self, old: NodeSession, by_session: str, peer: str, now: float) -> None:
        """Remember `old` as replaced (its calls are told so), and warn when a group's live
        sessions keep replacing each other: a node restarts now and then, not every few seconds
        (a dead process's session, silent for a while, does not count)."""
        self._replaced[old.session_id] = ReplacedSession(now, peer, by_session)
        while len(self._replaced) > MAX_REPLACED_SESSIONS:
            self._replaced.popitem(last=False)
        if now - old.last_seen > 2 * self.settings.heartbeat_interval_s:
            return
        times = [t for t in self._replacements.get(old.group, []) if now - t < REPLACEMENT_WINDOW_S]
        self._replacements[old.group] = [*times, now]
        if len(times) + 1 >= REPLACEMENTS_PER_WINDOW:
            more = self._replacement_lines.admit(old.group)
            if more is not None:
                log.warning(
                    "node %s joined again %d times in %.0f s, the latest from %s while its "
                    "session from %s was seen %.0f s before: are two processes running with "
                    "this node's certificate (or does it restart again and again)?%s",
                    old.group,
                    len(times) + 1,
                    now - (times[0] if times else now),
                    peer or "?",
                    old.peer or "?",
                    now - old.last_seen,
                    more,
                )

    def wake_polls(self, sessions: Iterable[NodeSession] | None = None) -> None:
        """Wake the long polls of `sessions` (default: every session's), with the lock held:
        each waits on its own session's condition, woken only by what concerns it."""
        for s in self._sessions.values() if sessions is None else sessions:
            if s.wakeup is not None:
                s.wakeup.notify_all()
