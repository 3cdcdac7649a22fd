"""coordinator/sessions.py: the table of node sessions on its own, with a clock the test sets:
when a session expires, what looking one up does to it, and which sessions a Join replaces."""

from __future__ import annotations

import threading
from types import SimpleNamespace

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
    """The sessions module's clock only: time.monotonic itself is left to every other thread."""
    made = Clock()
    monkeypatch.setattr(sessions_module, "time", SimpleNamespace(monotonic=made))
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


def test_a_replaced_sessions_call_is_told_how_long_ago_and_from_where(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        a = join(t, clock, "A")
        clock.now += 10
        b = join(t, clock, "A")  # from peer-A, at 1010
        clock.now += 30
        with pytest.raises(Rejection, match=r"certificate 30 s ago \(from peer-A\): if") as err:
            t.lookup(a.session_id, "A")
        assert err.value.code == "UNAUTHENTICATED"
        t.remove(b.session_id)
        with pytest.raises(Rejection, match=r"certificate 30 s ago \(from peer-A\) that has"):
            t.lookup(a.session_id, "A")


def test_only_the_latest_replaced_sessions_are_remembered(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "MAX_REPLACED_SESSIONS", 2)
    t, lock, _ = table()
    with lock:
        ids = [join(t, clock, "A").session_id for _ in range(4)]  # 3 replaced, the last live
        with pytest.raises(Rejection, match="unknown or expired session"):
            t.lookup(ids[0], "A")  # the oldest is forgotten
        for old in ids[1:3]:
            with pytest.raises(Rejection, match="with this node's certificate"):
                t.lookup(old, "A")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "two processes" in r.getMessage()]


def _replace(t: SessionTable, clock: Clock, silent: float, times: int, apart: float) -> None:
    """`times` Joins of group A, `apart` s from each other, each replacing a session last seen
    `silent` s before."""
    s = join(t, clock, "A")
    for _ in range(times):
        clock.now += apart
        s.last_seen = clock.now - silent
        s = join(t, clock, "A")


def test_replacements_of_a_session_seen_within_two_heartbeats_are_warned_about(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Heartbeats every 5 s (the default): a session seen 8 s before its replacement is a live
    process's, one seen 11 s before is a dead one's."""
    t, lock, _ = table()
    with lock:
        _replace(t, clock, silent=11, times=4, apart=20)
        assert _warnings(caplog) == []
        _replace(t, clock, silent=8, times=3, apart=20)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "node A joined again 3 times in 40 s" in warnings[0], warnings


def test_replacements_further_apart_than_the_window_are_not_warned_about(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    t, lock, _ = table()
    with lock:
        _replace(t, clock, silent=1, times=4, apart=sessions_module.REPLACEMENT_WINDOW_S / 2 + 1)
    assert _warnings(caplog) == []


def test_a_replacement_exactly_the_window_ago_no_longer_counts(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The window is REPLACEMENT_WINDOW_S back from a replacement, its far end left out (as the
    node counts its own replacements): 3 replacements half a window apart are 2 in a window."""
    window = sessions_module.REPLACEMENT_WINDOW_S
    t, lock, _ = table()
    with lock:
        _replace(t, clock, silent=1, times=3, apart=window / 2)
    assert _warnings(caplog) == []
    t, lock, _ = table()
    with lock:
        _replace(t, clock, silent=1, times=3, apart=window / 2 - 1)
    assert len(_warnings(caplog)) == 1


def test_a_session_keeps_only_the_answers_that_can_still_be_looked_up(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        s = join(t, clock, "A")
    s.mark_answered("t1", None)
    s.mark_answered("t2", "t1")  # t1 is still the open task
    assert s.answered == {"t1", "t2"}
    s.mark_answered("t3", "t3")
    assert s.answered == {"t3"}


def test_the_poll_of_a_replaced_or_expired_session_is_woken_alone(clock: Clock) -> None:
    t, lock, _ = table()
    with lock:
        a, b = join(t, clock, "A"), join(t, clock, "B")
        a.wakeup, b.wakeup = Changed(lock), Changed(lock)
        join(t, clock, "A")
        assert (a.wakeup.notified, b.wakeup.notified) == (1, 0)
        clock.now += TIMEOUT + 1
        with pytest.raises(Rejection):
            t.lookup(b.session_id, "B")
        assert (a.wakeup.notified, b.wakeup.notified) == (1, 1)


def test_a_join_that_replaces_no_session_wakes_no_poll(clock: Clock) -> None:
    """The first Join of a group replaces nothing: no node's poll is woken by it (with 200
    nodes joining, each woke every waiting poll)."""
    t, lock, _ = table()
    with lock:
        a = join(t, clock, "A")
        a.wakeup = Changed(lock)
        join(t, clock, "B")
        t.wake_polls([])
        assert a.wakeup.notified == 0
        t.wake_polls()
        assert a.wakeup.notified == 1  # no sessions named: every session's


def test_every_node_of_a_federation_restarted_at_once_is_told_it_was_replaced(
    clock: Clock,
) -> None:
    """After a network blip all nodes join again together: each old session's next call must
    say it was replaced by a Join with its certificate (which a node acts on), not "unknown or
    expired". The table remembers thousands of replaced sessions, not just the latest few."""
    t, lock, _ = table()
    with lock:
        old = [join(t, clock, f"G{i}") for i in range(200)]
        for s in old:
            join(t, clock, s.group)
        for s in old:
            with pytest.raises(Rejection, match="with this node's certificate") as err:
                t.lookup(s.session_id, s.group)
            assert err.value.code == "UNAUTHENTICATED"
