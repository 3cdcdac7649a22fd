"""The engine folds an accepted update outside its lock, and the round still counts it.

A fold replays the whole spooled update (~0.1 s per 100 MB); under the engine lock it made every
heartbeat, task poll and other upload's check wait. These tests hold a fold half-way (its replay
blocks on an event) and check what may and may not happen meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds import MAX_UNUSABLE_ROUNDS, RoundEngine
from coordinator.sessions import Role
from coordinator.settings import RoundSettings
from coordinator.tasks import TaskKind, TaskSpec
from coordinator.validation import Rejection
from pluralfed.wire import TensorSlice, specs_of

ENCODER = "test-encoder"
WAIT = 10.0  # seconds: generous bound for things that happen at once unless the engine blocks


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(1000, value, dtype=np.float32), "b": np.full(10, value, np.float32)}


def slices(update: dict[str, np.ndarray]) -> list[TensorSlice]:
    return [TensorSlice(spec, 0, update[spec.name]) for spec in specs_of(update)]


def held_replay(
    update: dict[str, np.ndarray], started: threading.Event, release: threading.Event
) -> Iterator[TensorSlice]:
    """A replay that yields its first slice, then waits until released."""
    pieces = slices(update)
    yield pieces[0]
    started.set()
    assert release.wait(WAIT), "the test never released the fold"
    yield from pieces[1:]


class Engine:
    """A RoundEngine driven by its own thread, with two training nodes."""

    def __init__(
        self, tmp_path: Path, round_timeout_s: float = 60.0, server_lr: float = 1.0, rounds: int = 1
    ) -> None:
        settings = RoundSettings(
            rounds=rounds,
            min_nodes=2,
            min_updates=1,
            round_timeout_s=round_timeout_s,
            eval_every=0,
            server_lr=server_lr,
        )
        self.engine = RoundEngine(settings, weights(0.0), tmp_path / "state", ENCODER, {})
        self.a = self.engine.join("A", Role.TRAIN, 10, ENCODER, "test")
        self.b = self.engine.join("B", Role.TRAIN, 30, ENCODER, "test")
        self.driver = threading.Thread(target=self._drive, daemon=True)
        self.driver.start()

    def _drive(self) -> None:
        with contextlib.suppress(Exception):  # (reported by the tests' own checks)
            self.engine.run()

    def task(self, session_id: str) -> TaskSpec:
        t = self.engine.next_task(session_id, None, WAIT)
        assert t.kind == TaskKind.TRAIN
        return t

    def upload(
        self, session_id: str, t: TaskSpec, replay: Callable[[], Iterator[TensorSlice]], n: int
    ) -> None:
        self.engine.accept_update(
            session_id, None, t.task_id, t.round, n, {}, replay, 4040, t.model_version
        )

    def held_upload(
        self, session_id: str, t: TaskSpec, value: float, n: int, release: threading.Event
    ) -> threading.Thread:
        """Start the upload of `weights(value)` in a thread; return once its fold is under way
        and held (after its first slice) until `release` is set."""
        started = threading.Event()
        folding = threading.Thread(
            target=self.upload,
            args=(session_id, t, lambda: held_replay(weights(value), started, release), n),
        )
        folding.start()
        assert started.wait(WAIT), "the fold did not start"
        return folding

    def wait_completed(self, rounds: int) -> None:
        for _ in range(int(WAIT / 0.05)):
            if self.engine.completed_rounds() >= rounds:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"round {rounds} did not complete within {WAIT} s")

    def close(self) -> None:
        self.engine.stop()
        self.driver.join(WAIT)


def test_engine_answers_while_an_update_is_folded(tmp_path: Path) -> None:
    fed = Engine(tmp_path)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        started, release = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def upload_a() -> None:
            try:
                fed.upload(
                    fed.a.session_id, ta, lambda: held_replay(weights(1.0), started, release), 10
                )
            except BaseException as err:  # reported by the assertion below
                errors.append(err)

        folding = threading.Thread(target=upload_a)
        folding.start()
        assert started.wait(WAIT)
        # mid-fold: the engine still answers other calls (with the lock held they would block)
        answered = threading.Event()

        def other_calls() -> None:
            fed.engine.heartbeat(fed.b.session_id, None)
            fed.engine.check_update(fed.b.session_id, None, tb.task_id, tb.round, tb.model_version)
            answered.set()

        threading.Thread(target=other_calls, daemon=True).start()
        assert answered.wait(WAIT), "heartbeat and check_update waited for another node's fold"
        # a second copy of A's update while the first is being folded is a duplicate
        with pytest.raises(Rejection) as dup:
            fed.upload(fed.a.session_id, ta, lambda: iter(slices(weights(5.0))), 10)
        assert dup.value.reason == "DUPLICATE"
        # B's update folds after A's (folds take turns), and the round waits for both
        upload_b = threading.Thread(
            target=fed.upload,
            args=(fed.b.session_id, tb, lambda: iter(slices(weights(2.0))), 30),
        )
        upload_b.start()
        threading.Event().wait(0.3)
        assert fed.engine.state.completed_rounds == 0, "the round closed during a fold"
        release.set()
        folding.join(WAIT)
        upload_b.join(WAIT)
        assert not errors, errors
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None
        assert record["participants"] == ["A", "B"]
        expected = (10 * 1.0 + 30 * 2.0) / 40
        for name, values in fed.engine.state.weights.items():
            np.testing.assert_allclose(values, expected, rtol=1e-6, err_msg=name)
    finally:
        release.set()
        fed.close()


def test_round_past_its_deadline_waits_for_a_fold_it_had_claimed(tmp_path: Path) -> None:
    fed = Engine(tmp_path, round_timeout_s=0.5)
    try:
        ta = fed.task(fed.a.session_id)
        fed.task(fed.b.session_id)  # B never answers: the deadline closes the round
        release = threading.Event()
        folding = fed.held_upload(fed.a.session_id, ta, 3.0, 10, release)
        threading.Event().wait(1.0)  # past the deadline, the fold still held
        assert fed.engine.state.completed_rounds == 0, "the round closed without a claimed fold"
        release.set()
        folding.join(WAIT)
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None and record["participants"] == ["A"]
        np.testing.assert_allclose(fed.engine.state.weights["w"], 3.0)
    finally:
        release.set()
        fed.close()


def test_the_deadline_line_names_the_silent_nodes_not_one_whose_update_is_being_folded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A's update is claimed (being folded) when the deadline passes, B never answered: the
    warning names B alone, A's update counts."""
    fed = Engine(tmp_path, round_timeout_s=0.5)
    release = threading.Event()
    try:
        with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
            ta = fed.task(fed.a.session_id)
            fed.task(fed.b.session_id)  # B never answers: the deadline closes the round
            folding = fed.held_upload(fed.a.session_id, ta, 3.0, 10, release)
            for _ in range(int(WAIT / 0.05)):
                if "deadline passed" in caplog.text:
                    break
                threading.Event().wait(0.05)
            release.set()
            folding.join(WAIT)
            fed.wait_completed(1)
        lines = [r.getMessage() for r in caplog.records if "deadline passed" in r.getMessage()]
        assert lines == ["train round 1: deadline passed without ['B']"]
        record = fed.engine.state.history.last
        assert record is not None and record["participants"] == ["A"]
    finally:
        release.set()
        fed.close()


def test_a_round_every_node_answered_or_claimed_closes_while_the_last_fold_runs(
    tmp_path: Path,
) -> None:
    """Once B answered and A's update is claimed (being folded), nothing more can come: the
    round closes to new calls at once (no open task), and still counts A's fold."""
    fed = Engine(tmp_path)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(weights(2.0))), 30)
        release = threading.Event()
        folding = fed.held_upload(fed.a.session_id, ta, 1.0, 10, release)
        for _ in range(int(WAIT / 0.05)):
            if fed.engine.open_task() is None:
                break
            threading.Event().wait(0.05)
        assert fed.engine.open_task() is None, "the round stayed open for a claimed fold"
        assert fed.engine.state.completed_rounds == 0
        release.set()
        folding.join(WAIT)
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None and record["participants"] == ["A", "B"]
    finally:
        release.set()
        fed.close()


def test_a_copy_of_an_update_folded_across_its_rounds_close_is_a_duplicate(
    tmp_path: Path,
) -> None:
    """A copy of an update the closed round still folds, or has folded since, is DUPLICATE
    (it counted), not STALE: the round closed last sees its folds end after the close."""
    fed = Engine(tmp_path, round_timeout_s=0.5)
    try:
        ta = fed.task(fed.a.session_id)
        fed.task(fed.b.session_id)  # B never answers: the deadline closes the round
        release = threading.Event()
        folding = fed.held_upload(fed.a.session_id, ta, 3.0, 10, release)
        for _ in range(int(WAIT / 0.05)):  # the round closes at its deadline, the fold held
            if fed.engine.open_task_id(fed.a.session_id) == "":
                break
            threading.Event().wait(0.05)
        assert fed.engine.open_task_id(fed.a.session_id) == "", "the round did not close"
        copy = lambda: iter(slices(weights(5.0)))  # noqa: E731
        with pytest.raises(Rejection) as folding_dup:
            fed.upload(fed.a.session_id, ta, copy, 10)
        assert folding_dup.value.reason == "DUPLICATE", folding_dup.value.message
        release.set()
        folding.join(WAIT)
        fed.wait_completed(1)
        with pytest.raises(Rejection) as folded_dup:
            fed.upload(fed.a.session_id, ta, copy, 10)
        assert folded_dup.value.reason == "DUPLICATE", folded_dup.value.message
        np.testing.assert_allclose(fed.engine.state.weights["w"], 3.0)  # the copies counted nothing
    finally:
        release.set()
        fed.close()


def test_a_copy_of_an_update_whose_fold_failed_after_its_rounds_close_is_already_rejected(
    tmp_path: Path,
) -> None:
    """The closed round sees a fold that ends after the close end badly too: a copy of that
    update is ALREADY_REJECTED (its first copy did not count), not DUPLICATE as if it had."""
    fed = Engine(tmp_path, round_timeout_s=0.5)
    started, release = threading.Event(), threading.Event()
    try:
        ta = fed.task(fed.a.session_id)
        fed.task(fed.b.session_id)  # B never answers: the deadline closes the round
        bad = weights(1.0)
        first, *rest = slices(bad)
        bad[rest[0].spec.name][:] = np.nan  # the first slice is fine, a later one is not

        def replay() -> Iterator[TensorSlice]:
            yield first
            started.set()
            assert release.wait(WAIT), "the test never released the fold"
            yield from slices(bad)[1:]

        refused: list[Rejection] = []

        def upload_a() -> None:
            try:
                fed.upload(fed.a.session_id, ta, replay, 10)
            except Rejection as err:
                refused.append(err)

        folding = threading.Thread(target=upload_a)
        folding.start()
        assert started.wait(WAIT), "the fold did not start"
        for _ in range(int(WAIT / 0.05)):  # the round closes at its deadline, the fold held
            if fed.engine.open_task_id(fed.a.session_id) != ta.task_id:
                break
            threading.Event().wait(0.05)
        assert fed.engine.open_task_id(fed.a.session_id) != ta.task_id, "the round did not close"
        release.set()
        folding.join(WAIT)
        assert [r.reason for r in refused] == ["INTERNAL"], refused
        with pytest.raises(Rejection) as copy:
            fed.upload(fed.a.session_id, ta, lambda: iter(slices(weights(5.0))), 10)
        assert copy.value.reason == "ALREADY_REJECTED", copy.value.message
    finally:
        release.set()
        fed.close()


def test_a_failed_heartbeat_during_the_nodes_own_fold_does_not_close_the_round(
    tmp_path: Path,
) -> None:
    """A node whose update is being folded and whose heartbeat then says FAILED for that task
    has answered once: the round does not count it twice and close without the other node."""
    fed = Engine(tmp_path, round_timeout_s=WAIT)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        release = threading.Event()
        folding = fed.held_upload(fed.a.session_id, ta, 1.0, 10, release)
        fed.engine.heartbeat(fed.a.session_id, None, ta.task_id, failed=True, message="boom")
        threading.Event().wait(0.3)  # the driver would close the round now if it counted A twice
        assert fed.engine.open_task_id(fed.b.session_id) == tb.task_id, "the round closed"
        release.set()
        folding.join(WAIT)
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(weights(2.0))), 30)
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None and record["participants"] == ["A", "B"]
    finally:
        release.set()
        fed.close()


def test_an_answer_naming_the_closed_task_with_another_round_is_stale(tmp_path: Path) -> None:
    """Only an answer naming the closed round's task and round is a repeat of it (DUPLICATE);
    its task id with another round number is stale, and so is its round number with another
    task id (a retried round keeps its number under a new task id)."""
    fed = Engine(tmp_path, round_timeout_s=WAIT)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        fed.upload(fed.a.session_id, ta, lambda: iter(slices(weights(1.0))), 10)
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(weights(2.0))), 30)
        fed.wait_completed(1)
        copy = lambda: iter(slices(weights(5.0)))  # noqa: E731
        with pytest.raises(Rejection) as repeat:
            fed.upload(fed.a.session_id, ta, copy, 10)
        assert repeat.value.reason == "DUPLICATE"
        with pytest.raises(Rejection) as other_round:
            fed.upload(fed.a.session_id, dataclasses.replace(ta, round=ta.round + 1), copy, 10)
        assert other_round.value.reason == "STALE", other_round.value.message
        with pytest.raises(Rejection) as other_task:
            fed.upload(fed.a.session_id, dataclasses.replace(ta, task_id="another-task"), copy, 10)
        assert other_task.value.reason == "STALE", other_task.value.message
    finally:
        fed.close()


def test_update_that_fails_to_fold_is_answered_as_refused(tmp_path: Path) -> None:
    fed = Engine(tmp_path, round_timeout_s=WAIT)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        bad = {"w": np.full(1000, np.nan, np.float32), "b": np.full(10, np.nan, np.float32)}
        with pytest.raises(Rejection, match="non-finite") as refused:
            fed.upload(fed.a.session_id, ta, lambda: iter(slices(bad)), 10)
        assert refused.value.reason == "INTERNAL"  # an UploadReply, not an UNKNOWN status
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(weights(2.0))), 30)
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None
        assert record["participants"] == ["B"]
        assert record["outcomes"]["A"].startswith("rejected: the update could not be folded")
    finally:
        fed.close()


def test_a_round_whose_new_model_would_not_be_finite_is_retried_not_committed(
    tmp_path: Path,
) -> None:
    """Finite updates can overflow float32 once stepped (server_lr 2 here): the coordinator
    committed such a round (review, session 20), served an infinite model that every node
    refused, and then refused its own checkpoint at restart. Now the round is retried and the
    global model, the history and the checkpoint stay as they were."""
    fed = Engine(tmp_path, round_timeout_s=WAIT, server_lr=2.0)
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        huge = weights(3e38)  # finite in float32 (max 3.4e38); 0 + 2 * (3e38 - 0) is not
        fed.upload(fed.a.session_id, ta, lambda: iter(slices(huge)), 10)
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(huge)), 30)
        retry_a = fed.task(fed.a.session_id)  # the round is opened again, nothing committed
        assert (retry_a.round, fed.engine.completed_rounds()) == (1, 0)
        assert retry_a.task_id != ta.task_id
        assert len(fed.engine.state.history) == 0
        np.testing.assert_array_equal(fed.engine.state.weights["w"], 0.0)
        retry_b = fed.task(fed.b.session_id)
        fed.upload(fed.a.session_id, retry_a, lambda: iter(slices(weights(1.0))), 10)
        fed.upload(fed.b.session_id, retry_b, lambda: iter(slices(weights(1.0))), 30)
        fed.wait_completed(1)
        np.testing.assert_allclose(fed.engine.state.weights["w"], 2.0)  # 0 + 2 * (1 - 0)
    finally:
        fed.close()


def test_a_round_without_a_usable_model_three_times_in_a_row_stops_the_run(
    tmp_path: Path,
) -> None:
    """Retried for ever, a round whose updates keep overflowing (a node sending them again, or
    server_lr too high) would have every node train for it without end (review of session 20):
    the third try in a row stops the run, its last checkpoint kept."""
    fed = Engine(tmp_path, round_timeout_s=WAIT, server_lr=2.0)
    try:
        huge = weights(3e38)
        for attempt in range(MAX_UNUSABLE_ROUNDS):
            ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
            assert ta.round == 1, attempt
            fed.upload(fed.a.session_id, ta, lambda: iter(slices(huge)), 10)
            fed.upload(fed.b.session_id, tb, lambda: iter(slices(huge)), 30)
        fed.driver.join(WAIT)
        assert not fed.driver.is_alive(), "the run went on"
        assert not fed.engine.done and fed.engine.completed_rounds() == 0
    finally:
        fed.close()


def test_only_unusable_tries_in_a_row_stop_the_run(tmp_path: Path) -> None:
    """Two unusable tries of round 1, then a usable one: round 2's first unusable try is the
    first in a row again, and is retried (it is not the third)."""
    fed = Engine(tmp_path, round_timeout_s=WAIT, server_lr=2.0, rounds=2)
    try:
        for value in (3e38, 3e38, 1.0, 3e38):
            update = slices(weights(value))
            ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
            fed.upload(fed.a.session_id, ta, partial(iter, update), 10)
            fed.upload(fed.b.session_id, tb, partial(iter, update), 30)
        retry = fed.task(fed.a.session_id)
        assert (retry.round, fed.engine.completed_rounds()) == (2, 1)
        assert fed.driver.is_alive()
    finally:
        fed.close()


def test_node_that_rejoins_while_a_round_opens_keeps_its_place(tmp_path: Path) -> None:
    """The round picks its sessions, then opens; a node rejoining in between has a new session
    the round does not know. It takes the old one's place (not recorded as silent) and gets
    the task."""
    settings = RoundSettings(rounds=1, min_nodes=1, eval_every=0)
    engine = RoundEngine(settings, weights(0.0), tmp_path / "state", ENCODER, {})
    engine.join("A", Role.TRAIN, 10, ENCODER, "test")
    chosen = engine.live_sessions(Role.TRAIN)
    again = engine.join("A", Role.TRAIN, 10, ENCODER, "test")  # the race's window
    t = engine._open(TaskKind.TRAIN, chosen, 60.0)
    with engine._changed:
        engine._give_up_on_silent(t)
    assert t.selected == {again.session_id: "A"} and "A" not in t.answered
    assert engine.next_task(again.session_id, None, 0.0).task_id == t.task_id


def test_a_node_taking_its_place_in_an_open_round_has_its_waiting_poll_woken(
    tmp_path: Path,
) -> None:
    """As above, with the new session's poll already waiting (heartbeats a minute apart, so
    the poll would otherwise sleep its whole 30 s): the take-over wakes it with the task."""
    settings = RoundSettings(
        rounds=1, min_nodes=1, eval_every=0, heartbeat_interval_s=60.0, session_timeout_s=120.0
    )
    engine = RoundEngine(settings, weights(0.0), tmp_path / "state", ENCODER, {})
    engine.join("A", Role.TRAIN, 10, ENCODER, "test")
    chosen = engine.live_sessions(Role.TRAIN)
    again = engine.join("A", Role.TRAIN, 10, ENCODER, "test")  # the race's window
    t = engine._open(TaskKind.TRAIN, chosen, 60.0)
    handed: list[TaskSpec] = []
    poll = threading.Thread(
        target=lambda: handed.append(engine.next_task(again.session_id, None, 30.0)), daemon=True
    )
    poll.start()
    poll.join(0.3)  # waiting now (were it not yet, it would find the task all the same)
    with engine._changed:
        engine._give_up_on_silent(t)
    poll.join(10.0)
    assert not poll.is_alive() and [h.task_id for h in handed] == [t.task_id]


def test_a_node_that_answered_left_and_rejoined_is_not_handed_the_task_again(
    tmp_path: Path,
) -> None:
    """A reports its task failed (its answer) and leaves; back with a new session while the
    round still waits for B, it does not take its old session's place: it answered already."""
    settings = RoundSettings(rounds=1, min_nodes=2, eval_every=0)
    engine = RoundEngine(settings, weights(0.0), tmp_path / "state", ENCODER, {})
    a = engine.join("A", Role.TRAIN, 10, ENCODER, "test")
    engine.join("B", Role.TRAIN, 10, ENCODER, "test")
    t = engine._open(TaskKind.TRAIN, engine.live_sessions(Role.TRAIN), 60.0)
    engine.heartbeat(a.session_id, None, t.task_id, failed=True, message="disk full")
    engine.leave(a.session_id, None, "restarting")
    again = engine.join("A", Role.TRAIN, 10, ENCODER, "test")
    with engine._changed:
        engine._give_up_on_silent(t)
    assert again.session_id not in t.selected and t.answered == {"A": "failed: disk full"}
    assert engine.next_task(again.session_id, None, 0.0).kind == TaskKind.WAIT


def test_a_node_rejoining_evaluate_only_while_a_round_opens_does_not_take_a_training_place(
    tmp_path: Path,
) -> None:
    """As above, but the node comes back evaluate-only (no evaluate_only set: each node says
    its role): its new session may not train, so the round gives up on A's old one instead."""
    settings = RoundSettings(rounds=1, min_nodes=1, eval_every=0)
    engine = RoundEngine(settings, weights(0.0), tmp_path / "state", ENCODER, {})
    engine.join("A", Role.TRAIN, 10, ENCODER, "test")
    chosen = engine.live_sessions(Role.TRAIN)
    again = engine.join("A", Role.EVALUATE_ONLY, 0, ENCODER, "test")  # the race's window
    t = engine._open(TaskKind.TRAIN, chosen, 60.0)
    with engine._changed:
        engine._give_up_on_silent(t)
    assert again.session_id not in t.selected and "A" in t.answered
    assert engine.next_task(again.session_id, None, 0.0).kind == TaskKind.WAIT


def test_a_copy_the_transport_refuses_during_the_nodes_own_fold_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A's update is being folded when the transport refuses another copy of it (final, e.g. a
    bad digest): the update being folded is A's answer, so the refusal is neither recorded
    nor logged as A's outcome, and the update counts."""
    fed = Engine(tmp_path)
    release = threading.Event()
    try:
        ta, tb = fed.task(fed.a.session_id), fed.task(fed.b.session_id)
        folding = fed.held_upload(fed.a.session_id, ta, 3.0, 10, release)
        with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
            fed.engine.note_rejected_update(
                fed.a.session_id, None, ta.task_id, "digest mismatch", final=True
            )
        with fed.engine._lock:
            assert fed.engine._task is not None and "A" not in fed.engine._task.answered
        assert [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()] == []
        release.set()
        folding.join(WAIT)
        fed.upload(fed.b.session_id, tb, lambda: iter(slices(weights(1.0))), 30)
        fed.wait_completed(1)
        record = fed.engine.state.history.last
        assert record is not None and record["participants"] == ["A", "B"]
        assert record["outcomes"] == {"A": "accepted", "B": "accepted"}
    finally:
        release.set()
        fed.close()
