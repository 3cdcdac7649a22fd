"""coordinator/sessions.py: the table of node sessions on its own, with a clock the test sets:
when a session expires, what looking one up does to it, and which sessions a Join replaces."""

from __future__ import annotations

import threading

import pytest

import coordinator.sessions as sessions_module
from coordinator.sessions import NodeSession, Role, SessionTable
from coordinator.settings import RoundSettings
from coordinator.validation import Rejection

TIMEOUT = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(sessions_module.time, "monotonic", made)
    return made


class Changed(threading.Condition):
    """The engine's condition, counting its notify_all calls."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__(lock)
        self.notified = 0

    def notify_all(self) -> None:
        self.notified += 1
        super().notify_all()


def table() -> tuple[SessionTable, threading.RLock, Changed]:
    lock = threading.RLock()
    changed = Changed(lock)
    return SessionTable(RoundSettings(session_timeout_s=TIMEOUT), lock, changed), lock, changed


def join(t: SessionTable, clock: Clock, group: str, role: Role = Role.TRAIN) -> NodeSession:
    return t.open(group, role, 10, "1.0", f"peer-{group}", clock.now)[0]


def test_a_session_lives_for_exactly_session_timeout_s_after_it_was_last_seen(
    clock: Clock,
) -> None:
    t, lock, changed = table()
    with lock:
        s = join(t, clock, "A")
        clock.now += TIMEOUT  # silent for exactly the timeout: still alive
        assert t.live() == [s]
        assert t.lookup(s.session_id, "A", touch=False) is s
        clock.now += 0.5
        assert t.live() == []
        assert t.get(s.session_id) is s and changed.notified == 0  # not removed until looked up
        with pytest.raises(Rejection, match="unknown or expired session") as err:
            t.lookup(s.session_id, "A")
        assert err.value.code == "UNAUTHENTICATED"
        assert s.session_id not in t and list(t.values()) == []
        assert changed.notified == 1  # the engine is told a session ended


def test_a_lookup_marks_the_session_seen_only_when_asked(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        s = join(t, clock, "A")
        clock.now += 40
        t.lookup(s.session_id, "A", touch=False)
        assert s.last_seen == 1000.0
        t.lookup(s.session_id, None)
        assert s.last_seen == 1040.0
        clock.now += 40  # 80 s after it joined, 40 s after it was last seen
        assert t.lookup(s.session_id, "A") is s and t.live() == [s]


def test_a_session_is_only_its_own_groups(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        s = join(t, clock, "A")
        with pytest.raises(Rejection, match="belongs to 'A', not 'B'") as err:
            t.lookup(s.session_id, "B")
        assert err.value.code == "PERMISSION_DENIED"


def test_a_join_replaces_every_session_of_its_group_whatever_its_role(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        a = join(t, clock, "A", Role.TRAIN)
        b = join(t, clock, "B", Role.EVALUATE_ONLY)
        again, replaced = t.open("A", Role.EVALUATE_ONLY, 5, "1.1", "peer-2", clock.now)
        assert replaced == [a] and a.session_id not in t
        assert {s.session_id for s in t.values()} == {b.session_id, again.session_id}
        assert t.live(Role.EVALUATE_ONLY) == [b, again] and t.live(Role.TRAIN) == []
        with pytest.raises(Rejection, match="with this node's certificate"):
            t.lookup(a.session_id, "A")
