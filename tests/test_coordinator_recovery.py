"""The coordinator after faults the fault-injection review found (report F1-F4, F9, F11, F12):
a kill between the final evaluation and its files, a restart before every group is back, a
node that is not connected when the run ends, a state folder without state.json, a full disk
while checkpointing, and a damaged or inconsistent checkpoint. Real RoundEngine and
run_coordinator, in process (a fake text encoder and a tiny model keep it fast)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import blake3
import numpy as np
import pytest
from rich.console import Console
from test_engine_recovery import ENC, WEIGHTS, evaluated, replay_of, serve, start

import coordinator.service as service
import coordinator.state as state_module
from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE
from coordinator.rounds import RoundEngine
from coordinator.service import EXIT_CANNOT_WRITE, CoordinatorConfig, run_coordinator
from coordinator.sessions import Role
from coordinator.settings import RoundSettings
from coordinator.state import STATE_FILE, CheckpointError, load_state
from coordinator.tasks import TaskKind
from coordinator.validation import Rejection
from pluralfed.auth import AllowList
from pluralfed.errors import InputError
from pluralfed.evaluation import GroupEvaluation
from pluralfed.tensorfiles import load_tensors, save_tensors
from pluralfed.wire import TensorSlice, digest_of, specs_of

pytestmark = pytest.mark.timeout(90)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def finished_run(folder: Path, rounds: int = 2, eval_every: int = 1) -> RoundEngine:
    engine = RoundEngine(
        RoundSettings(rounds=rounds, eval_every=eval_every), WEIGHTS, folder, ENC, {}
    )
    driver = start(engine)
    serve(engine)
    driver.join(20)
    assert engine.done
    return engine


# ---------------------------------------------------------------------------- F4


@pytest.mark.parametrize(
    "leftover",
    [
        "weights-r00003.safetensors",
        "history.jsonl",
        "metrics.jsonl",
        "results.json",
        "final/",
        "optimizer-r00002.safetensors",
    ],
)
def test_a_state_folder_with_a_run_but_no_state_json_is_refused(
    tmp_path: Path, leftover: str
) -> None:
    """Before: a new run started there and deleted the earlier run's weights at once."""
    if leftover == "final/":
        (tmp_path / "final").mkdir()
        (tmp_path / "final" / "model.json").write_text("{}")
    else:
        (tmp_path / leftover).write_bytes(b"the earlier run's")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(InputError) as err:
        RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {})
    message = str(err.value)
    assert message.startswith(
        f"{tmp_path} holds files of an earlier run ({leftover}) but no state.json"
    )
    assert not (tmp_path / STATE_FILE).exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name != "spool") == before


def test_a_start_killed_before_its_first_state_json_starts_again(tmp_path: Path) -> None:
    """Only the initial model (weights-r00000, which the seed makes again) and the spool: a
    start killed before its first state.json, not a run."""
    save_tensors(tmp_path / "weights-r00000.safetensors", WEIGHTS)
    (tmp_path / "spool").mkdir()
    engine = RoundEngine(RoundSettings(rounds=1), WEIGHTS, tmp_path, ENC, {})
    assert engine.state.completed_rounds == 0 and (tmp_path / STATE_FILE).exists()


# ---------------------------------------------------------------------------- F11


def test_a_weights_file_changed_after_its_checkpoint_is_refused_naming_it(tmp_path: Path) -> None:
    """Before: a flipped bit that kept the values finite was resumed from and sent to every
    node as the global model."""
    finished_run(tmp_path)
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    assert len(raw["weights_digest"]) == 64
    path = tmp_path / raw["weights_file"]
    weights = load_tensors(path)
    weights["a"] = weights["a"].copy()
    weights["a"][3] = np.float32(-2.9e37)  # finite: only the digest can tell
    save_tensors(path, weights)
    with pytest.raises(InputError) as err:
        load_state(tmp_path)
    assert str(err.value).startswith(
        f"{path}: its contents do not match the digest {tmp_path / STATE_FILE} recorded"
    )


def test_a_state_json_without_digests_still_loads(tmp_path: Path) -> None:
    """state.json files written before the digest was recorded resume as before."""
    finished_run(tmp_path)
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    del raw["weights_digest"], raw["optimizer_digest"]
    (tmp_path / STATE_FILE).write_text(json.dumps(raw))
    state = load_state(tmp_path)
    assert state is not None and state.completed_rounds == 2


def test_the_optimizer_file_is_checked_too(tmp_path: Path) -> None:
    settings = RoundSettings(rounds=1, eval_every=0, server_optimizer="fedadam")
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    serve(engine)
    driver.join(20)
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    path = tmp_path / raw["optimizer_file"]
    arrays = {k: v + 1 for k, v in load_tensors(path).items()}
    save_tensors(path, arrays)
    with pytest.raises(InputError, match="optimizer_digest"):
        load_state(tmp_path)


# ---------------------------------------------------------------------------- F12


def _edited(folder: Path, edit: Any) -> Path:
    finished_run(folder, rounds=3)
    raw = json.loads((folder / STATE_FILE).read_text())
    edit(raw)
    (folder / STATE_FILE).write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda raw: raw.update(completed_rounds=5),
            "'completed_rounds' is 5, but the history holds 3",
        ),
        (
            lambda raw: raw.update(weights_file="weights-r00002.safetensors"),
            "'weights_file' is 'weights-r00002.safetensors', expected 'weights-r00003",
        ),
    ],
)
def test_an_inconsistent_state_json_is_refused_naming_the_field(
    tmp_path: Path, edit: Any, expected: str
) -> None:
    """Before: completed_rounds 5 with rounds 1..3 went on at round 6 (4 and 5 never
    happened anywhere); a round recorded twice was written twice into metrics.jsonl."""
    folder = _edited(tmp_path, edit)
    before = files(folder)
    with pytest.raises(InputError, match=rf"^{re.escape(str(folder / STATE_FILE))}: .*{expected}"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, folder, ENC, {})
    assert files(folder) == before  # nothing deleted or rewritten


def _history_edited(folder: Path, edit: Any, name: str = HISTORY_FILE) -> Path:
    """A finished run of 3 rounds whose history.jsonl (or `name`) records were edited, and
    state.json's length and digest of them made to agree, as a careful hand edit would."""
    finished_run(folder, rounds=3)
    path = folder / name
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    edit(records)
    text = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(text)
    key = "history" if name == HISTORY_FILE else "evaluations"
    raw = json.loads((folder / STATE_FILE).read_text())
    raw[f"{key}_bytes"], raw[f"{key}_digest"] = len(text), blake3.blake3(text).hexdigest()
    (folder / STATE_FILE).write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda es: es.append({**es[-1], "round": 4}),
            r"state\.json: the evaluations hold one of round 4, beyond completed_rounds 3",
        ),
        (
            lambda es: es.append(es[0]),
            r"evaluations\.jsonl, line 4: is of round 1, after an evaluation of round 3",
        ),
        (
            lambda es: es[0].update(groups="A"),
            r"evaluations\.jsonl, line 1: field 'groups' must be a list of group names",
        ),
        (
            lambda es: es[1].update(held_out_unconnected=["H", None]),
            r"evaluations\.jsonl, line 2: field 'held_out_unconnected' must be a list",
        ),
        (
            lambda es: es[2].pop("reports"),
            r"evaluations\.jsonl, line 3: field 'reports' missing or not an object",
        ),
        (
            lambda es: es[0].pop("groups"),
            r"evaluations\.jsonl, line 1: field 'groups' must be a list of group names",
        ),
    ],
)
def test_inconsistent_evaluation_records_are_refused_naming_the_line(
    tmp_path: Path, edit: Any, expected: str
) -> None:
    folder = _history_edited(tmp_path, edit, EVALUATIONS_FILE)
    before = files(folder)
    with pytest.raises(InputError, match=expected):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, folder, ENC, {})
    assert files(folder) == before


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda rs: rs.insert(3, rs[2]),
            r"line 4: is a record of round 3, expected round 4",
        ),
        (lambda rs: rs.pop(1), r"line 2: is a record of round 3, expected round 2"),
        (lambda rs: rs[1].update(selected=5), r"line 2: field 'selected' must be a list"),
        (
            lambda rs: rs[0].update(participants=["A", 7]),
            r"line 1: field 'participants' must be a list of group names",
        ),
        (lambda rs: rs[2].update(round="3"), r"line 3: field 'round' missing or not an int"),
        (lambda rs: rs.__setitem__(0, [1]), r"line 1: must be an object"),
    ],
)
def test_inconsistent_round_records_are_refused_naming_the_line(
    tmp_path: Path, edit: Any, expected: str
) -> None:
    """The history's records hold rounds 1..n in order, with the group lists a resumed run
    reads; state.json's digest of them would catch the edit too, so these edits are signed."""
    folder = _history_edited(tmp_path, edit)
    before = files(folder)
    where = re.escape(str(folder / HISTORY_FILE))
    with pytest.raises(InputError, match=rf"^{where}, {expected}"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, folder, ENC, {})
    assert files(folder) == before


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            lambda path: path.write_bytes(path.read_bytes().replace(b'"A"', b'"B"', 1)),
            r"history\.jsonl: its first \d+ bytes do not match the digest",
        ),
        (
            lambda path: path.write_bytes(path.read_bytes()[:-10]),
            r"history\.jsonl: holds \d+ bytes where .*state\.json names the first \d+ as",
        ),
        (lambda path: path.unlink(), r"state\.json names \d+ bytes of round records in .*missing"),
    ],
)
def test_a_damaged_history_is_refused(tmp_path: Path, damage: Any, expected: str) -> None:
    finished_run(tmp_path, rounds=3)
    damage(tmp_path / HISTORY_FILE)
    before = files(tmp_path)
    with pytest.raises(InputError, match=expected):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, ENC, {})
    assert files(tmp_path) == before


def test_a_record_no_checkpoint_counts_is_ignored_then_overwritten(tmp_path: Path) -> None:
    """A crash after a round's record was appended, before state.json named it: a resume reads
    the records state.json counts, and its next round writes over the rest."""
    finished_run(tmp_path, rounds=2)
    path = tmp_path / HISTORY_FILE
    committed = path.read_bytes()
    path.write_bytes(committed + b'{"round": 3, "participants": ["A"], "cut')
    engine = finished_run(tmp_path, rounds=3)
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert path.read_bytes().startswith(committed)
    assert engine.state.history.last == records[-1]
    saved = load_state(tmp_path)
    assert saved is not None
    assert [r["round"] for r in saved.history.records()] == [1, 2, 3]


def test_a_replaced_evaluation_leaves_the_engine_as_a_restart_would_find_it(
    tmp_path: Path,
) -> None:
    """The groups the run's evaluations had are kept as they come, not read back each time: a
    finished run's final evaluation that missed a silent held-out H, replaced by one that finds
    H not connected, must drop H from them, as a restart reading the records in force does
    (before: the engine kept H and lingered 30 s for it; session 22 review L1)."""

    def silent_h(evaluations: list[Any]) -> None:
        evaluations[-1].update(missing=["H"], missing_held_out=["H"], held_out_unconnected=[])

    folder = _history_edited(tmp_path, silent_h, EVALUATIONS_FILE)
    settings = RoundSettings(rounds=3, eval_every=1, eval_timeout_s=1, evaluate_only=("H",))
    engine = RoundEngine(settings, WEIGHTS, folder, ENC, {})
    assert engine._evaluated_groups() == {"A", "H"}
    driver = start(engine)
    serve(engine)
    driver.join(20)
    final = engine.final_evaluation()
    assert engine.evaluated_again and final is not None and final["held_out_unconnected"] == ["H"]
    restarted = RoundEngine(settings, WEIGHTS, folder, ENC, {})
    assert engine._evaluated_groups() == restarted._evaluated_groups() == {"A"}
    assert engine._evaluated.held_out == restarted._evaluated.held_out


def test_a_history_that_is_not_a_plain_file_is_refused(tmp_path: Path) -> None:
    """history.jsonl is written in place: a symlink would have its target written, a FIFO hung
    the start (session 22 review M2, L3)."""
    finished_run(tmp_path, rounds=2)
    path = tmp_path / HISTORY_FILE
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.jsonl"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises(InputError, match=r"history\.jsonl: is a symbolic link"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, ENC, {})
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(InputError, match=r"history\.jsonl: is not a plain file"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, ENC, {})
    path.unlink()
    elsewhere.rename(path)
    (tmp_path / EVALUATIONS_FILE).unlink()
    (tmp_path / EVALUATIONS_FILE).mkdir()
    with pytest.raises(InputError, match=r"evaluations\.jsonl: is not a plain file"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, ENC, {})


def test_runs_forked_with_hard_links_do_not_write_into_each_other(tmp_path: Path) -> None:
    """`cp -al` shares every file of the folder: history.jsonl, the one written in place, is
    copied before a run appends to it (before: each run cut the other's records, and one was
    then refused; session 22 review M2)."""
    a, b = tmp_path / "a", tmp_path / "b"
    finished_run(a, rounds=2)
    b.mkdir()
    for f in a.iterdir():
        if f.is_file():
            os.link(f, b / f.name)
    finished_run(b, rounds=3)
    finished_run(a, rounds=4)
    saved_b, saved_a = load_state(b), load_state(a)
    assert saved_b is not None and len(saved_b.history) == 3
    assert saved_a is not None and len(saved_a.history) == 4
    assert os.stat(a / HISTORY_FILE).st_nlink == os.stat(b / HISTORY_FILE).st_nlink == 1


def test_a_last_record_without_its_newline_is_refused(tmp_path: Path) -> None:
    """Only a hand edit (with a digest to match) can make it; accepted, the next round glued
    two records into one line (session 22 review L2)."""
    folder = _history_edited(tmp_path, lambda rs: None)
    path = folder / HISTORY_FILE
    text = path.read_bytes()[:-1]
    path.write_bytes(text)
    raw = json.loads((folder / STATE_FILE).read_text())
    raw.update(history_bytes=len(text), history_digest=blake3.blake3(text).hexdigest())
    (folder / STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"history\.jsonl, line 3: the \d+ bytes .* end inside"):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, folder, ENC, {})


def test_bytes_beyond_the_records_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    finished_run(tmp_path, rounds=2)
    with (tmp_path / HISTORY_FILE).open("ab") as f:
        f.write(b'{"round": 3, "cut')
    with caplog.at_level(logging.WARNING):
        saved = load_state(tmp_path)
        assert saved is not None and len(saved.history) == 2
    assert "17 bytes beyond the round records" in caplog.text


def test_a_run_of_state_version_1_resumes_with_its_history_moved(tmp_path: Path) -> None:
    """state.json kept the history inline up to version 1: a run checkpointed so resumes, its
    records move to history.jsonl, and the next checkpoint is of version 2."""
    finished_run(tmp_path, rounds=2)
    records = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_bytes().splitlines()]
    evaluations = [json.loads(x) for x in (tmp_path / EVALUATIONS_FILE).read_bytes().splitlines()]
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    for key in ("history", "evaluations"):
        del raw[f"{key}_bytes"], raw[f"{key}_digest"]
    raw.update(version=1, history=records, evaluations=evaluations)
    (tmp_path / STATE_FILE).write_text(json.dumps(raw, indent=2))
    (tmp_path / HISTORY_FILE).unlink()
    (tmp_path / EVALUATIONS_FILE).unlink()
    before = files(tmp_path)
    with pytest.raises(InputError, match="encoder"):  # a start refused changes nothing
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, "other", {})
    assert files(tmp_path) == before
    engine = finished_run(tmp_path, rounds=3)
    assert [r["round"] for r in engine.state.history.records()] == [1, 2, 3]
    assert list(engine.state.history.records())[:2] == records
    assert json.loads((tmp_path / STATE_FILE).read_text())["version"] == 2
    assert "history" not in json.loads((tmp_path / STATE_FILE).read_text())
    assert [e["round"] for e in engine.state.evaluations.records()] == [1, 2, 3]
    assert list(engine.state.evaluations.records())[:2] == evaluations
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["round"], r.get("kind")) for r in rows if r.get("kind") == "round"] == [
        (1, "round"),
        (2, "round"),
        (3, "round"),
    ]


# ---------------------------------------------------------------------------- F2


def held_out(engine: RoundEngine, group: str, stop: threading.Event) -> None:
    """An evaluate-only node answering EVALUATE tasks until SHUTDOWN (or `stop`)."""
    s = engine.join(group, Role.EVALUATE_ONLY, 0, ENC, "t")
    while not stop.is_set():
        t = engine.next_task(s.session_id, None, 0.3)
        if t.kind == TaskKind.EVALUATE:
            evaluation = GroupEvaluation(group, 5, 0.45, 0.4, 0.3, 0.3)
            try:
                engine.accept_evaluation(
                    s.session_id, None, t.task_id, t.round, evaluation, t.model_version
                )
            except Rejection:  # the coordinator stopped (and closed the task) meanwhile
                continue
        elif t.kind == TaskKind.SHUTDOWN:
            return


def _stopped_before_the_final_evaluation(folder: Path, settings: RoundSettings) -> None:
    """Rounds 1 and 2 of a run of A (training) and H (held out), evaluated after round 1 by
    both; the coordinator is stopped right after round 2's checkpoint."""
    first = RoundEngine(settings, WEIGHTS, folder, ENC, {})
    driver = start(first)
    stop = threading.Event()
    h = threading.Thread(target=held_out, args=(first, "H", stop), daemon=True)
    h.start()
    serve(first, stop_after_round=2)
    driver.join(20)
    stop.set()
    h.join(5)
    assert first.completed_rounds() == 2 and evaluated(first) == [1]
    assert next(first.state.evaluations.records())["groups"] == ["A", "H"]


def test_the_final_evaluation_after_a_restart_waits_for_the_held_out_group(tmp_path: Path) -> None:
    """Review F2: it opened as soon as the training quorum was back, so the held-out node,
    a moment later, was left out (and not even listed as missing)."""
    settings = RoundSettings(rounds=2, eval_every=1, eval_timeout_s=15)
    _stopped_before_the_final_evaluation(tmp_path, settings)
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    trainer = threading.Thread(target=serve, args=(resumed,), daemon=True)
    trainer.start()
    time.sleep(1.5)  # the quorum is back, the held-out node not yet
    assert evaluated(resumed) == [1]
    held_out(resumed, "H", threading.Event())
    driver.join(20)
    trainer.join(20)
    final = resumed.final_evaluation()
    assert resumed.done and final is not None and final["round"] == 2
    assert final["groups"] == ["A", "H"] and "held-out groups" in final["reports"]


def test_an_evaluation_lists_as_missing_the_groups_earlier_ones_had(tmp_path: Path) -> None:
    """The held-out node never comes back: after eval_timeout_s the final evaluation runs with
    whoever came, and its record says H is missing (before: missing [])."""
    settings = RoundSettings(rounds=2, eval_every=1, eval_timeout_s=1)
    _stopped_before_the_final_evaluation(tmp_path, settings)
    resumed = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(resumed)
    serve(resumed)
    driver.join(20)
    final = resumed.final_evaluation()
    assert resumed.done and final is not None and final["round"] == 2
    assert final["groups"] == ["A"] and final["missing"] == ["H"]


# ---------------------------------------------------------------------------- F3


def test_the_coordinator_lingers_for_a_node_not_connected_when_the_run_ends(
    tmp_path: Path,
) -> None:
    """Review F3: lingering stopped as soon as no node was connected, so a node between
    reconnects never heard SHUTDOWN and retried for ever."""
    settings = RoundSettings(rounds=1, eval_every=0, min_nodes=2, min_updates=2)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    driver = start(engine)
    a, b = (engine.join(g, Role.TRAIN, 10, ENC, "t") for g in "AB")
    for s in (a, b):
        t = engine.next_task(s.session_id, None, 5)
        engine.accept_update(
            s.session_id, None, t.task_id, 1, 10, {}, replay_of(1), 80, t.model_version
        )
    for s in (a, b):  # the final evaluation: both report
        t = engine.next_task(s.session_id, None, 5)
        assert t.kind == TaskKind.EVALUATE
        e = GroupEvaluation(s.group, 5, 0.5, 0.4, 0.3, 0.3)
        engine.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
    driver.join(10)
    assert engine.next_task(a.session_id, None, 1).kind == TaskKind.SHUTDOWN
    engine.leave(a.session_id, None, "finished")
    engine.leave(b.session_id, None, "reconnecting")  # B is between reconnects: no session
    assert engine.live_sessions() == [] and engine.unaware_of_end() == ["B"]
    lingered = threading.Thread(target=service._linger, args=(engine, 20.0, threading.Event()))
    started = time.monotonic()
    lingered.start()
    time.sleep(1.0)
    assert lingered.is_alive()  # before: gone at once, nobody being connected
    b = engine.join("B", Role.TRAIN, 10, ENC, "t")
    assert engine.next_task(b.session_id, None, 1).kind == TaskKind.SHUTDOWN
    engine.leave(b.session_id, None, "finished")
    lingered.join(5)
    assert not lingered.is_alive() and time.monotonic() - started < 5  # everyone heard it


def test_lingering_ends_after_linger_s_and_names_who_never_heard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = finished_run(tmp_path)  # A heard SHUTDOWN
    assert engine.unaware_of_end() == []
    engine._joined.add("B")  # a group that joined and is gone
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        service._linger(engine, 1.0, threading.Event())
    assert 0.9 < time.monotonic() - started < 3
    assert any("['B'] did not hear the run's end" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- F9


def first_round_failures(engine: RoundEngine) -> list[BaseException]:
    """What engine.run() raised once one node's update to round 1 is in (its checkpoint)."""
    failed: list[BaseException] = []

    def drive() -> None:
        try:
            engine.run()
        except BaseException as err:
            failed.append(err)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    s = engine.join("A", Role.TRAIN, 10, ENC, "t")
    t = engine.next_task(s.session_id, None, 5)
    engine.accept_update(
        s.session_id, None, t.task_id, 1, 10, {}, replay_of(1), 80, t.model_version
    )
    driver.join(10)
    return failed


def _no_space_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Every tensor file write after the first `writes` fails as on a full disk."""
    real = state_module.save_tensors
    count = [0]

    def save(path: Path, tensors: Any) -> None:
        count[0] += 1
        if count[0] > writes:
            Path(path).write_bytes(b"half")  # a partial temp file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(state_module, "save_tensors", save)


def test_a_full_disk_while_checkpointing_ends_the_rounds_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = RoundSettings(rounds=3, eval_every=0)
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})  # writes round 0's checkpoint
    state_before = (tmp_path / STATE_FILE).read_bytes()
    _no_space_after(monkeypatch, 0)
    failed = first_round_failures(engine)
    assert len(failed) == 1 and isinstance(failed[0], CheckpointError)
    assert str(failed[0]) == (
        f"cannot write {tmp_path / 'weights-r00001.safetensors'}: [Errno 28] No space left on device"
    )
    assert (tmp_path / STATE_FILE).read_bytes() == state_before  # intact
    assert sorted(p.name for p in tmp_path.glob(".*tmp")) == []  # no temp file left
    state = load_state(tmp_path)
    assert state is not None and state.completed_rounds == 0


def test_a_checkpoint_whose_state_json_cannot_be_written_leaves_no_weights_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Soak review M2: the new round's weights (and optimizer) files stayed on the full disk
    when state.json, written after them, failed: a whole model no state.json names."""
    settings = RoundSettings(rounds=3, eval_every=0, server_optimizer="fedadam")
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    before = files(tmp_path)
    served = (engine.model_version, engine.state.completed_rounds, engine.model_digest)

    def full(path: Path, _obj: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module, "atomic_write_json", full)
    failed = first_round_failures(engine)
    assert len(failed) == 1 and isinstance(failed[0], CheckpointError)
    assert (
        str(failed[0])
        == f"cannot write {tmp_path / STATE_FILE}: [Errno 28] No space left on device"
    )
    after = files(tmp_path)
    # the round's record, appended before: beyond what state.json counts, which the next
    # round overwrites (a line, not a model)
    assert after.pop(HISTORY_FILE).count(b"\n") == 1
    assert after == before  # before: weights-r00001 and optimizer-r00001 as well
    # what the server answers while it stops is the last checkpoint's model, under its version
    # (before: round 1's weights under round 0's version; session 22 review L5)
    assert (engine.model_version, engine.state.completed_rounds, engine.model_digest) == served
    assert digest_of(engine.state.weights) == engine.model_digest
    state = load_state(tmp_path)
    assert state is not None and state.completed_rounds == 0 and len(state.history) == 0


def test_a_checkpoint_that_fails_after_its_rename_keeps_the_files_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of session 21: state.json renamed into place, then the folder's fsync failed
    (EIO; ENOSPC on some filesystems), and the clean-up of a failed checkpoint deleted the
    weights and optimizer files that very state.json names: a run no start could resume."""
    settings = RoundSettings(rounds=2, eval_every=0, server_optimizer="fedadam")
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    real_fsync = os.fsync

    def round_1_named() -> bool:
        return bool(json.loads((tmp_path / STATE_FILE).read_bytes())["completed_rounds"] == 1)

    def fsync(fd: int) -> None:  # the folder's, once state.json says round 1
        if stat.S_ISDIR(os.fstat(fd).st_mode) and round_1_named():
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    failed = first_round_failures(engine)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(failed) == 1 and isinstance(failed[0], CheckpointError)
    state = load_state(tmp_path)  # before: the weights file it names was gone
    assert state is not None and state.completed_rounds == 1


def test_a_failed_checkpoint_whose_state_json_cannot_be_read_back_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and state.json cannot even be read to see what it names (out of file handles,
    EIO): then no file may be taken for unnamed, or the weights of the checkpoint on disk go."""
    settings = RoundSettings(rounds=2, eval_every=0, server_optimizer="fedadam")
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    real_fsync, real_read_bytes = os.fsync, Path.read_bytes
    broken = [False]

    def read_bytes(path: Path) -> bytes:
        if broken[0] and path.name == STATE_FILE:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_read_bytes(path)

    def fsync(fd: int) -> None:  # the folder's, once state.json says round 1
        named = json.loads(real_read_bytes(tmp_path / STATE_FILE))["completed_rounds"]
        if stat.S_ISDIR(os.fstat(fd).st_mode) and named == 1:
            broken[0] = True
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    failed = first_round_failures(engine)
    monkeypatch.undo()
    assert len(failed) == 1 and isinstance(failed[0], CheckpointError) and broken[0]
    state = load_state(tmp_path)
    assert state is not None and state.completed_rounds == 1


def fake_encoder(_name: str) -> SimpleNamespace:
    return SimpleNamespace(dim=16, identity="fake-encoder")


class Captured(RoundEngine):
    """RoundEngine that lets the test reach the coordinator's engine (to act as its nodes)."""

    last: RoundEngine | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Captured.last = self


def tiny_config(state_dir: Path, **changes: Any) -> CoordinatorConfig:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state_dir": state_dir,
        "insecure": True,
        "encoder": "fake",
        "rounds": 1,
        "eval_every": 0,
        "eval_timeout_s": 1.0,
        "linger_s": 0.0,
        "d_model": 32,
        "n_layers": 1,
        "n_heads": 4,
        "d_ff": 32,
        "mlp_layers": 1,
        "members": 1,
        **changes,
    }
    return CoordinatorConfig(**settings)


def node(engine_ready: threading.Event) -> None:
    """One training node of Captured.last: sends the model back unchanged, evaluates, stops at
    SHUTDOWN (or when the rounds end without one)."""
    assert engine_ready.wait(30)
    engine = Captured.last
    assert engine is not None
    s = engine.join("A", Role.TRAIN, 10, "fake-encoder", "t")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = engine.next_task(s.session_id, None, 0.3)
        if t.kind == TaskKind.TRAIN:
            model = engine.model_for(s.session_id, None, t.model_version)
            slices = [
                TensorSlice(spec, 0, np.asarray(model.weights[spec.name]).reshape(-1))
                for spec in specs_of(model.weights)
            ]
            try:
                engine.accept_update(
                    s.session_id,
                    None,
                    t.task_id,
                    t.round,
                    10,
                    {},
                    partial(iter, slices),
                    80,
                    t.model_version,
                )
            except Exception:
                return
        elif t.kind == TaskKind.EVALUATE:
            e = GroupEvaluation("A", 5, 0.5, 0.4, 0.3, 0.3)
            engine.accept_evaluation(s.session_id, None, t.task_id, t.round, e, t.model_version)
        elif t.kind == TaskKind.SHUTDOWN:
            return


def coordinate(
    monkeypatch: pytest.MonkeyPatch,
    cfg: CoordinatorConfig,
    with_node: bool = True,
    allow_list: AllowList | None = None,
) -> int:
    """run_coordinator as the CLI runs it, with the fake encoder and (with_node) one node."""
    monkeypatch.setattr(service, "make_encoder", fake_encoder)
    ready = threading.Event()

    class Ready(Captured):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            ready.set()

    monkeypatch.setattr(service, "RoundEngine", Ready)
    helper = threading.Thread(target=node, args=(ready,), daemon=True)
    if with_node:
        helper.start()
    allowed = allow_list or AllowList({"node-a": "A"})
    code = run_coordinator(cfg, allowed, Console(stderr=True))
    if with_node:
        helper.join(10)
    return code


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Any:
    """run_coordinator installs SIGINT/SIGTERM handlers: give pytest its own back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_coordinator_whose_held_out_group_is_not_allow_listed_starts_no_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in evaluate_only would let the held-out group train: refused before the state
    folder is made (quorum_timeout_s only bounds the test should a run start)."""
    state_dir = tmp_path / "state"
    cfg = tiny_config(state_dir, evaluate_only=("B",), quorum_timeout_s=1.0)
    with pytest.raises(InputError, match=r"evaluate_only names \['B'\], which the allow-list"):
        coordinate(monkeypatch, cfg, with_node=False)
    assert not state_dir.exists()


def test_the_quorum_wait_names_only_the_allow_listed_groups_that_may_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A held-out group (evaluate_only) is no part of the quorum: the wait does not name it.
    A run stopped for want of a quorum (exit code 1) writes no final model nor results."""
    monkeypatch.setattr(service, "make_encoder", fake_encoder)
    state_dir = tmp_path / "state"
    cfg = tiny_config(state_dir, evaluate_only=("H",), quorum_timeout_s=0.5)
    allow = AllowList({"node-a": "A", "node-h": "H"})
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        assert run_coordinator(cfg, allow, Console(stderr=True)) == 1
    assert not (state_dir / "final").exists() and not (state_dir / "results.json").exists()
    assert "no quorum after 0 s (allow-listed groups not connected: A); stopping" in caplog.text
    assert (
        "waiting for a quorum: 0 of 1 training nodes; allow-listed groups not connected: A\n"
        in (caplog.text)
    )


def test_the_bound_port_is_written_where_launchers_look_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """listen port 0: the port the kernel chose goes to coordinator.port (and the first line)."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    text = (state_dir / "coordinator.port").read_text()
    assert re.fullmatch(r"[1-9][0-9]*\n", text)
    assert f" on port {int(text)}: 1 rounds, quorum 1, 1 nodes allowed" in capsys.readouterr().err


def test_the_first_line_gives_the_quorum_of_nodes_not_of_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """quorum is min_nodes, the nodes a round waits for (min_updates may be fewer)."""
    cfg = tiny_config(tmp_path / "state", min_nodes=2, min_updates=1, quorum_timeout_s=0.5)
    allow = AllowList({"node-a": "A", "node-b": "B"})
    assert coordinate(monkeypatch, cfg, with_node=False, allow_list=allow) == 1
    assert ": 1 rounds, quorum 2, 2 nodes allowed" in capsys.readouterr().err


def test_a_signal_during_the_linger_after_a_complete_run_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is complete once results.json is written: a SIGTERM that cuts the linger short
    (allow-listed B never heard the end) stops the coordinator with 0, not 143."""
    state_dir = tmp_path / "state"

    def stop_once_results_are_written() -> None:
        for _ in range(1200):
            if (state_dir / "results.json").is_file():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=stop_once_results_are_written, daemon=True)
    sender.start()
    cfg = tiny_config(state_dir, linger_s=60.0)
    allow = AllowList({"node-a": "A", "node-b": "B"})
    assert coordinate(monkeypatch, cfg, allow_list=allow) == 0
    sender.join(10)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_coordinator_with_128_plus_its_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, code: int
) -> None:
    """Waiting for its quorum, the coordinator takes SIGTERM / SIGINT: exit code 128 + the
    signal's number, which says a stop (a resume goes on), not a quorum that never came (1)."""
    monkeypatch.setattr(service, "make_encoder", fake_encoder)
    before = signal.getsignal(signum)

    def send_once_handled() -> None:
        for _ in range(600):  # once run_coordinator's handler is in place (a few ms)
            if signal.getsignal(signum) is not before:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=send_once_handled, daemon=True)
    sender.start()
    cfg = tiny_config(tmp_path / "state", quorum_timeout_s=30.0)
    assert run_coordinator(cfg, AllowList({"node-a": "A"}), Console(stderr=True)) == code
    sender.join(10)


def test_an_os_error_the_rounds_raise_unwrapped_ends_the_coordinator_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not every write of the rounds names its file (CheckpointError): a bare OSError from them
    also ends the run with EXIT_CANNOT_WRITE and one line, not a dead rounds thread."""

    def full(self: RoundEngine) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Captured, "_wait_for_quorum", lambda self: True)  # no node needed
    monkeypatch.setattr(Captured, "_training_round", full)
    with caplog.at_level(logging.ERROR, logger="pluralfed.coordinator"):
        code = coordinate(monkeypatch, tiny_config(tmp_path / "state"), with_node=False)
    assert code == EXIT_CANNOT_WRITE
    assert "stopping: cannot write the run's state in" in caplog.text
    assert "[Errno 28] No space left on device" in caplog.text


def test_the_final_model_says_which_run_and_groups_trained_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """... and the run ends by showing its final evaluation (the per-group table)."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    shown = capsys.readouterr().err
    assert "per group" in shown and re.search(r"A\s.*training\s.*0\.5000", shown), shown
    meta = json.loads((state_dir / "final" / "model.json").read_text())["metadata"]
    results = json.loads((state_dir / "results.json").read_text())
    assert meta["mode"] == "federated" and meta["run_id"] == results["run_id"]
    assert meta["rounds"] == 1 and meta["training_groups"] == ["A"]


def test_the_final_model_names_the_groups_that_trained_not_all_that_could(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Allow-listed B may train but never came: final/ says A alone trained the model."""
    state_dir = tmp_path / "state"
    allow = AllowList({"node-a": "A", "node-b": "B"})
    assert coordinate(monkeypatch, tiny_config(state_dir), allow_list=allow) == 0
    meta = json.loads((state_dir / "final" / "model.json").read_text())["metadata"]
    assert meta["training_groups"] == ["A"]


def test_lingering_waits_for_connected_nodes_and_ends_on_a_signal() -> None:
    """After the end every group has heard, the coordinator still serves the nodes connected
    (fetching the final model) until they leave; a signal ends the linger at once."""
    live_calls: list[int] = []

    def live() -> list[str]:
        live_calls.append(1)
        return ["session"] if len(live_calls) < 3 else []

    told = SimpleNamespace(unaware_of_end=lambda: [], live_sessions=live)
    service._linger(told, 30.0, threading.Event())  # type: ignore[arg-type]
    assert len(live_calls) == 3

    unaware_calls: list[int] = []

    def unaware() -> list[str]:
        unaware_calls.append(1)
        return ["B"]

    stopping = threading.Event()
    stopping.set()
    signalled = SimpleNamespace(unaware_of_end=unaware, live_sessions=list)
    service._linger(signalled, 2.0, stopping)  # type: ignore[arg-type]
    assert len(unaware_calls) == 1


def test_a_linger_a_signal_cuts_short_does_not_warn_that_groups_never_heard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operator stopped it: no warning that groups did not hear the end within linger_s
    (that warning is for a linger that ran out)."""
    stopping = threading.Event()
    stopping.set()
    signalled = SimpleNamespace(unaware_of_end=lambda: ["B"], live_sessions=list)
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        service._linger(signalled, 2.0, stopping)  # type: ignore[arg-type]
    assert "did not hear the run's end" not in caplog.text


def test_no_linger_says_only_who_did_not_hear_the_end(caplog: pytest.LogCaptureFixture) -> None:
    """linger_s = 0 (leave at once): no line about serving the end "for up to 0 s", only the
    warning naming the groups that did not hear it."""
    engine = SimpleNamespace(unaware_of_end=lambda: ["B"], live_sessions=list)
    with caplog.at_level(logging.INFO, logger="pluralfed.coordinator"):
        service._linger(engine, 0.0, threading.Event())  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == [
        "['B'] did not hear the run's end within linger_s (0 s): their nodes retry until "
        "stopped by hand"
    ]


def test_a_start_that_fails_after_its_run_was_made_keeps_the_folder_and_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start whose server fails once the run is made (open_run called): the folder it made
    holds that run now and keeps every file, coordinator.lock included; only a start that
    made no run takes back the folder it made."""
    monkeypatch.setattr(service, "make_encoder", fake_encoder)

    def fails_once_the_run_is_made(open_run: Any, *_args: Any, **_kwargs: Any) -> Any:
        open_run()
        raise InputError("the server could not start")

    monkeypatch.setattr(service, "start_server", fails_once_the_run_is_made)
    state_dir = tmp_path / "state"
    with pytest.raises(InputError, match="the server could not start"):
        run_coordinator(tiny_config(state_dir), AllowList({"node-a": "A"}), Console(stderr=True))
    assert (state_dir / STATE_FILE).is_file() and (state_dir / "coordinator.lock").is_file()


def test_a_full_disk_ends_the_coordinator_with_one_line_and_its_own_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review F9: a bare traceback of the rounds thread, no file named, and exit code 1 (the
    same as Ctrl-C)."""
    state_dir = tmp_path / "state"
    _no_space_after(monkeypatch, 1)  # round 0's checkpoint fits, round 1's does not
    with caplog.at_level(logging.ERROR, logger="pluralfed.coordinator"):
        code = coordinate(monkeypatch, tiny_config(state_dir))
    assert code == EXIT_CANNOT_WRITE == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"stopping: cannot write the run's state in {state_dir} (cannot write "
        f"{state_dir / 'weights-r00001.safetensors'}: [Errno 28] No space left on device); "
        "state.json still holds the last checkpoint: make room or fix the folder, then start "
        "the coordinator again to resume"
    ]
    state = load_state(state_dir)
    assert state is not None and state.completed_rounds == 0


# ---------------------------------------------------------------------------- F1


@pytest.mark.parametrize(
    "lost", [["final", "results.json"], ["final"], ["results.json"], ["final/model.json"]]
)
def test_a_finished_run_missing_its_outputs_gets_them_written_on_restart(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    lost: list[str],
) -> None:
    """Review F1: killed after the final evaluation was saved but before final/ and
    results.json were written, every restart exited 0 naming files that did not exist."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    results = json.loads((state_dir / "results.json").read_text())
    for name in lost:  # what the kill left unwritten
        path = state_dir / name
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()
    capsys.readouterr()
    restarted = time.time()
    # nobody comes back to evaluate again (eval_timeout_s 1): the outputs are written anyway
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    assert (state_dir / "final" / "model.safetensors").is_file()
    assert (state_dir / "final" / "model.json").is_file()
    again = json.loads((state_dir / "results.json").read_text())
    # says they were written again, and when: not by the run as it finished
    assert restarted <= again["written_again_at"] <= time.time()
    assert "evaluated_again_at" not in again
    assert again["final_evaluation"] == results["final_evaluation"]
    assert again["run_id"] == results["run_id"]
    if "results.json" not in lost:  # the run's own figures are kept
        assert again["wall_seconds"] == results["wall_seconds"]
    else:  # from the start of its first round to the end of its final evaluation
        state = load_state(state_dir)
        assert state is not None
        first, last, final = state.history.first, state.history.last, state.evaluations.last
        assert first is not None and last is not None and final is not None
        span = last["finished_at"] - first["finished_at"] + first["seconds"] + final["seconds"]
        assert again["wall_seconds"] == pytest.approx(span) and first["seconds"] > 0
        assert again["peak_rss_mib"] is None  # not known any more
    assert "written again" in capsys.readouterr().err


def test_a_finished_run_evaluated_again_reports_a_new_evaluation_not_missing_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its node back, a finished run started again evaluates again and writes results.json
    anew, with the run's own figures: it says so, not that the files were missing (they were
    not)."""
    state_dir = tmp_path / "state"
    cfg = tiny_config(state_dir, eval_timeout_s=10.0)
    assert coordinate(monkeypatch, cfg) == 0
    first = json.loads((state_dir / "results.json").read_text())
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="pluralfed.coordinator"):
        assert coordinate(monkeypatch, cfg) == 0
    results = json.loads((state_dir / "results.json").read_text())
    assert "evaluated_again_at" in results
    # the run's own time and memory, not the re-evaluation's
    assert results["wall_seconds"] == first["wall_seconds"]
    assert results["peak_rss_mib"] == first["peak_rss_mib"]
    assert "federation finished: 1 rounds" in capsys.readouterr().err
    assert "missing or older than its final evaluation" not in caplog.text


def test_results_older_than_the_final_evaluation_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after an evaluation again replaced the final one but before results.json was
    rewritten: results.json must not keep showing the replaced evaluation."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    path = state_dir / "results.json"
    stale = json.loads(path.read_text())
    stale["final_evaluation"]["seconds"] = -1.0
    path.write_text(json.dumps(stale))
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    state = load_state(state_dir)
    assert state is not None
    assert json.loads(path.read_text())["final_evaluation"] == state.evaluations.last


def test_a_true_in_place_of_the_runs_wall_time_is_not_taken_for_one_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """final/ lost, results.json kept but hand-edited: its figures are kept only if numbers
    (JSON true is not 1 s); otherwise the time is worked out from the run's records."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    path = state_dir / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps({**results, "wall_seconds": True, "peak_rss_mib": False}))
    for f in (state_dir / "final").iterdir():
        f.unlink()
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    again = json.loads(path.read_text())
    assert again["wall_seconds"] is not True and again["wall_seconds"] != 1.0
    assert isinstance(again["wall_seconds"], float) and again["peak_rss_mib"] is None


def test_a_round_time_that_is_not_a_number_leaves_the_rewritten_run_time_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.json lost and a round record's finished_at hand-edited into text (its digest
    made to match): the files are written again with a run time of 0, not a ValueError."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    (state_dir / "results.json").unlink()
    history = state_dir / HISTORY_FILE
    records = [json.loads(line) for line in history.read_text().splitlines()]
    records[0]["finished_at"] = "soon"
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    history.write_bytes(text)
    raw = json.loads((state_dir / STATE_FILE).read_text())
    raw["history_bytes"], raw["history_digest"] = len(text), blake3.blake3(text).hexdigest()
    (state_dir / STATE_FILE).write_text(json.dumps(raw))
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    assert json.loads((state_dir / "results.json").read_text())["wall_seconds"] == 0.0


def test_results_of_another_run_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.json naming another run (a copy, a state folder reused by hand) is not this
    run's, even with the same final evaluation."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    path = state_dir / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps({**results, "run_id": "another"}))
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    assert json.loads(path.read_text())["run_id"] == results["run_id"]


def test_results_that_json_cannot_read_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.json damaged into arrays nested deeper than json reads (a RecursionError, not a
    ValueError) stopped the restart with a traceback; it is written again like any unreadable
    one, with final/ lost too (so its figures are looked for as well)."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    path = state_dir / "results.json"
    results = json.loads(path.read_text())
    path.write_text("[" * 100_000 + "]" * 100_000)
    for f in (state_dir / "final").iterdir():
        f.unlink()
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    assert json.loads(path.read_text())["run_id"] == results["run_id"]


def test_results_that_are_json_but_not_an_object_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """results.json holding a JSON array (valid JSON, no figures), with final/ lost too: both
    are written again, the time worked out from the run's records, not an AttributeError."""
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    path = state_dir / "results.json"
    results = json.loads(path.read_text())
    path.write_text(json.dumps([results["wall_seconds"], results["peak_rss_mib"]]))
    for f in (state_dir / "final").iterdir():
        f.unlink()
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    again = json.loads(path.read_text())
    assert again["run_id"] == results["run_id"] and again["peak_rss_mib"] is None
    assert (state_dir / "final" / "model.safetensors").is_file()


def test_a_finished_run_with_its_outputs_leaves_them_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    assert coordinate(monkeypatch, tiny_config(state_dir)) == 0
    before = files(state_dir / "final") | {
        "results.json": (state_dir / "results.json").read_bytes()
    }
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    after = files(state_dir / "final") | {"results.json": (state_dir / "results.json").read_bytes()}
    assert after == before


def test_a_full_disk_while_writing_the_final_files_is_reported_and_mended_by_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"

    def full(path: Path, _obj: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, caplog.at_level(logging.ERROR):
        patched.setattr(service, "atomic_write_json", full)
        assert coordinate(monkeypatch, tiny_config(state_dir)) == EXIT_CANNOT_WRITE
    assert f"cannot write {state_dir / 'results.json'}: [Errno 28]" in caplog.text
    assert not (state_dir / "results.json").exists()
    assert coordinate(monkeypatch, tiny_config(state_dir), with_node=False) == 0
    assert json.loads((state_dir / "results.json").read_text())["rounds"] == 1


@pytest.mark.parametrize("name", [STATE_FILE, HISTORY_FILE])
def test_json_nested_too_deep_is_refused_not_a_traceback(tmp_path: Path, name: str) -> None:
    """json gives up on deep nesting with RecursionError, which no loader caught."""
    finished_run(tmp_path, rounds=3)
    if name == HISTORY_FILE:  # a last line the digest covers, as a careful hand edit would
        text = (tmp_path / name).read_bytes() + b"[" * 100_000 + b"\n"
        (tmp_path / name).write_bytes(text)
        raw = json.loads((tmp_path / STATE_FILE).read_text())
        raw["history_bytes"], raw["history_digest"] = len(text), blake3.blake3(text).hexdigest()
        (tmp_path / STATE_FILE).write_text(json.dumps(raw))
    else:
        (tmp_path / name).write_bytes(b"[" * 100_000)
    with pytest.raises(InputError, match=re.escape(str(tmp_path / name))):
        RoundEngine(RoundSettings(rounds=3, eval_every=1), WEIGHTS, tmp_path, ENC, {})
