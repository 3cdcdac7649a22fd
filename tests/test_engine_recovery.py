"""The round engine after things go wrong: a stop between a round and its evaluation, a stop
during the final evaluation, an update that breaks off half folded. Real RoundEngine, driven in
process (the review of session 14 found each of these)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from coordinator import node_calls, rounds, sessions
from coordinator.rounds import RoundEngine
from coordinator.sessions import NodeSession, Role
from coordinator.settings import RoundSettings
from coordinator.state import load_state
from coordinator.tasks import OpenTask, TaskKind, TaskSpec
from coordinator.validation import Rejection
from pluralfed.errors import InputError
from pluralfed.evaluation import GroupEvaluation
from pluralfed.records import RoundRecord
from pluralfed.wire import TensorSlice, specs_of

pytestmark = pytest.mark.timeout(60)

ENC = "enc"
WEIGHTS = {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32)}
SPECS = specs_of(WEIGHTS)


def replay_of(value: float) -> Callable[[], Iterator[TensorSlice]]:
    return lambda: iter([TensorSlice(spec, 0, np.full(10, value, np.float32)) for spec in SPECS])


def upload(
    engine: RoundEngine,
    session: NodeSession,
    task: TaskSpec,
    replay: Callable[[], Iterator[TensorSlice]],
) -> None:
    """A training node's whole update for `task`, as the servicer hands it over: 10 examples
    (what every node here joins with), no metrics, 80 bytes."""
    engine.accept_update(
        session.session_id, None, task.task_id, task.round, 10, {}, replay, 80, task.model_version
    )


def start(engine: RoundEngine) -> threading.Thread:
    driver = threading.Thread(target=engine.run, daemon=True)
    driver.start()
    return driver


def serve(engine: RoundEngine, stop_after_round: int | None = None, alignment: float = 0.5) -> None:
    """One training node answering every task until SHUTDOWN (reporting `alignment` when it
    evaluates); with stop_after_round, the coordinator is stopped (as by Ctrl-C) right after
    that round is checkpointed."""
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    while not engine.done:
        t = engine.next_task(s.session_id, None, 0.5)
        if t.kind == TaskKind.TRAIN:
            upload(engine, s, t, replay_of(t.round))
            if stop_after_round == t.round:
                while engine.completed_rounds() < t.round:
                    time.sleep(0.01)
                engine.stop()
                return
        elif t.kind == TaskKind.EVALUATE:
            engine.accept_evaluation(
                s.session_id,
                None,
                t.task_id,
                t.round,
                GroupEvaluation("A", 5, alignment, 0.4, 0.3, 0.3),
                t.model_version,
            )
        elif t.kind == TaskKind.SHUTDOWN:
            return


def evaluated(engine: RoundEngine) -> list[int]:
    return [e["round"] for e in engine.state.evaluations.records()]


def test_an_evaluation_due_when_the_coordinator_stopped_runs_after_it_resumes(
    tmp_path: Path,
) -> None:
    settings = RoundSettings(rounds=3, eval_every=1, round_timeout_s=10, eval_timeout_s=10)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first, stop_after_round=1)
    driver.join(20)
    assert first.completed_rounds() == 1 and evaluated(first) == [] and not first.done
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    serve(resumed)
    driver.join(20)
    assert resumed.done and evaluated(resumed) == [1, 2, 3]  # before: [2, 3]


def test_a_coordinator_stopped_as_a_round_is_checkpointed_opens_no_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped (Ctrl-C) the moment round 1 is checkpointed, with round 1's evaluation due: no
    evaluation round is opened, nor a "no reports" warning logged for it; a resume runs it."""

    def stop_at_once(record: object) -> None:
        engine.stop()

    settings = RoundSettings(rounds=2, eval_every=1, round_timeout_s=10, eval_timeout_s=10)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {}, on_round=stop_at_once)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        driver = start(engine)
        t = engine.next_task(s.session_id, None, 10)
        assert t.kind == TaskKind.TRAIN
        upload(engine, s, t, replay_of(1.0))
        driver.join(10)
    assert not driver.is_alive() and engine.completed_rounds() == 1 and evaluated(engine) == []
    assert "evaluate round" not in caplog.text and "no reports" not in caplog.text


@pytest.mark.parametrize(
    ("started", "resumed_with"),
    [("fedadam", "fedavg"), ("fedavg", "fedyogi"), ("fedyogi", "fedadam")],
)
def test_a_run_resumed_with_another_server_optimizer_is_refused(
    tmp_path: Path, started: str, resumed_with: str
) -> None:
    """Before, the new optimizer took what it could of the old one's state: FedAvg dropped
    FedAdam's moments, FedAdam started from zero moments, without a word."""
    first = RoundEngine(
        RoundSettings(rounds=2, eval_every=0, server_optimizer=started), WEIGHTS, tmp_path, ENC, {}
    )
    driver = start(first)
    serve(first, stop_after_round=1)
    driver.join(20)
    assert first.completed_rounds() == 1
    changed = RoundSettings(rounds=2, eval_every=0, server_optimizer=resumed_with)
    with pytest.raises(InputError, match=f"saved by server optimizer '{started}'") as err:
        RoundEngine(changed, WEIGHTS, tmp_path, ENC, {})
    assert str(tmp_path) in str(err.value) and resumed_with in str(err.value)
    # the same optimizer resumes (a different learning rate is a legitimate change)
    same = RoundSettings(rounds=2, eval_every=0, server_optimizer=started, server_lr=0.5)
    resumed = RoundEngine(same, WEIGHTS, tmp_path, ENC, {})
    assert resumed.optimizer.state_dict()["step"] == 1


def test_resuming_a_finished_run_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`ROUNDS=3 docker compose up` after a 20-round run re-showed the old run without a word."""
    settings = RoundSettings(rounds=2, eval_every=0)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first)
    driver.join(20)
    assert first.done
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    assert [r.getMessage() for r in caplog.records if "nothing is left" in r.getMessage()] == [
        f"{tmp_path} holds run {first.run_id}, which has done 2 rounds (rounds = 1 here): "
        "nothing is left to train; the final evaluation runs again once the nodes are back (for "
        "a fresh run use an empty state folder)"
    ]


def test_a_run_resumed_with_fewer_rounds_than_it_did_evaluates_the_model_it_ends_with(
    tmp_path: Path,
) -> None:
    """Stopped after round 3 (evaluated at 2), restarted with rounds = 2: it ended done with
    round 2's evaluation as the final one, older than the model it served and saved."""
    first = RoundEngine(RoundSettings(rounds=4, eval_every=2), WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first, stop_after_round=3)
    driver.join(20)
    assert first.completed_rounds() == 3 and evaluated(first) == [2] and not first.done
    resumed = RoundEngine(RoundSettings(rounds=2, eval_every=2), WEIGHTS, tmp_path, ENC, {})
    assert not resumed.finished_at_start
    driver = start(resumed)
    serve(resumed, alignment=0.7)
    driver.join(20)
    assert resumed.done and evaluated(resumed) == [2, 3]
    final = resumed.final_evaluation()
    assert final is not None and final["round"] == 3 and final["per_group"]["A"]["model"] == 0.7


def test_a_finished_run_started_again_evaluates_its_final_model_again(tmp_path: Path) -> None:
    """A second `docker compose up` on a finished run: the coordinator printed the old results
    and left within a second, before its health check passed, so compose failed and the nodes
    it had started retried for ever. Now it waits for the nodes, evaluates the final model
    again (the new evaluation replaces the old one, never a round twice) and ends the run."""
    settings = RoundSettings(rounds=2, eval_every=1)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first, alignment=0.5)
    driver.join(20)
    assert first.done and evaluated(first) == [1, 2] and not first.finished_at_start
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert again.finished_at_start
    driver = start(again)
    time.sleep(0.3)
    assert not again.done  # waiting for the nodes, not gone
    serve(again, alignment=0.6)  # returns on SHUTDOWN
    driver.join(20)
    assert again.done and again.evaluated_again and evaluated(again) == [1, 2]
    final = again.final_evaluation()
    assert final is not None and final["per_group"]["A"]["model"] == 0.6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["kind"], r["round"]) for r in rows] == [
        ("round", 1),
        ("evaluation", 1),
        ("round", 2),
        ("evaluation", 2),
    ]
    saved = load_state(tmp_path)
    assert saved is not None and saved.evaluations.last["per_group"]["A"]["model"] == 0.6


def _finish_with_a_held_out_group(tmp_path: Path, settings: RoundSettings) -> None:
    """A run of training group A and evaluate-only group H, evaluated at its end by both."""
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    held = threading.Thread(target=evaluate_only, args=(first, "H", 0.4), daemon=True)
    held.start()
    serve(first)
    driver.join(20)
    held.join(20)
    final = first.final_evaluation()
    assert first.done and final is not None and final["groups"] == ["A", "H"]


def evaluate_only(
    engine: RoundEngine,
    group: str,
    alignment: float,
    *,
    once: bool = False,
    joined: threading.Event | None = None,
) -> None:
    """An evaluate-only node answering every EVALUATE task until SHUTDOWN; with `once`, it
    answers one and leaves for good. `joined` is set once it has joined."""
    s = engine.join(group, Role.EVALUATE_ONLY, 0, ENC, "t")
    if joined is not None:
        joined.set()
    while True:
        t = engine.next_task(s.session_id, None, 0.5)
        if t.kind == TaskKind.EVALUATE:
            evaluation = GroupEvaluation(group, 5, alignment, 0.4, 0.3, 0.3)
            engine.accept_evaluation(
                s.session_id, None, t.task_id, t.round, evaluation, t.model_version
            )
            if once:
                engine.leave(s.session_id, None, "gone for good")
                return
        elif t.kind == TaskKind.SHUTDOWN:
            return


def evaluates_once_then_leaves(engine: RoundEngine, group: str) -> threading.Thread:
    """An evaluate-only node of `group`, joined when this returns, that answers one evaluation
    (alignment 0.4) and leaves for good (its thread)."""
    joined = threading.Event()
    node = threading.Thread(
        target=evaluate_only,
        args=(engine, group, 0.4),
        kwargs={"once": True, "joined": joined},
        daemon=True,
    )
    node.start()
    assert joined.wait(10)
    return node


class LongPoll:
    """A node's long poll for its next task (60 s), on its own thread, its call open until
    `hang_up`: what the server does when it cancels the call."""

    def __init__(self, engine: RoundEngine, session_id: str) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.answers: list[TaskKind] = []
        self.thread = threading.Thread(
            target=lambda: self.answers.append(
                engine.next_task(session_id, None, 60.0, alive=self.connected.is_set).kind
            )
        )
        self.thread.start()
        time.sleep(0.3)  # it waits now (a test passes, only later, if it had not started yet)

    def hang_up(self, timeout: float) -> list[TaskKind]:
        """Cancel the call; the poll's answers once it has ended (within `timeout`)."""
        self.connected.clear()
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.answers


@contextlib.contextmanager
def started_again(tmp_path: Path, settings: RoundSettings) -> Iterator[RoundEngine]:
    """The finished run in `tmp_path` started again, its training node back at once; the block
    runs 1.5 s later (a late group comes back in it), and the run's end is waited for after it."""
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(again)
    trainer = threading.Thread(target=serve, args=(again,), kwargs={"alignment": 0.7})
    trainer.start()
    time.sleep(1.5)
    yield again
    driver.join(20)
    trainer.join(20)


def test_evaluating_again_waits_for_every_group_of_the_last_evaluation(tmp_path: Path) -> None:
    """Review, session 17: the evaluation opened as soon as the training quorum was back, so a
    held-out node a moment later was left out and the held-out figures were replaced by none."""
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=10)
    _finish_with_a_held_out_group(tmp_path, settings)
    with started_again(tmp_path, settings) as again:  # the quorum, but not every group
        last = again.state.evaluations.last
        assert last is not None and last["groups"] == ["A", "H"] and not again.evaluated_again
        evaluate_only(again, "H", 0.45)
    final = again.final_evaluation()
    assert again.evaluated_again and final is not None and final["groups"] == ["A", "H"]
    assert final["per_group"]["H"]["model"] == 0.45 and "held-out groups" in final["reports"]


def test_evaluating_again_waits_for_a_held_out_group_the_run_ended_without(
    tmp_path: Path,
) -> None:
    """The held-out node was away when the run ended, so its final evaluation lacks it; the
    operator starts the finished run again to get those figures. The evaluation waited only for
    the groups the last one had, so it ran with the training node alone, before the held-out
    node was back, and again had no held-out figures."""
    first = RoundEngine(
        RoundSettings(rounds=1, eval_every=0, eval_timeout_s=1, evaluate_only=("H",)),
        WEIGHTS,
        tmp_path,
        ENC,
        {},
    )
    driver = start(first)
    serve(first)
    driver.join(20)
    ended = first.final_evaluation()
    assert first.done and ended is not None and ended["groups"] == ["A"]
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=10, evaluate_only=("H",))
    with started_again(tmp_path, settings) as again:  # the groups the last one had, not H
        assert not again.evaluated_again
        evaluate_only(again, "H", 0.45)
    final = again.final_evaluation()
    assert again.evaluated_again and final is not None and final["groups"] == ["A", "H"]
    assert "held-out groups" in final["reports"]


def test_evaluating_again_waits_for_a_held_out_group_new_to_the_run(tmp_path: Path) -> None:
    """A run without held-out groups, finished; started again with evaluate_only naming H (a
    group its evaluations never had, nor missed): the evaluation waits for H too, as for every
    evaluate-only group, and does not run with the training node alone."""
    first = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first)
    driver.join(20)
    ended = first.final_evaluation()
    assert first.done and ended is not None and ended["groups"] == ["A"] and not ended["missing"]
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=10, evaluate_only=("H",))
    with started_again(tmp_path, settings) as again:  # A is back, H is not yet
        assert not again.evaluated_again
        evaluate_only(again, "H", 0.45)
    final = again.final_evaluation()
    assert again.evaluated_again and final is not None and final["groups"] == ["A", "H"]


def test_evaluating_again_waits_for_a_group_the_final_evaluation_missed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without evaluate_only: B evaluated at round 1 and was gone at the end, so the final
    evaluation lists it as missing. Started again, the run waits for B too (and says so)."""
    settings = RoundSettings(rounds=2, eval_every=1, eval_timeout_s=1)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    gone = evaluates_once_then_leaves(first, "B")
    serve(first)
    driver.join(20)
    gone.join(20)
    ended = first.final_evaluation()
    assert first.done and evaluated(first) == [1, 2]
    assert next(first.state.evaluations.records())["groups"] == ["A", "B"]
    assert ended is not None and ended["groups"] == ["A"] and ended["missing"] == ["B"]
    assert ended["missing_held_out"] == ["B"]  # B joined as evaluate-only (no evaluate_only)
    with (
        caplog.at_level(logging.INFO, logger="pluralfed.coordinator"),
        started_again(tmp_path, RoundSettings(rounds=2, eval_every=1, eval_timeout_s=10)) as again,
    ):  # the groups the final evaluation had, not B
        assert not again.evaluated_again
        evaluate_only(again, "B", 0.45)
    final = again.final_evaluation()
    assert again.evaluated_again and final is not None and final["groups"] == ["A", "B"]
    waits = [r.getMessage() for r in caplog.records if "waiting up to 10 s" in r.getMessage()]
    assert len(waits) == 1 and "'B'" in waits[0], waits


def test_a_partial_evaluation_again_leaves_the_earlier_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the training node comes back: after eval_timeout_s it evaluates with it, and the
    earlier evaluation, which had the held-out group too, stays."""
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=1)
    _finish_with_a_held_out_group(tmp_path, settings)
    before = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {}).final_evaluation()
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(again)
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        serve(again, alignment=0.9)
        driver.join(20)
    assert again.done and not again.evaluated_again
    assert again.final_evaluation() == before
    assert any("without ['H']" in r.getMessage() for r in caplog.records)


def test_a_finished_run_nobody_comes_back_to_ends_after_eval_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=1)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first)
    driver.join(20)
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        driver = start(again)
        driver.join(10)
    assert not driver.is_alive() and again.done and not again.evaluated_again
    assert again.final_evaluation() == first.final_evaluation()
    # said so, without opening an evaluation nobody is there to answer
    assert (
        "no node came back within 1 s to evaluate the finished run again: its evaluation "
        "stays as it was" in caplog.text
    )
    assert "evaluate round" not in caplog.text and "no reports" not in caplog.text


def test_a_finished_run_stopped_while_waiting_for_its_nodes_opens_no_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Started again, a finished run waits for its nodes to evaluate again; stopped (Ctrl-C)
    while it waits, it opens no evaluation round (nodes polling just then would be handed it)
    and keeps its evaluation."""
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=60)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first)
    driver.join(20)
    assert first.done and evaluated(first) == [1]
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert again.finished_at_start
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        driver = start(again)
        time.sleep(0.3)  # waiting for A (were it not yet, the stop would be seen all the same)
        again.stop()
        driver.join(10)
    assert not driver.is_alive() and again.done and not again.evaluated_again
    assert "opened" not in caplog.text and evaluated(again) == [1]


def test_a_stop_during_the_final_evaluation_is_not_a_finished_run(tmp_path: Path) -> None:
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    t = engine.next_task(s.session_id, None, 5)
    upload(engine, s, t, replay_of(1))
    assert engine.next_task(s.session_id, None, 5).kind == TaskKind.EVALUATE
    engine.stop()  # the operator's Ctrl-C while the nodes evaluate
    driver.join(10)
    assert not driver.is_alive()
    # before: done (results written, "federation finished", exit 0) without a final evaluation
    assert engine.completed_rounds() == 1 and not engine.done
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    # not a finished run evaluated again: its final evaluation is new, so the coordinator
    # writes final/ and results.json for it
    assert not resumed.finished_at_start
    driver = start(resumed)
    serve(resumed)
    driver.join(20)
    assert resumed.done and evaluated(resumed) == [1]


def test_an_update_that_breaks_off_half_folded_makes_the_round_retry_not_the_driver_die(
    tmp_path: Path,
) -> None:
    settings = RoundSettings(rounds=1, min_nodes=3, round_timeout_s=3, eval_every=0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    died: list[BaseException] = []

    def drive() -> None:
        try:
            engine.run()
        except BaseException as err:  # the thread's death is what is tested
            died.append(err)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    sessions = {g: engine.join(g, Role.TRAIN, 10, ENC, "t") for g in "ABC"}
    tasks = {g: engine.next_task(s.session_id, None, 5) for g, s in sessions.items()}

    def broken() -> Iterator[TensorSlice]:  # the spool file fails to read half way
        yield TensorSlice(SPECS[0], 0, np.ones(10, np.float32))
        raise OSError("I/O error reading the spool")

    for group, replay in (("A", replay_of(1)), ("B", broken)):
        t = tasks[group]
        try:
            upload(engine, sessions[group], t, replay)
        except Rejection as refused:  # answered INTERNAL: the coordinator's disk, not B
            assert group == "B" and refused.reason == "INTERNAL"
    # the round's deadline passes with A's update (min_updates 1) and B's half: the round is
    # retried, as a new task, not averaged (and the driver did not die or hang)
    first_try = tasks["C"].task_id
    retry = tasks["C"]
    give_up = time.monotonic() + 20
    while retry.task_id == first_try and time.monotonic() < give_up:
        retry = engine.next_task(sessions["C"].session_id, None, 1)
    assert died == [] and driver.is_alive()
    assert retry.kind == TaskKind.TRAIN and retry.round == 1 and retry.task_id != first_try
    assert engine.completed_rounds() == 0
    for group, s in sessions.items():
        t = retry if group == "C" else engine.next_task(s.session_id, None, 5)
        assert t.task_id == retry.task_id
        upload(engine, s, t, replay_of(2))
    while engine.completed_rounds() < 1 and time.monotonic() < give_up:
        time.sleep(0.02)
    assert engine.completed_rounds() == 1
    assert all((w == 2.0).all() for w in engine.state.weights.values())  # none of B's half
    engine.stop()
    driver.join(10)


def test_a_session_waits_in_one_poll_at_a_time(tmp_path: Path) -> None:
    """Each waiting poll holds an RPC thread: one node opening many long polls could take them
    all. A newer poll of the same session answers the older one WAIT at once."""
    settings = RoundSettings(rounds=1, min_nodes=2, eval_every=0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")  # no quorum: nothing to hand out
    answers: list[tuple[TaskKind, float]] = []

    def poll(wait_s: float) -> None:
        started = time.monotonic()
        answers.append((engine.next_task(s.session_id, None, wait_s).kind, started))

    older = threading.Thread(target=poll, args=(10.0,))
    older.start()
    time.sleep(0.3)
    newer = threading.Thread(target=poll, args=(1.0,))
    newer.start()
    older.join(2.0)
    assert not older.is_alive()  # before: it waited its full 10 s beside the newer one
    assert answers and answers[0][0] == TaskKind.WAIT
    engine.stop()
    newer.join(15)


def test_a_poll_wakes_no_other_nodes_poll(tmp_path: Path) -> None:
    """Every poll woke every other node's waiting poll (one condition for everything): with
    200 nodes each poll cost 6 ms of CPU, O(nodes²) per round. A poll wakes only its own
    session's older poll; a task opening still wakes them all."""
    settings = RoundSettings(rounds=1, min_nodes=9, eval_every=0, heartbeat_interval_s=30.0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    waiting = [engine.join(g, Role.TRAIN, 10, ENC, "t") for g in "ABCDE"]
    busy = engine.join("F", Role.TRAIN, 10, ENC, "t")
    looks = {s.session_id: 0 for s in waiting}  # how often each waiting poll woke to look
    session_of = engine._sessions.lookup

    def counted(session_id: str, group: str | None, touch: bool = True) -> Any:
        if not touch and session_id in looks:
            looks[session_id] += 1
        return session_of(session_id, group, touch)

    engine._sessions.lookup = counted  # type: ignore[method-assign]
    answers: list[TaskKind] = []
    connected = threading.Event()
    connected.set()

    def poll(session_id: str) -> None:
        answers.append(engine.next_task(session_id, None, 60.0, alive=connected.is_set).kind)

    polls = [threading.Thread(target=poll, args=(s.session_id,)) for s in waiting]
    for thread in polls:
        thread.start()
    for _ in range(100):  # each waits once it has looked
        if all(looks.values()):
            break
        time.sleep(0.05)
    before = dict(looks)
    for _ in range(20):  # F polls again and again (no quorum: nothing for it either)
        assert engine.next_task(busy.session_id, None, 0.0).kind == TaskKind.WAIT
    time.sleep(0.5)  # a woken poll looks once it has the lock again
    assert looks == before, "F's polls woke the others"
    engine.stop()
    connected.clear()  # their calls are cut: they see it within STOPPING_POLL_S
    for thread in polls:
        thread.join(10.0)
    assert answers == [TaskKind.WAIT] * 5


def test_a_poll_whose_call_is_cancelled_after_stop_returns_soon(tmp_path: Path) -> None:
    """At shutdown, stop() wakes the long polls while their calls are still open; the server
    cancels the calls after. A poll then slept a whole heartbeat interval (here 30 s) before it
    saw its call was gone, and the process's exit waited for its thread."""
    settings = RoundSettings(rounds=1, min_nodes=2, eval_every=0, heartbeat_interval_s=30.0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")  # no quorum: the poll waits
    poll = LongPoll(engine, s.session_id)
    engine.stop()  # the service's shutdown: the engine first ...
    time.sleep(0.3)
    # ... then the server cancels the call: STOPPING_POLL_S (0.5 s) after, the poll ends; it was
    # the 30 s heartbeat interval
    assert poll.hang_up(10.0) == [TaskKind.WAIT]


def test_nodes_are_answered_while_a_round_is_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round's close held the engine's lock while it averaged, hashed and wrote the model:
    every node's call waited for the checkpoint (3.5 s with a 512 MB model, and past
    session_timeout_s every session would expire at once). Now only publishing takes the lock,
    and until then nodes see the model the checkpoint replaces."""
    settings = RoundSettings(rounds=1, min_nodes=1, min_updates=1, eval_every=0, eval_timeout_s=1.0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    writing, release = threading.Event(), threading.Event()
    real_save = rounds.save_state

    def slow_save(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("record") is not None or len(args) > 3:  # the round's checkpoint
            writing.set()
            release.wait(30)
        real_save(*args, **kwargs)

    monkeypatch.setattr(rounds, "save_state", slow_save)
    other = engine.join("B", Role.EVALUATE_ONLY, 0, ENC, "t")
    old_version = engine.model_version
    driver = start(engine)
    node = threading.Thread(target=serve, args=(engine,), daemon=True)
    node.start()
    try:
        assert writing.wait(30), "the round was not checkpointed"
        answered: list[tuple[int, bool]] = []
        call = threading.Thread(
            target=lambda: answered.append(engine.heartbeat(other.session_id, None))
        )
        call.start()
        call.join(10.0)  # it waited for `release` before
        assert answered == [(0, False)], "a heartbeat waited for the checkpoint"
        assert engine.completed_rounds() == 0 and engine.model_version == old_version
    finally:
        release.set()
    for _ in range(300):  # published once written
        if engine.completed_rounds() == 1:
            break
        time.sleep(0.1)
    assert engine.completed_rounds() == 1 and engine.model_version != old_version
    node.join(30)  # the run ends: B's final evaluation is given up after eval_timeout_s
    driver.join(30)
    assert engine.done


def test_a_wall_clock_step_neither_ends_a_round_nor_expires_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deadlines and session silence are measured on the monotonic clock. Before, an NTP step
    of the wall clock by an hour made the open round's update STALE and every session expired."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=60, session_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    t = engine.next_task(s.session_id, None, 5)
    assert t.kind == TaskKind.TRAIN
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)
    assert [x.group for x in engine.live_sessions()] == ["A"]
    upload(engine, s, t, replay_of(1))
    monkeypatch.setattr(time, "time", lambda: wall() - 3600.0)
    deadline = time.monotonic() + 10
    while engine.completed_rounds() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.completed_rounds() == 1
    engine.stop()
    driver.join(10)


def test_a_session_silent_just_past_session_timeout_is_not_live_nor_selected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node silent for longer than session_timeout_s must neither count towards the quorum nor
    be handed the next round (which would then wait for it). The engine's clock is frozen and
    moved by hand: A is live at exactly the timeout and not 1 s (1.03 x) later."""
    now = [time.monotonic()]
    clock = SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    for module in (rounds, node_calls, sessions):  # the engine's parts each read the clock
        monkeypatch.setattr(module, "time", clock)
    settings = RoundSettings(rounds=1, min_nodes=1, eval_every=0, session_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    now[0] += 30.0
    assert sorted(x.group for x in engine.live_sessions(Role.TRAIN)) == ["A", "B"]
    engine.heartbeat(b.session_id, None)  # B keeps its session alive, A stays silent
    now[0] += 1.0
    assert [x.group for x in engine.live_sessions()] == ["B"]
    assert [x.group for x in engine.live_sessions(Role.TRAIN)] == ["B"]

    driver = start(engine)
    try:
        t = engine.next_task(b.session_id, None, 5)
        assert t.kind == TaskKind.TRAIN
        upload(engine, b, t, replay_of(1))
        wait_for(lambda: engine.completed_rounds() == 1)
    finally:
        engine.stop()
        driver.join(10)
    record = engine.state.history.first
    assert record is not None
    assert record["selected"] == ["B"] and record["participants"] == ["B"], record


def test_a_round_gives_up_on_a_silent_node_only_once_its_session_is_no_longer_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round's wait for a silent node ends when its session would expire: not at exactly
    session_timeout_s of silence, when the session is still live (and counted for a quorum),
    but after it. The engine's clock is frozen and moved by hand."""
    now = [time.monotonic()]
    clock = SimpleNamespace(monotonic=lambda: now[0], time=time.time)
    for module in (rounds, node_calls, sessions):
        monkeypatch.setattr(module, "time", clock)
    settings = RoundSettings(rounds=1, min_nodes=2, eval_every=0, session_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    for group in ("A", "B"):
        engine.join(group, Role.TRAIN, 10, ENC, "t")
    t = engine._open(TaskKind.TRAIN, engine.live_sessions(Role.TRAIN), 600.0)
    now[0] += 30.0
    with engine._lock:
        engine._give_up_on_silent(t)
    assert len(engine.live_sessions(Role.TRAIN)) == 2 and t.answered == {}
    now[0] += 1.0
    with engine._lock:
        engine._give_up_on_silent(t)
    assert engine.live_sessions() == [] and t.answered == {"A": "silent", "B": "silent"}


def test_resuming_with_another_model_names_what_changed(tmp_path: Path) -> None:
    """Before: a ValueError (a traceback from the CLI) saying only that the model differs."""
    RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {"d_model": 64, "members": 3})
    with pytest.raises(InputError) as err:
        RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {"d_model": 64, "members": 1})
    assert str(err.value) == (
        f"{tmp_path}: the saved run's model differs from the configured one (members 3 -> 1); "
        "resume it with the same settings, or start a new run in another state folder"
    )
    with pytest.raises(InputError, match="the saved run used encoder 'enc', this coordinator"):
        RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, "other", {"d_model": 64})
    # a setting the saved run did not have is a change too (its default may not be the run's)
    with pytest.raises(
        InputError, match=r"model differs from the configured one \(mlp_layers None -> 2\)"
    ):
        RoundEngine(
            RoundSettings(rounds=1),
            WEIGHTS,
            tmp_path,
            ENC,
            {"d_model": 64, "members": 3, "mlp_layers": 2},
        )


def test_updates_a_stopped_coordinator_was_receiving_are_deleted_when_it_starts(
    tmp_path: Path,
) -> None:
    """A spool is an update half received when the coordinator stopped: no round can use it."""
    RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {})
    spool = tmp_path / "spool"
    (spool / "a1b2.spool").write_bytes(b"x" * 100)
    (spool / "notes.txt").write_text("not ours")
    RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {})
    assert sorted(p.name for p in spool.iterdir()) == ["notes.txt"]


def test_the_model_version_names_its_round_even_when_a_round_leaves_the_weights_alike(
    tmp_path: Path,
) -> None:
    """Each round's model is a new version ("<run>-r<round>-<digest>"), also when the updates
    leave the weights as they were: a version names one round's model, not just its bytes."""
    engine = RoundEngine(RoundSettings(rounds=2, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    versions = []
    try:
        while not engine.done:
            t = engine.next_task(s.session_id, None, 0.5)
            if t.kind == TaskKind.TRAIN:
                versions.append(t.model_version)
                upload(engine, s, t, replay_of(0.0))
            elif t.kind == TaskKind.EVALUATE:
                e = GroupEvaluation("A", 5, 0.5, 0.4, 0.3, 0.3)
                engine.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
        driver.join(10)
    finally:
        engine.stop()
    assert engine.done
    digest = engine.model_digest.hex()[:12]
    run = engine.run_id
    assert versions == [f"{run}-r0-{digest}", f"{run}-r1-{digest}"]
    assert engine.model_version == f"{run}-r2-{digest}"


def test_the_evaluation_at_start_runs_once_also_when_the_run_is_resumed_before_round_one(
    tmp_path: Path,
) -> None:
    settings = RoundSettings(rounds=1, eval_every=0, eval_at_start=True, eval_timeout_s=10)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    s = first.join("A", Role.TRAIN, 10, ENC, "t")
    t = first.next_task(s.session_id, None, 10)
    assert (t.kind, t.round) == (TaskKind.EVALUATE, 0)
    e = GroupEvaluation("A", 5, 0.5, 0.4, 0.3, 0.3)
    first.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
    wait_for(lambda: evaluated(first) == [0])
    first.stop()  # before round 1 opened (or while it is open)
    driver.join(10)
    assert first.completed_rounds() == 0
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    serve(resumed)
    driver.join(20)
    assert resumed.done and evaluated(resumed) == [0, 1] and not resumed.evaluated_again


def test_a_final_evaluation_owed_at_restart_is_asked_for_once(tmp_path: Path) -> None:
    """Stopped between its last round and the final evaluation, a run resumes with that
    evaluation: one try, nodes silent or not (not one as an evaluation due, then another as
    the final one), after which the run is done, answered or not (it was not stopped)."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=10, eval_timeout_s=0.5)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first, stop_after_round=1)
    driver.join(20)
    assert first.completed_rounds() == 1 and evaluated(first) == []
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    s = resumed.join("A", Role.TRAIN, 10, ENC, "t")
    asked = []
    while not resumed.done and driver.is_alive():
        t = resumed.next_task(s.session_id, None, 0.2)
        if t.kind == TaskKind.EVALUATE and t.task_id not in asked:
            asked.append(t.task_id)  # and never answered
    driver.join(10)
    assert resumed.done and len(asked) == 1


def test_a_final_evaluation_nobody_answers_ends_the_run_without_waiting_for_a_quorum_again(
    tmp_path: Path,
) -> None:
    """The only node trains the last round and leaves: the final evaluation, tried and
    unanswered, is tried once more with whoever is left (nobody), and the run is done; it does
    not wait for a quorum again, which with no quorum_timeout_s is for ever."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=30, eval_timeout_s=0.5)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    try:
        t = engine.next_task(s.session_id, None, 10)
        assert t.kind == TaskKind.TRAIN
        upload(engine, s, t, replay_of(1.0))
        engine.leave(s.session_id, None, "done")
        driver.join(20)
        assert not driver.is_alive() and engine.done
        assert engine.completed_rounds() == 1 and evaluated(engine) == []
    finally:
        engine.stop()
        driver.join(10)


@pytest.mark.parametrize("eval_every", [1, 0])
def test_the_last_rounds_evaluation_does_not_wait_for_groups_that_are_away(
    tmp_path: Path, eval_every: int
) -> None:
    """The evaluation due after the last round (whatever eval_every) is the final one: it runs
    with the nodes there, as every evaluation of a running federation does; only one owed at a
    restart waits up to eval_timeout_s for the run's groups (here held-out H, which never
    came)."""
    settings = RoundSettings(
        rounds=1, eval_every=eval_every, evaluate_only=("H",), round_timeout_s=10, eval_timeout_s=60
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    serve(engine)
    driver.join(20)
    assert engine.done and evaluated(engine) == [1]
    last = engine.final_evaluation()
    assert last is not None and last["missing_held_out"] == ["H"]


def resume_and_answer_the_owed_evaluation(
    settings: RoundSettings, state: Path, second: str, role: Role
) -> RoundEngine:
    """Restart on `state`, where round 1 is done and its evaluation owed. A joins first and
    makes the quorum, yet gets no evaluation until `second` joins too; then both answer it."""
    resumed = RoundEngine(settings, WEIGHTS, state, ENC, {})
    driver = start(resumed)
    try:
        a = resumed.join("A", Role.TRAIN, 10, ENC, "t")
        assert resumed.next_task(a.session_id, None, 1.0).kind != TaskKind.EVALUATE
        samples = 10 if role == Role.TRAIN else 0
        other = resumed.join(second, role, samples, ENC, "t")
        for s, group in ((a, "A"), (other, second)):
            t = resumed.next_task(s.session_id, None, 10)
            assert (t.kind, t.round) == (TaskKind.EVALUATE, 1)
            e = GroupEvaluation(group, 5, 0.5, 0.4, 0.3, 0.3)
            resumed.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
        wait_for(lambda: evaluated(resumed) == [1])
    finally:
        resumed.stop()
        driver.join(10)
    return resumed


def test_an_evaluation_owed_at_restart_waits_for_the_last_rounds_trainers(tmp_path: Path) -> None:
    """A and B trained round 1; the coordinator stopped before evaluating it. Restarted, with
    the quorum (1) made by A, it waits for B too before it evaluates (nodes come back one by
    one, and the first alone would be the evaluation)."""
    settings = RoundSettings(rounds=2, eval_every=1, round_timeout_s=10, eval_timeout_s=30)
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    nodes = [first.join(g, Role.TRAIN, 10, ENC, "t") for g in ("A", "B")]
    driver = start(first)
    for s in nodes:
        t = first.next_task(s.session_id, None, 10)
        assert (t.kind, t.round) == (TaskKind.TRAIN, 1)
        upload(first, s, t, replay_of(1.0))
    wait_for(lambda: first.completed_rounds() == 1)
    first.stop()
    driver.join(10)
    assert evaluated(first) == []

    resumed = resume_and_answer_the_owed_evaluation(settings, tmp_path, "B", Role.TRAIN)
    last = resumed.final_evaluation()
    assert last is not None and last["groups"] == ["A", "B"]


def test_an_evaluation_owed_at_restart_waits_for_a_held_out_group_no_evaluation_had(
    tmp_path: Path,
) -> None:
    """Held-out H had not joined before the coordinator stopped after round 1 (no evaluation
    yet, so none had H). Restarted, with the quorum made by A, the owed evaluation waits for
    H too, as for every evaluate-only group, and has its figures."""
    settings = RoundSettings(
        rounds=2, eval_every=1, round_timeout_s=10, eval_timeout_s=30, evaluate_only=("H",)
    )
    first = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(first)
    serve(first, stop_after_round=1)
    driver.join(20)
    assert first.completed_rounds() == 1 and evaluated(first) == []

    resumed = resume_and_answer_the_owed_evaluation(settings, tmp_path, "H", Role.EVALUATE_ONLY)
    owed = next(resumed.state.evaluations.records())
    assert owed["round"] == 1 and owed["groups"] == ["A", "H"]


def test_a_restarted_coordinator_owes_the_end_to_every_group_that_trained(tmp_path: Path) -> None:
    """B trained round 1 and left (A trained round 2): no evaluation names B, but its node
    must still hear the run's end after a restart (it would retry for ever)."""
    settings = RoundSettings(rounds=2, eval_every=0, round_timeout_s=10, eval_timeout_s=10)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    driver = start(engine)
    t = engine.next_task(b.session_id, None, 10)
    assert t.kind == TaskKind.TRAIN
    upload(engine, b, t, replay_of(1.0))
    wait_for(lambda: engine.completed_rounds() == 1)
    engine.leave(b.session_id, None, "gone")
    serve(engine)  # A: round 2 and the final evaluation
    driver.join(20)
    final = engine.final_evaluation()
    assert engine.done and final is not None and final["groups"] == ["A"] and not final["missing"]
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert again.unaware_of_end() == ["A", "B"]


def test_no_quorum_within_quorum_timeout_stops_the_run_unfinished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """... and the engine is then stopping: a node's poll looks every STOPPING_POLL_S whether
    its call is gone (the server cancels the calls next), not every heartbeat interval."""
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=1, quorum_timeout_s=0.5, heartbeat_interval_s=30.0
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")  # 1 of 2
    with caplog.at_level(logging.ERROR, logger="pluralfed.coordinator"):
        driver = start(engine)
        driver.join(10)
    assert not driver.is_alive() and not engine.done and engine.completed_rounds() == 0
    assert "no quorum after 0 s; stopping" in caplog.text
    assert LongPoll(engine, s.session_id).hang_up(5.0) == [TaskKind.WAIT]


def test_an_empty_evaluate_only_means_no_held_out_groups(tmp_path: Path) -> None:
    """evaluate_only set (here to [], every group trains) says which groups are held out, not
    the roles nodes claimed before: H, evaluate-only in round 1 when each node said its role,
    is a missing group in a resumed run's evaluation, not a missing held-out one."""
    settings = RoundSettings(rounds=1, eval_every=1, round_timeout_s=10, eval_timeout_s=10)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    held = evaluates_once_then_leaves(engine, "H")
    serve(engine)
    driver.join(20)
    held.join(20)
    first = engine.final_evaluation()
    assert first is not None and first["groups"] == ["A", "H"]
    more = dataclasses.replace(settings, rounds=2, evaluate_only=())
    again = RoundEngine(more, WEIGHTS, tmp_path, ENC, {})
    driver = start(again)
    serve(again)
    driver.join(20)
    last = again.final_evaluation()
    assert again.done and last is not None and last["round"] == 2
    assert last["missing"] == ["H"] and last["missing_held_out"] == []


def a_trains_while_b_is_silent(
    settings: RoundSettings, state_dir: Path, *, b_takes_its_task: bool, wait_s: float
) -> RoundRecord:
    """One round of A and B in which A trains and uploads and B makes no call (after taking
    its task, if `b_takes_its_task`); the round's history record, once it ends within `wait_s`."""
    engine = RoundEngine(settings, WEIGHTS, state_dir, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    driver = start(engine)
    try:
        t = engine.next_task(a.session_id, None, 10)
        assert t.kind == TaskKind.TRAIN
        if b_takes_its_task:
            assert engine.next_task(b.session_id, None, 10).kind == TaskKind.TRAIN
        upload(engine, a, t, replay_of(1.0))
        wait_for(lambda: engine.completed_rounds() == 1, timeout=wait_s)
    finally:
        engine.stop()
        driver.join(10)
    record = engine.state.history.last
    assert record is not None
    return record


def test_a_round_open_when_the_coordinator_stops_is_abandoned_not_committed(
    tmp_path: Path,
) -> None:
    """A's update is in (enough for min_updates), B is still training when the coordinator is
    stopped: the round is abandoned, as the signal's line says, and a resume retries it; it is
    not checkpointed with the updates it had so far."""
    settings = RoundSettings(rounds=1, min_nodes=2, min_updates=1, eval_every=0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    engine.join("B", Role.TRAIN, 10, ENC, "t")
    driver = start(engine)
    try:
        t = engine.next_task(a.session_id, None, 10)
        assert t.kind == TaskKind.TRAIN
        upload(engine, a, t, replay_of(1.0))
    finally:
        engine.stop()
        driver.join(10)
    assert not driver.is_alive() and not engine.done
    assert engine.completed_rounds() == 0 and engine.state.history.last is None
    saved = load_state(tmp_path)
    assert saved is not None and saved.completed_rounds == 0


def test_a_round_closes_at_its_deadline_without_the_silent_node(tmp_path: Path) -> None:
    """B is connected but never answers: round_timeout_s (1 s) after opening, the round closes
    with A's update (min_updates 1), not some seconds later (the margins leave a loaded machine
    4 s; a deadline 5 s late fails)."""
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=1, eval_every=0, round_timeout_s=1.0
    )
    # B is silent, its session alive (60 s)
    record = a_trains_while_b_is_silent(settings, tmp_path, b_takes_its_task=False, wait_s=5.5)
    assert record["participants"] == ["A"]
    assert record["selected"] == ["A", "B"] and record["seconds"] < 5.0
    assert record["bytes_out_model"] == 2 * 80  # the model, to each of the nodes it chose


def test_a_round_stops_waiting_for_a_node_whose_session_expired(tmp_path: Path) -> None:
    """B makes no call after its task (no heartbeat): session_timeout_s after its last call
    the round stops waiting for it, long before round_timeout_s."""
    settings = RoundSettings(
        rounds=1,
        min_nodes=2,
        min_updates=1,
        eval_every=0,
        round_timeout_s=60.0,
        session_timeout_s=1.0,
        heartbeat_interval_s=0.5,
    )
    record = a_trains_while_b_is_silent(settings, tmp_path, b_takes_its_task=True, wait_s=10.0)
    assert record["participants"] == ["A"]


def test_a_held_out_group_asked_and_silent_is_waited_for_after_a_restart(
    tmp_path: Path,
) -> None:
    """Diff review L8: the run's evaluations listed H (connected, asked, silent) and J (never
    connected) alike as missing held-out groups, so a restarted coordinator treated H as one
    that may never come: it neither waited for H's evaluation nor told H the run had ended."""
    settings = RoundSettings(rounds=1, eval_every=0, eval_timeout_s=1, evaluate_only=("H", "J"))
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    silent = engine.join("H", Role.EVALUATE_ONLY, 10, ENC, "t")  # joins, never answers
    serve(engine)
    driver.join(20)
    final = engine.final_evaluation()
    assert engine.done and final is not None and final["missing_held_out"] == ["H", "J"]
    assert final["held_out_unconnected"] == ["J"]
    engine.leave(silent.session_id, None, "gone")
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert again.unaware_of_end() == ["A", "H"]  # before: ["A"]; J may never come
    assert again._evaluated_groups() == {"A", "H"}


def test_held_out_groups_that_never_joined_are_missing_from_the_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Operator review: evaluate_only groups whose node never joined were left out of the
    evaluation record ("missing": []), and its line gave the figures of 1 of 3 held-out groups
    as the held-out figures. The run's end still waits for no node that never came."""
    settings = RoundSettings(
        rounds=1, eval_every=0, eval_timeout_s=10, evaluate_only=("H", "J", "K")
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    joined = threading.Event()
    held = threading.Thread(
        target=evaluate_only, args=(engine, "H", 0.4), kwargs={"joined": joined}, daemon=True
    )
    held.start()
    assert joined.wait(10)
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        serve(engine)
        driver.join(20)
    held.join(20)
    final = engine.final_evaluation()
    assert engine.done and final is not None and final["groups"] == ["A", "H"]
    assert final["missing"] == ["J", "K"] and final["missing_held_out"] == ["J", "K"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation")]
    assert lines == [
        "evaluation after round 1: training 0.5000 over 1 group (worst 0.5000, FI 1.000)  "
        "held-out 0.4000 over 1 of 3 groups (worst 0.4000, FI 1.000; missing: J, K)"
    ]
    assert engine.unaware_of_end() == []
    saved = load_state(tmp_path)
    assert saved is not None
    last = saved.evaluations.last
    assert last is not None and last["missing"] == ["J", "K"]


def test_an_evaluate_only_node_asked_and_silent_is_a_missing_held_out_group(
    tmp_path: Path,
) -> None:
    """Without evaluate_only, a group is held out when its node joined evaluate-only: also
    one asked to evaluate that never reported (its figures are missing from the held-out
    ones, not from the training ones), though no evaluation had it before."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=30, eval_timeout_s=1)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    engine.join("H", Role.EVALUATE_ONLY, 0, ENC, "t")  # connected, never answers
    driver = start(engine)
    serve(engine)
    driver.join(20)
    final = engine.final_evaluation()
    assert engine.done and final is not None and final["groups"] == ["A"]
    assert final["missing"] == ["H"] and final["missing_held_out"] == ["H"]
    assert final["held_out_unconnected"] == []  # it was asked


def test_the_quorum_wait_names_who_is_missing_and_says_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operator review: "waiting for a quorum: 2 of 3 training nodes" was logged once, however
    long the wait, and named no group. Now it names the allow-listed groups not connected, when
    that changes and again every QUORUM_LOG_INTERVAL_S (here 1 s)."""
    monkeypatch.setattr(rounds, "QUORUM_LOG_INTERVAL_S", 1.0)
    settings = RoundSettings(rounds=1, min_nodes=2, eval_every=0, evaluate_only=("H",))
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    engine.allowed_trainers = frozenset({"A", "B", "C"})

    def waits() -> list[str]:
        return [m for r in caplog.records if (m := r.getMessage()).startswith("waiting for a q")]

    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        driver = start(engine)
        wait_for(lambda: len(waits()) >= 1)
        engine.join("A", Role.TRAIN, 10, ENC, "t")
        wait_for(lambda: len(waits()) >= 3)  # A came, then the same again a second later
        engine.join("H", Role.EVALUATE_ONLY, 0, ENC, "t")  # no trainer: not named either way
        engine.stop()
        driver.join(10)
    # the distinct lines in order, then the repeat (on a loaded machine the first line may
    # also come twice, before A joins)
    lines = waits()
    distinct = [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]
    assert distinct[:2] == [
        "waiting for a quorum: 0 of 2 training nodes; allow-listed groups not connected: A, B, C",
        "waiting for a quorum: 1 of 2 training nodes; allow-listed groups not connected: B, C",
    ]
    assert lines.count(distinct[1]) >= 2
    assert all("H" not in line for line in waits())


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _rebuilt_metrics(folder: Path) -> str:
    """metrics.jsonl as made from the checkpointed state alone."""
    state = load_state(folder)
    assert state is not None
    rows: list[Mapping[str, Any]] = [{"kind": "round", **r} for r in state.history.records()]
    rows += state.evaluations.records()
    rows.sort(key=lambda r: (r["round"], r.get("kind") == "evaluation"))
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def test_metrics_rows_are_appended_and_the_file_is_mended_after_a_crash(tmp_path: Path) -> None:
    """Soak review H1: metrics.jsonl was rebuilt from the whole history after every round (with
    state.json, also rewritten whole), so a round's cost grew with the run's length. Now each
    round appends its row (the file stays the same file), and a process's first write rebuilds
    it, which mends a row a crash cut off or lost."""
    settings = RoundSettings(rounds=4, eval_every=2, round_timeout_s=10, eval_timeout_s=10)
    path = tmp_path / "metrics.jsonl"
    inodes: list[int] = []
    first = RoundEngine(
        settings, WEIGHTS, tmp_path, ENC, {}, on_round=lambda _r: inodes.append(path.stat().st_ino)
    )
    driver = start(first)
    serve(first, stop_after_round=2)
    driver.join(20)
    inode = path.stat().st_ino
    assert inodes == [inode, inode]  # round 2's row was appended to the file round 1 wrote
    assert path.read_text() == _rebuilt_metrics(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(x).get("kind") for x in lines] == ["round", "round"]  # stopped before
    # the evaluation of round 2; a crash lost round 2's row and cut round 1's
    path.write_text(lines[0][:20])
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    serve(resumed)
    driver.join(20)
    assert resumed.done and evaluated(resumed) == [2, 4]
    text = path.read_text()
    assert text == _rebuilt_metrics(tmp_path)
    assert [(r["round"], r.get("kind")) for r in map(json.loads, text.splitlines())] == [
        (1, "round"),
        (2, "round"),
        (2, "evaluation"),
        (3, "round"),
        (4, "round"),
        (4, "evaluation"),
    ]
    assert path.stat().st_ino != inode  # rebuilt once by the resumed process ...
    rebuilt = path.stat().st_ino
    again = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert again.finished_at_start
    assert path.stat().st_ino == rebuilt  # ... (nothing written by a start that finds it right)
    # a row cut by a crash is mended by the next start itself, even one that never writes a
    # row (a finished run started again whose nodes do not come back; session review L1)
    path.write_text(text[:-30])
    RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    assert path.read_text() == text


def test_a_session_remembers_only_the_open_tasks_answer(tmp_path: Path) -> None:
    """Soak review L1: a session kept the id of every task it ever answered (one a round, for
    a run's whole length), and a rejoin copied them all over; only the open task's is read."""
    settings = RoundSettings(rounds=6, eval_every=2, round_timeout_s=10, eval_timeout_s=10)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    answered: list[int] = []
    while not engine.done:
        t = engine.next_task(s.session_id, None, 0.5)
        if t.kind == TaskKind.TRAIN:
            upload(engine, s, t, replay_of(1))
        elif t.kind == TaskKind.EVALUATE:
            e = GroupEvaluation("A", 5, 0.5, 0.4, 0.3, 0.3)
            engine.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
        else:
            continue
        answered.append(len(s.answered))
    driver.join(10)
    assert engine.done and len(answered) == 9  # 6 rounds, 3 evaluations
    assert max(answered) == 1  # before: 1, 2, ..., 9


def test_connection_checks_in_a_loop_log_a_line_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Soak review M3: every passed `node check` was a line, so a check run as a health probe
    grew the log for ever; an accepted update was a line too (one a node a round), now -v's."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        for _ in range(5):
            engine.join("A", Role.TRAIN, 10, ENC, "t", peer="ipv4:10.0.0.7:1", check_only=True)
        engine.join("B", Role.TRAIN, 10, ENC, "t", check_only=True)
    lines = [r.getMessage() for r in caplog.records if "connection check" in r.getMessage()]
    assert lines == [
        "node A passed a connection check (from ipv4:10.0.0.7:1)",
        "node B passed a connection check (from ?)",
    ]
    engine._check_lines._seen["A"] = (time.monotonic() - 61, 4)  # a minute on
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        engine.join("A", Role.TRAIN, 10, ENC, "t", check_only=True)
    assert caplog.records[-1].getMessage() == (
        "node A passed a connection check (from ?) (4 more like it in the last 61 s)"
    )


def test_a_round_every_node_fails_at_once_is_tried_again_after_a_growing_pause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose every task fails at once (its audit folder is a file, say): the round was
    tried again at once, about 3 times a second for ever, each try with its log lines."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    tasks: list[float] = []
    deadline = time.monotonic() + 4.0
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        while time.monotonic() < deadline:
            t = engine.next_task(s.session_id, None, 0.2)
            if t.kind == TaskKind.TRAIN:
                tasks.append(time.monotonic())
                assert engine.open_task() == "train round 1"  # what a signal says is abandoned
                engine.heartbeat(s.session_id, None, t.task_id, failed=True, message="disk full")
    # tries at about 0, 1, 3 s (pauses of 1 and 2 s): before, a dozen in the first second alone
    assert 2 <= len(tasks) <= 3, tasks
    assert tasks[1] - tasks[0] >= 0.9, tasks
    retries = [r.getMessage() for r in caplog.records if "retrying the round" in r.getMessage()]
    assert retries[:2] == [
        "round 1: 0 updates, 1 needed: retrying the round in 1 s",
        "round 1: 0 updates, 1 needed: retrying the round in 2 s",
    ]
    engine.leave(s.session_id, None)
    serve(engine)  # a node that answers: the run ends
    driver.join(20)
    assert engine.done and engine.completed_rounds() == 1


def test_an_open_evaluation_is_named_as_an_evaluate_round(tmp_path: Path) -> None:
    """What a signal says is abandoned: "evaluate round 1", as the task is known elsewhere (the
    node's config, the logs), for an evaluation as for a training round."""
    settings = RoundSettings(rounds=1, eval_every=1, round_timeout_s=30, eval_timeout_s=30)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    kinds: list[TaskKind] = []
    try:
        while TaskKind.EVALUATE not in kinds:
            t = engine.next_task(s.session_id, None, 0.5)
            if t.kind == TaskKind.TRAIN and t.kind not in kinds:
                kinds.append(t.kind)
                assert engine.open_task() == "train round 1"
                upload(engine, s, t, replay_of(1.0))
            elif t.kind == TaskKind.EVALUATE:
                kinds.append(t.kind)
                assert engine.open_task() == "evaluate round 1"
    finally:
        engine.stop()
        driver.join(10)
    assert kinds == [TaskKind.TRAIN, TaskKind.EVALUATE]


def test_the_retry_pause_starts_over_after_a_try_that_ran_to_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pause doubles only over early failures in a row: a try that waited out its deadline
    was the pause, and the next early failure pauses 1 s again, not 2 s."""
    settings = RoundSettings(rounds=1, eval_every=0, round_timeout_s=0.5)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    tasks: list[str] = []
    try:
        with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
            while len(tasks) < 4:
                t = engine.next_task(s.session_id, None, 0.2)
                if t.kind != TaskKind.TRAIN or t.task_id in tasks:
                    continue
                tasks.append(t.task_id)
                if len(tasks) != 2:  # the second try: silent until its deadline
                    engine.heartbeat(s.session_id, None, t.task_id, failed=True, message="disk")
    finally:
        engine.stop()
        driver.join(10)
    retries = [r.getMessage() for r in caplog.records if "retrying the round" in r.getMessage()]
    assert retries[:3] == [
        "round 1: 0 updates, 1 needed: retrying the round in 1 s",
        "round 1: 0 updates, 1 needed: retrying the round",
        "round 1: 0 updates, 1 needed: retrying the round in 1 s",
    ]


def test_the_retry_pause_doubles_from_a_second_up_to_a_minute(tmp_path: Path) -> None:
    """The pauses of early failures in a row: 1, 2, 4 ... s, never more than RETRY_PAUSE_MAX_S
    (a node that failed all night is tried again each minute, not once in hours); none after
    a try that ran to its deadline, and the next early failure starts at 1 s again."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})

    def tried(deadline: float) -> OpenTask:
        return OpenTask(TaskKind.TRAIN, "t", 1, engine.model_version, deadline, {})

    early = tried(time.monotonic() + 3600)
    assert [engine._retry_pause(early) for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert engine._retry_pause(tried(time.monotonic() - 1)) == 0
    assert engine._retry_pause(early) == 1


def test_a_round_with_fewer_updates_than_min_updates_is_retried_not_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=2, eval_every=0, round_timeout_s=0.5
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    engine.join("B", Role.TRAIN, 10, ENC, "t")  # silent
    driver = start(engine)
    try:
        with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
            t = engine.next_task(a.session_id, None, 10)
            upload(engine, a, t, replay_of(1.0))
            wait_for(lambda: "round 1: 1 updates, 2 needed: retrying the round" in caplog.text)
        assert engine.completed_rounds() == 0 and engine.state.history.last is None
    finally:
        engine.stop()
        driver.join(10)


def test_a_group_an_earlier_evaluation_had_is_missing_from_a_later_one(tmp_path: Path) -> None:
    """B evaluated round 1 and left: round 2's evaluation, by A alone, names B as missing (its
    figures would otherwise pass for the same groups' as round 1's)."""
    settings = RoundSettings(rounds=2, eval_every=1, round_timeout_s=10, eval_timeout_s=10)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    sessions = {g: engine.join(g, Role.TRAIN, 10, ENC, "t") for g in ("A", "B")}

    def node(group: str) -> None:
        s = sessions[group]
        while not engine.done:
            t = engine.next_task(s.session_id, None, 0.5)
            if t.kind == TaskKind.TRAIN:
                upload(engine, s, t, replay_of(1.0))
            elif t.kind == TaskKind.EVALUATE:
                e = GroupEvaluation(group, 5, 0.5, 0.4, 0.3, 0.3)
                engine.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
                if group == "B":
                    engine.leave(s.session_id, None, "gone")
                    return
            elif t.kind == TaskKind.SHUTDOWN:
                return

    b = threading.Thread(target=node, args=("B",), daemon=True)
    b.start()
    driver = start(engine)
    node("A")
    driver.join(20)
    b.join(10)
    records = engine.state.evaluations.records()
    assert [(r["round"], r["groups"], r["missing"]) for r in records] == [
        (1, ["A", "B"], []),
        (2, ["A"], ["B"]),
    ]
