"""What the round engine refuses from nodes and from its own state folder, each with the refusal
that says why, and nothing of it taken: update metric names that are empty, not printable or too
long; a training node that joins without examples; an evaluation report from a session the
evaluation did not ask; a run resumed with another text encoder or model, or from a state.json of
another version. Also what a heartbeat is told to drop. Real RoundEngine, driven in process as
tests/test_engine_recovery.py does."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedharness import scaled, wait_until
from test_engine_recovery import ENC, WEIGHTS, replay_of, serve, start

import coordinator.node_calls as node_calls_module
from coordinator.rounds import RoundEngine
from coordinator.sessions import NodeSession, Role
from coordinator.settings import RoundSettings
from coordinator.state import STATE_FILE, STATE_VERSION
from coordinator.tasks import TaskKind, TaskSpec
from coordinator.validation import MAX_METRIC_NAME, Rejection, clipped
from pluralfed.errors import InputError
from pluralfed.evaluation import GroupEvaluation

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[tuple[RoundEngine, threading.Thread]]:
    """An engine of one training round (then its final evaluation) for two nodes, running."""
    settings = RoundSettings(
        rounds=1,
        min_nodes=2,
        eval_every=0,
        round_timeout_s=scaled(60),
        eval_timeout_s=scaled(60),
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    try:
        yield engine, driver
    finally:
        engine.stop()
        driver.join(scaled(10))


def upload(
    engine: RoundEngine, s: NodeSession, t: TaskSpec, metrics: Mapping[str, float], value: float
) -> None:
    engine.accept_update(
        s.session_id, None, t.task_id, t.round, 10, metrics, replay_of(value), 80, t.model_version
    )


def refusal(call: Any, *args: Any) -> Rejection:
    with pytest.raises(Rejection) as err:
        call(*args)
    return err.value


# ------------------------------------------------------------------------------- update metrics


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("", "''"),
        ("lo\nss", r"'lo\nss'"),
        ("\x1b[31mloss", r"'\x1b[31mloss'"),
        ("loss\u200b", r"'loss\u200b'"),
        ("m" * (MAX_METRIC_NAME + 1), repr("m" * MAX_METRIC_NAME)),
    ],
    ids=["empty", "newline", "terminal escape", "zero-width space", "65 characters"],
)
def test_update_metric_names_must_be_short_and_printable(
    driven: tuple[RoundEngine, threading.Thread], name: str, shown: str
) -> None:
    engine, _ = driven
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    task = engine.next_task(a.session_id, None, scaled(5))
    assert task.kind == TaskKind.TRAIN
    assert engine.next_task(b.session_id, None, scaled(5)).task_id == task.task_id

    refused = refusal(upload, engine, a, task, {name: 0.5, "loss": 0.5}, 1.0)
    message = f"update from A: metric name {shown} must be 1 to 64 printable characters"
    assert (refused.code, refused.reason, refused.message) == (
        "INVALID_ARGUMENT",
        "MALFORMED",
        message,
    )
    # final: A's round is decided, its good copy is not taken
    assert refusal(upload, engine, a, task, {"loss": 0.5}, 1.0).reason == "ALREADY_REJECTED"

    longest = "m" * MAX_METRIC_NAME  # the control: a name of the longest length is taken
    upload(engine, b, task, {longest: 1.0}, 3.0)
    wait_until(lambda: engine.completed_rounds() == 1, 30, "round 1 to complete")
    record = engine.state.history.first
    assert record is not None
    assert record["participants"] == ["B"] and record["node_metrics"] == {"B": {longest: 1.0}}
    assert record["outcomes"]["A"] == f"rejected: {message}"
    for weights in engine.state.weights.values():  # the average of B's update alone
        np.testing.assert_array_equal(weights, np.full(10, 3.0, np.float32))


# ------------------------------------------------------------------------------- join


@pytest.mark.parametrize("examples", [0, -1])
def test_a_training_node_without_examples_may_not_join(tmp_path: Path, examples: int) -> None:
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    refused = refusal(engine.join, "A", Role.TRAIN, examples, ENC, "t")
    assert (refused.code, refused.message) == (
        "INVALID_ARGUMENT",
        "training node 'A' reports no examples",
    )
    assert engine.live_sessions() == []
    # the controls: one example is enough to train, an evaluate-only node needs none
    assert engine.join("A", Role.TRAIN, 1, ENC, "t").num_examples == 1
    engine.join("J", Role.EVALUATE_ONLY, 0, ENC, "t")
    assert sorted(s.group for s in engine.live_sessions()) == ["A", "J"]


# ------------------------------------------------------------------------------- evaluation


def report(engine: RoundEngine, s: NodeSession, t: TaskSpec, group: str) -> None:
    evaluation = GroupEvaluation(group, 5, 0.5, 0.4, 0.3, 0.3)
    engine.accept_evaluation(s.session_id, None, t.task_id, t.round, evaluation, t.model_version)


def trained_to_the_final_evaluation(
    engine: RoundEngine,
) -> tuple[NodeSession, NodeSession, TaskSpec]:
    """Training nodes A and B, their one round trained, and A's task of the final evaluation
    (open for A and B)."""
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    for s, value in ((a, 1.0), (b, 3.0)):
        task = engine.next_task(s.session_id, None, scaled(5))
        assert task.kind == TaskKind.TRAIN
        upload(engine, s, task, {}, value)
    evaluation = engine.next_task(a.session_id, None, scaled(5))
    assert evaluation.kind == TaskKind.EVALUATE
    return a, b, evaluation


def test_an_evaluation_from_a_session_not_asked_to_evaluate_is_refused(
    driven: tuple[RoundEngine, threading.Thread],
) -> None:
    engine, driver = driven
    a, b, evaluation = trained_to_the_final_evaluation(engine)

    # nodes that joined after it opened were not asked, in either role
    late_judge = engine.join("J", Role.EVALUATE_ONLY, 0, ENC, "t")
    late_trainer = engine.join("C", Role.TRAIN, 10, ENC, "t")
    for late in (late_judge, late_trainer):
        refused = refusal(report, engine, late, evaluation, late.group)
        assert (refused.code, refused.message) == (
            "FAILED_PRECONDITION",
            f"{late.group} was not asked to evaluate",
        )

    report(engine, a, evaluation, "A")
    report(engine, b, engine.next_task(b.session_id, None, scaled(5)), "B")
    driver.join(scaled(20))
    assert engine.done
    record = engine.state.evaluations.last
    assert record is not None
    assert record["groups"] == ["A", "B"] and record["missing"] == []
    assert sorted(record["per_group"]) == ["A", "B"]


def test_a_report_for_another_group_is_refused_and_the_reporters_own_still_counts(
    driven: tuple[RoundEngine, threading.Thread],
) -> None:
    """The engine's own check, beside the server's certificate check (a caller of None is a
    plaintext test channel): A may not report B's figures, and its refusal is no answer."""
    engine, driver = driven
    a, b, evaluation = trained_to_the_final_evaluation(engine)
    refused = refusal(report, engine, a, evaluation, "B")
    assert (refused.code, refused.message) == (
        "PERMISSION_DENIED",
        "A may report only its own group, not 'B'",
    )
    assert engine._task is not None and engine._task.evaluations == {}
    assert "A" not in engine._task.answered

    report(engine, a, evaluation, "A")
    report(engine, b, engine.next_task(b.session_id, None, scaled(5)), "B")
    driver.join(scaled(20))
    record = engine.state.evaluations.last
    assert engine.done and record is not None and record["groups"] == ["A", "B"]


def test_an_update_naming_the_closed_evaluation_is_stale_not_a_late_answer_to_it(
    driven: tuple[RoundEngine, threading.Thread],
) -> None:
    """Only an answer of the closed round's own kind is a repeat of it: a training update naming
    the evaluation task just closed is a stale update (FAILED_PRECONDITION), not an update that
    came too late for that round (DEADLINE_EXCEEDED)."""
    engine, driver = driven
    a, b, t = trained_to_the_final_evaluation(engine)
    report(engine, a, t, "A")
    report(engine, b, engine.next_task(b.session_id, None, scaled(5)), "B")
    driver.join(scaled(20))
    assert engine.done
    refused = refusal(upload, engine, a, t, {}, 1.0)
    assert (refused.code, refused.reason) == ("FAILED_PRECONDITION", "STALE"), refused.message
    assert "is not the open training task" in refused.message


def test_a_refused_report_is_told_so_when_repeated_before_and_after_its_round_closed(
    driven: tuple[RoundEngine, threading.Thread],
) -> None:
    """A report refused for its figures is the node's answer: a repeat is told FAILED_PRECONDITION
    "already refused", also once the round has closed (not DEADLINE_EXCEEDED, as if none came)."""
    engine, driver = driven
    a, b, t = trained_to_the_final_evaluation(engine)
    engine.note_rejected_evaluation(a.session_id, None, t.task_id, t.round, "model is 1.5")
    refused_in_round = (
        "FAILED_PRECONDITION",
        f"A's evaluation for round {t.round} was already refused (rejected: model is 1.5)",
    )
    for call in (
        lambda: engine.check_evaluation(a.session_id, None, t.task_id, t.round, t.model_version),
        lambda: report(engine, a, t, "A"),
    ):
        refused = refusal(call)
        assert (refused.code, refused.message) == refused_in_round

    report(engine, b, engine.next_task(b.session_id, None, scaled(5)), "B")
    driver.join(scaled(20))
    record = engine.state.evaluations.last
    assert engine.done and record is not None and record["groups"] == ["B"]
    for call in (
        lambda: engine.check_evaluation(a.session_id, None, t.task_id, t.round, t.model_version),
        lambda: report(engine, a, t, "A"),
    ):
        refused = refusal(call)
        assert (refused.code, refused.message) == refused_in_round


def test_a_report_after_the_evaluations_deadline_is_refused_as_late(tmp_path: Path) -> None:
    """A report that comes after the evaluation's deadline, before the round is closed, is
    DEADLINE_EXCEEDED and not recorded."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.EVALUATE, [a], 0.05)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    assert t.kind == TaskKind.EVALUATE
    threading.Event().wait(0.1)  # past its deadline; no driver closes it
    for call in (
        lambda: engine.check_evaluation(a.session_id, None, t.task_id, t.round, t.model_version),
        lambda: report(engine, a, t, "A"),
    ):
        refused = refusal(call)
        assert (refused.code, refused.message) == (
            "DEADLINE_EXCEEDED",
            f"evaluation round {t.round} closed before A's report",
        )
    assert engine._task is not None and engine._task.evaluations == {}


# ------------------------------------------------------------------------------- heartbeats


def test_a_heartbeat_is_told_to_drop_only_a_task_not_open_or_already_answered(
    tmp_path: Path,
) -> None:
    """HeartbeatReply.cancel_task: true for a task that is not the open one, or whose answer
    the engine has; false for the open task still to answer, and for a beat naming no task."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.TRAIN, [a, b], 60.0)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    for s in (a, b):
        assert engine.heartbeat(s.session_id, None) == (0, False)  # idle: nothing to drop
        assert engine.heartbeat(s.session_id, None, t.task_id) == (0, False)
        assert engine.heartbeat(s.session_id, None, "f" * 32) == (0, True)  # not the open one
    upload(engine, a, t, {}, 1.0)
    assert engine.heartbeat(a.session_id, None, t.task_id) == (0, True)  # answered already
    assert engine.heartbeat(b.session_id, None, t.task_id) == (0, False)


def test_a_failed_heartbeat_gives_up_only_the_task_it_names(tmp_path: Path) -> None:
    """A node reporting FAILED for a task that is not the open one (its last round's) keeps its
    part in the open round: its update still counts. FAILED for the open task is its answer."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.TRAIN, [a, b], 60.0)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    engine.heartbeat(a.session_id, None, "f" * 32, failed=True, message="an older task")
    upload(engine, a, t, {}, 1.0)  # taken
    engine.heartbeat(b.session_id, None, t.task_id, failed=True, message="boom")
    assert refusal(upload, engine, b, t, {}, 1.0).reason == "ALREADY_REJECTED"


def waiting_poll(
    engine: RoundEngine, node: NodeSession
) -> tuple[threading.Thread, list[BaseException]]:
    """`node`'s long poll on a thread, started and waiting (no round open), and the list where
    the Rejection that ends it will be."""
    ended: list[BaseException] = []

    def poll() -> None:
        try:
            engine.next_task(node.session_id, None, 60.0)  # no round open: it waits
        except Rejection as err:
            ended.append(err)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    wait_until(lambda: node.polls == 1, 10, "the poll to start")
    return poller, ended


def test_a_session_found_expired_ends_its_own_waiting_poll_at_once(tmp_path: Path) -> None:
    """A node cut off mid-poll whose session is found expired (here by its next call) has that
    old poll ended at once, UNAUTHENTICATED, not at the end of its wait: it holds an RPC thread."""
    settings = RoundSettings(rounds=1, eval_every=0, heartbeat_interval_s=30.0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    poller, ended = waiting_poll(engine, a)
    with engine._lock:  # silent past session_timeout_s (the poll is no sign of life)
        a.last_seen -= settings.session_timeout_s + 1
    refused = refusal(engine.heartbeat, a.session_id, None)
    assert refused.code == "UNAUTHENTICATED"
    poller.join(5.0)
    assert not poller.is_alive(), "the expired session's poll still waits"
    assert [getattr(e, "code", None) for e in ended] == ["UNAUTHENTICATED"]


def test_the_engine_holds_a_poll_no_longer_than_the_servers_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine caps a poll's wait itself, at the same MAX_WAIT_S the server clips `wait` to:
    a caller that asks for longer (any caller but the server) is still answered WAIT."""
    monkeypatch.setattr(node_calls_module, "MAX_WAIT_S", 0.2)
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    start = time.monotonic()
    task = engine.next_task(a.session_id, None, 1e9)  # no round open, no driver: nothing comes
    assert task.kind == TaskKind.WAIT
    assert time.monotonic() - start < scaled(5)


# ------------------------------------------------------------------------------- resuming

SETTINGS = RoundSettings(rounds=2, eval_every=0)
CONFIG = {"d_model": 8, "n_heads": 2}


def saved_run(folder: Path) -> tuple[str, dict[str, bytes]]:
    """A run stopped after round 1 in `folder`: its run id and its files' bytes."""
    first = RoundEngine(SETTINGS, WEIGHTS, folder, ENC, CONFIG)
    driver = start(first)
    serve(first, stop_after_round=1)
    driver.join(scaled(20))
    assert first.completed_rounds() == 1
    return first.run_id, files_of(folder)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


FRESH = "; resume it with the same settings, or start a new run in another state folder"
OTHER_MODEL = "the saved run's model differs from the configured one"
OTHER_WEIGHTS = "the saved run's weights do not fit the configured model"


@pytest.mark.parametrize(
    ("encoder", "config", "weights", "message"),
    [
        (
            "other-encoder",
            CONFIG,
            WEIGHTS,
            "the saved run used encoder 'enc', this coordinator is configured with 'other-encoder'",
        ),
        (ENC, {**CONFIG, "d_model": 16}, WEIGHTS, f"{OTHER_MODEL} (d_model 8 -> 16)"),
        (ENC, {}, WEIGHTS, f"{OTHER_MODEL} (d_model 8 -> None, n_heads 2 -> None)"),
        (ENC, CONFIG, {**WEIGHTS, "b": np.zeros(11, np.float32)}, OTHER_WEIGHTS),
        (ENC, CONFIG, {**WEIGHTS, "b": np.zeros(10, np.float64)}, OTHER_WEIGHTS),
        (ENC, CONFIG, {"a": WEIGHTS["a"]}, OTHER_WEIGHTS),
    ],
    ids=[
        "encoder",
        "model config",
        "no model config",
        "a tensor's shape",
        "a tensor's dtype",
        "a tensor fewer",
    ],
)
def test_a_run_resumed_with_another_encoder_or_model_is_refused(
    tmp_path: Path,
    encoder: str,
    config: dict[str, Any],
    weights: dict[str, np.ndarray],
    message: str,
) -> None:
    run_id, before = saved_run(tmp_path)
    expected = f"{tmp_path}: {message}{FRESH}"
    with pytest.raises(InputError, match="^" + re.escape(expected) + "$"):
        RoundEngine(SETTINGS, weights, tmp_path, encoder, config)
    assert files_of(tmp_path) == before  # the saved run is left as it was
    # the control: the same encoder and model resume it
    resumed = RoundEngine(SETTINGS, WEIGHTS, tmp_path, ENC, CONFIG)
    assert (resumed.run_id, resumed.completed_rounds()) == (run_id, 1)


@pytest.mark.parametrize("version", [STATE_VERSION + 1, 0, str(STATE_VERSION), None, True])
def test_a_state_of_another_version_is_refused(tmp_path: Path, version: object) -> None:
    saved_run(tmp_path)
    path = tmp_path / STATE_FILE
    raw = json.loads(path.read_text("utf-8"))
    assert raw["version"] == STATE_VERSION
    if version is None:
        del raw["version"]
    else:
        raw["version"] = version
    path.write_text(json.dumps(raw), "utf-8")
    before = files_of(tmp_path)
    expected = f"{path}: state version {version!r}, expected {STATE_VERSION} (or 1)"
    with pytest.raises(InputError, match="^" + re.escape(expected) + "$"):
        RoundEngine(SETTINGS, WEIGHTS, tmp_path, ENC, CONFIG)
    assert files_of(tmp_path) == before


def test_a_clipped_reason_says_it_was_cut_and_how_long_it_was() -> None:
    """A node's failure message kept in the round's outcomes is cut to its limit; the record
    says so and gives its full length, so an operator does not take the cut text for all of it
    (and control characters in it are escaped, not written into the log)."""
    assert clipped("short", 10) == "short"
    assert clipped("x" * 10, 10) == "x" * 10
    assert clipped("y" * 25, 10) == "y" * 10 + "... (25 characters)"
    assert clipped("a\nb", 10) == "a\\nb"


def test_an_update_claiming_more_examples_than_its_node_joined_with_is_refused_and_final(
    driven: tuple[RoundEngine, threading.Thread],
) -> None:
    """The averaging weight a node asks for must be the one it joined with: B joined with 10 and
    claims 11. Its refusal is B's answer (the round closes without waiting for its deadline),
    and only the update that counted is in the round's bytes_in."""
    engine, _ = driven
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    task = engine.next_task(a.session_id, None, scaled(5))
    assert engine.next_task(b.session_id, None, scaled(5)).task_id == task.task_id
    no_metrics: dict[str, float] = {}
    args = (task.task_id, task.round, 11, no_metrics, replay_of(5.0), 1000, task.model_version)
    refused = refusal(engine.accept_update, b.session_id, None, *args)
    message = "update from B claims 11 examples; it joined with 10"
    assert (refused.code, refused.reason, refused.message) == (
        "INVALID_ARGUMENT",
        "MALFORMED",
        message,
    )
    engine.accept_update(
        a.session_id, None, task.task_id, task.round, 10, {}, replay_of(1.0), 80, task.model_version
    )
    wait_until(lambda: engine.completed_rounds() == 1, scaled(10), "round 1 to close")
    record = engine.state.history.first
    assert record is not None
    assert record["participants"] == ["A"] and record["bytes_in"] == 80
    assert record["outcomes"] == {"A": "accepted", "B": f"rejected: {message}"}


def test_a_node_back_in_another_role_gives_up_its_part_in_the_open_round(tmp_path: Path) -> None:
    """A training node that restarts as evaluate-only cannot answer the training task its old
    session was handed: the round stops waiting for it ("left") and its new session is not
    handed that task. (Restarted in the same role, it keeps its place: see
    test_update_validation.)"""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.TRAIN, [a, b], 60.0)  # what the driver does (no driver here)
    again = engine.join("A", Role.EVALUATE_ONLY, 0, ENC, "t")
    assert engine.next_task(again.session_id, None, 0.1).kind == TaskKind.WAIT
    assert engine._task is not None and engine._task.answered == {"A": "left"}
    assert engine.next_task(b.session_id, None, 0.1).kind == TaskKind.TRAIN


def test_a_node_that_leaves_ends_its_own_waiting_poll_at_once(tmp_path: Path) -> None:
    """A node that leaves while its long poll waits (a node stopping: the poll's thread and the
    Leave's are the node's two calls) has that poll ended at once, UNAUTHENTICATED: it must not
    hold an RPC thread until its wait runs out."""
    settings = RoundSettings(rounds=1, eval_every=0, heartbeat_interval_s=30.0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    poller, ended = waiting_poll(engine, a)
    engine.leave(a.session_id, None, "stopping")
    poller.join(5.0)
    assert not poller.is_alive(), "the poll of the node that left still waits"
    assert [getattr(e, "code", None) for e in ended] == ["UNAUTHENTICATED"]


def test_an_update_after_the_rounds_deadline_is_refused_as_late(tmp_path: Path) -> None:
    """An update that comes after its round's deadline, before the driver closed the round, is
    DEADLINE_EXCEEDED (reason STALE), before its bytes are read and when handed over whole:
    the round's sum must not change once it is due to close."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.TRAIN, [a], 0.05)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    assert t.kind == TaskKind.TRAIN
    threading.Event().wait(0.1)  # past its deadline; no driver closes it
    for call in (
        lambda: engine.check_update(a.session_id, None, t.task_id, t.round, t.model_version),
        lambda: upload(engine, a, t, {}, 1.0),
    ):
        refused = refusal(call)
        assert (refused.code, refused.reason, refused.message) == (
            "DEADLINE_EXCEEDED",
            "STALE",
            f"round {t.round} closed before the update from A",
        )
    assert engine._task is not None and engine._task.answered == {}


def test_a_node_whose_failed_task_was_given_up_is_not_handed_it_again(tmp_path: Path) -> None:
    """A node that reports its open task FAILED has answered it: its next poll waits for the
    next task instead of being handed the same one to fail again (and again)."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.TRAIN, [a, b], 60.0)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    assert engine.heartbeat(a.session_id, None, t.task_id, failed=True, message="oom") == (0, True)
    assert engine.next_task(a.session_id, None, 0.1).kind == TaskKind.WAIT
    assert engine.next_task(b.session_id, None, 0.1).task_id == t.task_id  # the control


def test_a_late_refusal_note_does_not_replace_a_counted_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A report counted is the node's answer: a refusal noted for it afterwards (a second copy
    the transport found malformed) neither replaces that answer nor is logged as refusing it."""
    engine = RoundEngine(RoundSettings(rounds=1, eval_every=0), WEIGHTS, tmp_path, ENC, {})
    a = engine.join("A", Role.TRAIN, 10, ENC, "t")
    engine._open(TaskKind.EVALUATE, [a], 60.0)  # what the driver does (no driver here)
    t = engine.next_task(a.session_id, None, 1.0)
    report(engine, a, t, "A")
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        engine.note_rejected_evaluation(a.session_id, None, t.task_id, t.round, "model is 1.5")
    assert engine._task is not None and engine._task.answered == {"A": "evaluated"}
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == []
