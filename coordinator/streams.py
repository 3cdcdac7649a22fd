"""The coordinator's bookkeeping of its bulk streams (uploads being read, downloads being
sent): how many run at once (`StreamSlots`), which are cut because their session or task ended
(`StaleTransfers`), and one upload and one download per node at a time (`NodeStreams`).

It is apart from the servicer (`coordinator.server`), which turns messages into engine calls,
because it is the coordinator's most intricate concurrency: streams wait for slots, replace each
other and are cancelled from other threads. Here it can be read on its own and tested with plain
fakes, without a server: of a gRPC call it uses only `cancel()` and `is_active()` (`Call`), and
of the engine only `has_session` (`Sessions`) and, in `StaleTransfers`, `open_task_id`
(`OpenTasks`). It imports neither gRPC nor the engine.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

# the servicer's logger: these lines are the transport's, as when this lived in server.py
log = logging.getLogger("pluralfed.coordinator")


class Call(Protocol):
    """What the bookkeeping uses of a stream's gRPC call (a `grpc.ServicerContext`)."""

    def cancel(self) -> object:
        """End the call: its pending read (or send) fails at once."""
        ...

    def is_active(self) -> bool:
        """Whether the call still runs (False once the peer left or it was cancelled)."""
        ...


class Sessions(Protocol):
    """What `NodeStreams` asks the engine (`RoundEngine`)."""

    def has_session(self, session_id: str) -> bool:
        """Whether `session_id` is a session the engine still knows (not yet replaced)."""
        ...


class OpenTasks(Protocol):
    """What `StaleTransfers` asks the engine (`RoundEngine`)."""

    def open_task_id(self, session_id: str) -> str | None:
        """The open task's id ("" when none) while `session_id` is live; None once it ended."""
        ...


class StreamSlots:
    """At most `limit` bulk streams (uploads being read, or downloads being sent) at once; the
    others wait, first come first served.

    Each upload being read holds a few chunk-sized buffers (gRPC's receive window, the message
    being assembled, its Python bytes), and each download a chunk serialized for it and gRPC's
    copy; the bound keeps that part of the coordinator's memory independent of the number of
    nodes. A waiting upload's bytes stay at the node (HTTP/2 flow control); the coordinator
    reads the admitted ones at the same total rate, and uploads finish batch by batch instead
    of all at the end, so more are whole by a round's deadline. Waiting does not extend the
    deadline: an upload admitted after its round closed is refused STALE before it is read.
    limit <= 0: no bound.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active = 0
        self._waiting: deque[threading.Event] = deque()
        self.peak = 0  # most streams ever run at once (for tests and diagnostics)

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(self, alive: Callable[[], bool], poll_s: float = 0.25) -> bool:
        """Wait for a slot while `alive()` (the RPC is still active); False if it died waiting."""
        if self.limit <= 0:
            return True
        with self._lock:
            if self._active < self.limit and not self._waiting:
                self._take()
                return True
            turn = threading.Event()
            self._waiting.append(turn)
        while not turn.wait(poll_s):
            if alive():
                continue
            with self._lock:
                if not turn.is_set():  # still queued: leave the queue, no slot taken
                    self._waiting.remove(turn)
                    return False
            self.release()  # the slot was handed over just now: pass it on
            return False
        return True

    def _take(self) -> None:
        self._active += 1
        self.peak = max(self.peak, self._active)

    def release(self) -> None:
        """Give the slot back: straight to the longest-waiting upload, if any."""
        if self.limit <= 0:
            return
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot changes hands; _active stays
            else:
                self._active -= 1


# how often running transfers are checked for a session that ended or a task that closed
STALE_CHECK_S = 0.25


class StaleTransfers:
    """Cancels a running upload or download (or one waiting for its slot) once it can no longer
    be of use: its session left, was replaced or expired, or the task it was for closed.

    The deadline watch alone (`StreamDeadlines`) cut a stalled stream only at the deadline
    fixed when it started: a node cut off without a TCP reset (a partition, a NAT dropping its
    packets) held its slot up to a round's length into later rounds, and healthy uploads queued
    behind it. Checked from one thread every `poll_s`, so a slot is free within about that long.
    """

    def __init__(self, engine: OpenTasks, poll_s: float = STALE_CHECK_S) -> None:
        self.engine = engine
        self.poll_s = poll_s
        self._cond = threading.Condition()
        # token -> (call, session id, task id it started with, what it is, for the log)
        self._watched: dict[int, tuple[Call, str, str, str]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self.cancelled = 0  # transfers cut so far (for tests and diagnostics)

    @contextlib.contextmanager
    def watch(
        self, context: Call, session_id: str, task_id: str, what: str
    ) -> Iterator[Callable[[], None]]:
        """Cancel `context`'s RPC once `engine.open_task_id(session_id)` is no longer `task_id`
        ("": no task, e.g. the final model's download). Yields a function that ends the watch
        early: an upload whose bytes are all in may still count, so it is not cut while the
        engine takes it."""
        token = next(self._tokens)
        with self._cond:
            self._watched[token] = (context, session_id, task_id, what)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stale-transfers", daemon=True
                )
                self._thread.start()
            self._cond.notify()

        def unwatch() -> None:
            with self._cond:
                self._watched.pop(token, None)

        try:
            yield unwatch
        finally:
            unwatch()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._watched:
                    self._cond.wait()
                watched = list(self._watched.items())
            for token, (context, session_id, task_id, what) in watched:
                try:
                    now = self.engine.open_task_id(session_id)
                except Exception:  # a bug must not end the watch of every later stream
                    log.exception("cannot tell whether the %s is still of use", what)
                    continue
                if now == task_id:
                    continue
                why = "its session ended or expired" if now is None else "its round closed"
                with self._cond:  # not if it ended meanwhile (an upload being taken)
                    if self._watched.pop(token, None) is None:
                        continue
                    self.cancelled += 1
                    try:  # an error must not end the watch of every later stream either
                        context.cancel()  # its read (or send) fails at once: the slot is freed
                    except Exception:
                        log.exception("cannot cancel the %s", what)
                        continue
                log.warning("%s cancelled: %s", what, why)
            time.sleep(self.poll_s)


@dataclass(eq=False)
class RunningStream:
    """A running upload or download of one node (see `NodeStreams.one_per_node`)."""

    session_id: str
    context: Call
    # every byte of the upload is in: from here on its outcome (counted, refused, not stored) is
    # the engine's, and a newer copy waits for it instead of replacing it
    received: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


class NodeStreams:
    """The running upload and download of each node: one of each per node at a time, so no one
    node can take every slot (in insecure mode, where no node is proven, per session). Keyed by
    (kind, node); the servicer owns one."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self._running: dict[tuple[str, str], RunningStream] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def one_per_node(
        self, kind: str, caller: str | None, session_id: str, context: Call
    ) -> Iterator[RunningStream | None]:
        """This stream's entry if it may run (None: it may not), keeping one `kind` stream per
        node. A newer stream replaces the node's running one, which is cancelled:
        - of an earlier session (the node joined again), so old streams do not hold slots (one
          node re-joining could otherwise hold every slot);
        - of the same session, unless every byte of that upload is in: a node that gave up on a
          stream the coordinator has not seen end (a half-open connection) sends it again, and
          must not be told DUPLICATE, which is final, for a copy that never arrives. Once the
          older upload's bytes are in, this one waits for its outcome (the engine then says
          DUPLICATE if it counted, and takes this copy if it was not stored).
        A stream of a session already replaced never cancels its newer one's (None)."""
        key = (kind, caller or session_id)
        mine = self._claim(key, session_id, context)
        try:
            yield mine
        finally:
            if mine is not None:
                with self._lock:
                    if self._running.get(key) is mine:
                        del self._running[key]
                mine.ended.set()

    def _claim(self, key: tuple[str, str], session_id: str, context: Call) -> RunningStream | None:
        while True:
            with self._lock:
                running = self._running.get(key)
                if running is not None and running.session_id == session_id and running.received:
                    take = False
                elif running is not None and running.session_id != session_id:
                    take = self.sessions.has_session(session_id)
                    if not take:
                        return None
                else:
                    take = True
                if take:
                    mine = RunningStream(session_id, context)
                    self._running[key] = mine
            if take:
                break
            assert running is not None
            # the older upload's bytes are in: wait for its outcome, then look again
            while not running.ended.wait(STALE_CHECK_S):
                if not context.is_active():
                    return None
        if running is not None:
            why = (
                "a newer stream of the same session replaces it"
                if running.session_id == session_id
                else "the node joined again, a stream of its new session replaces it"
            )
            log.info("%s of %s cancelled: %s", key[0], key[1], why)
            running.context.cancel()
        return mine

    def received(self, key: tuple[str, str], mine: RunningStream) -> bool:
        """Mark `mine` upload's bytes all in; False if a newer stream replaced it already."""
        with self._lock:
            if self._running.get(key) is not mine:
                return False
            mine.received = True
            return True
