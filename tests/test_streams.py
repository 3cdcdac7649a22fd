"""One upload and one download per node at a time (`coordinator.streams.NodeStreams`), alone,
with fakes for the call and the engine: a stream of a new session replaces the earlier
session's; a newer stream of the same session replaces one whose bytes are not all in, and waits
for the outcome of one whose bytes are; a stream of a session already replaced gets nothing and
leaves its newer one alone; a stream gives up its place when it ends, never its replacement's.

Each stream holds `one_per_node` in a thread of its own, as a handler does while it runs, so a
claim that waits (rightly or through a bug) fails a test instead of hanging it.
"""

from __future__ import annotations

import logging
import threading

import pytest

from coordinator.streams import STALE_CHECK_S, NodeStreams, RunningStream

pytestmark = pytest.mark.timeout(60)

# a claim that may go ahead does so at once; one that must wait is still waiting after this long
PROMPT_S = 5.0
KEY = ("upload", "A")


class FakeCall:
    """What `NodeStreams` uses of a stream's grpc.ServicerContext."""

    def __init__(self) -> None:
        self.active = True
        self.cancels = 0

    def is_active(self) -> bool:
        return self.active

    def cancel(self) -> None:
        self.cancels += 1
        self.active = False


class FakeEngine:
    """The sessions the engine knows (a node's join replaces its earlier one)."""

    def __init__(self, *sessions: str) -> None:
        self.sessions = set(sessions)

    def has_session(self, session_id: str) -> bool:
        return session_id in self.sessions


class Stream:
    """A stream in its own thread: its claim, then running until `end()`."""

    def __init__(
        self, streams: NodeStreams, session_id: str, caller: str | None = "A", kind: str = "upload"
    ) -> None:
        self.call = FakeCall()
        self.entry: RunningStream | None = None
        self.claimed = threading.Event()
        self._end = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(streams, kind, caller, session_id), daemon=True
        )
        self._thread.start()

    def _run(self, streams: NodeStreams, kind: str, caller: str | None, session_id: str) -> None:
        with streams.one_per_node(kind, caller, session_id, self.call) as mine:
            self.entry = mine
            self.claimed.set()
            self._end.wait()

    def runs(self) -> RunningStream:
        """Its entry, once claimed: the stream may run."""
        assert self.claimed.wait(PROMPT_S), "the claim did not return"
        assert self.entry is not None, "the stream was not let run"
        return self.entry

    def end(self) -> None:
        self._end.set()
        self._thread.join(PROMPT_S)
        assert not self._thread.is_alive()


def test_a_stream_of_a_new_session_replaces_the_earlier_sessions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine("s1")
    streams = NodeStreams(engine)
    old = Stream(streams, "s1")
    old_entry = old.runs()
    engine.sessions = {"s2"}  # the node joined again
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        new = Stream(streams, "s2")
        new_entry = new.runs()
    assert old.call.cancels == 1 and new.call.cancels == 0
    assert (
        "upload of A cancelled: the node joined again, a stream of its new session replaces it"
        in caplog.messages
    )
    assert not streams.received(KEY, old_entry)  # its bytes, if they come, are dropped
    assert streams.received(KEY, new_entry)
    old.end()
    new.end()


def test_a_newer_stream_of_the_same_session_replaces_one_whose_bytes_are_not_all_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node that gave up on a half-open upload sends it again: the copy runs, the old one is
    cut (DUPLICATE for a copy that never arrives would be final)."""
    streams = NodeStreams(FakeEngine("s1"))
    old = Stream(streams, "s1")
    old_entry = old.runs()
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        new = Stream(streams, "s1")
        new_entry = new.runs()
    assert new_entry is not old_entry
    assert old.call.cancels == 1 and new.call.cancels == 0
    why = "a newer stream of the same session replaces it"
    assert f"upload of A cancelled: {why}" in caplog.messages
    assert not streams.received(KEY, old_entry)
    old.end()
    new.end()


def test_once_the_older_uploads_bytes_are_in_a_newer_copy_waits_for_its_outcome() -> None:
    streams = NodeStreams(FakeEngine("s1"))
    old = Stream(streams, "s1")
    assert streams.received(KEY, old.runs())
    new = Stream(streams, "s1")
    assert not new.claimed.wait(3 * STALE_CHECK_S), "the copy did not wait"
    assert old.call.cancels == 0  # the engine's outcome of the older one is not cut short
    old.end()  # its outcome is known (counted, refused or not stored): the copy goes on
    new.runs()
    assert old.call.cancels == 0 and new.call.cancels == 0
    new.end()


def test_a_copy_waiting_for_the_older_outcome_gives_up_when_its_call_ends() -> None:
    streams = NodeStreams(FakeEngine("s1"))
    old = Stream(streams, "s1")
    old_entry = old.runs()
    assert streams.received(KEY, old_entry)
    new = Stream(streams, "s1")
    assert not new.claimed.wait(3 * STALE_CHECK_S), "the copy did not wait"
    new.call.active = False  # the node went away
    assert new.claimed.wait(PROMPT_S), "the copy did not give up"
    assert new.entry is None
    assert old.call.cancels == 0
    new.end()
    assert streams.received(KEY, old_entry)  # still the node's running upload
    old.end()


def test_a_stream_of_a_replaced_session_gets_none_and_leaves_its_newer_one() -> None:
    """A late stream of the node's earlier session must not cut its new session's."""
    streams = NodeStreams(FakeEngine("s2"))  # s1 was replaced by s2
    new = Stream(streams, "s2")
    new_entry = new.runs()
    late = Stream(streams, "s1")
    assert late.claimed.wait(PROMPT_S), "the late stream's claim did not return"
    assert late.entry is None
    late.end()
    assert new.call.cancels == 0 and late.call.cancels == 0
    assert streams.received(KEY, new_entry)  # still the node's running upload
    new.end()


def test_a_stream_gives_up_its_place_when_it_ends_but_never_its_replacements() -> None:
    streams = NodeStreams(FakeEngine("s1"))
    done = Stream(streams, "s1")
    done_entry = done.runs()
    assert streams.received(KEY, done_entry)
    done.end()
    assert done_entry.ended.is_set()
    after = Stream(streams, "s1")  # nothing left to wait for: runs at once
    after_entry = after.runs()
    assert done.call.cancels == 0

    newer = Stream(streams, "s1")  # replaces `after`, whose bytes are not all in
    newer_entry = newer.runs()
    assert after.call.cancels == 1
    after.end()  # the replaced stream's end leaves its replacement's entry
    assert after_entry.ended.is_set()
    assert streams.received(KEY, newer_entry)
    newer.end()


def test_one_upload_and_one_download_per_node_and_per_session_without_identities() -> None:
    streams = NodeStreams(FakeEngine("s1", "s2", "s3", "s4"))
    running = [
        Stream(streams, "s1", "A", "upload"),
        Stream(streams, "s1", "A", "download"),
        Stream(streams, "s2", "B", "upload"),
        # insecure mode: no node is proven, so one of each per session
        Stream(streams, "s3", None, "upload"),
        Stream(streams, "s4", None, "upload"),
    ]
    for stream in running:
        stream.runs()
    assert [s.call.cancels for s in running] == [0] * len(running)
    for stream in running:
        stream.end()
