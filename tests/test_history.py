"""coordinator/history.py: the run's round records, appended to history.jsonl, named by
state.json with their length and digest; and metrics.jsonl, kept in step with them."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import blake3
import pytest

import coordinator.history as history_module
import coordinator.metrics_file as metrics_module
from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE, EvaluationLog, RoundHistory
from coordinator.metrics_file import MetricsFile
from coordinator.state import CheckpointError, RunState
from pluralfed.errors import InputError


def record(n: int, groups: tuple[str, ...] = ("A", "B"), selected: tuple[str, ...] = ()) -> Any:
    return {"round": n, "participants": list(groups), "selected": list(groups + selected)}


def written(folder: Path, records: list[Any]) -> RoundHistory:
    history = RoundHistory.from_records(folder / HISTORY_FILE, records, "test")
    history.write_pending()
    return history


def test_appended_records_are_read_back_and_named_by_length_and_digest(tmp_path: Path) -> None:
    history = RoundHistory.create(tmp_path / HISTORY_FILE)
    assert len(history) == 0 and list(history.records()) == [] and history.last is None
    for n in (1, 2, 3):
        history.append(record(n, selected=("C",) if n == 2 else ()))
    text = (tmp_path / HISTORY_FILE).read_bytes()
    assert history.nbytes == len(text) and history.digest() == blake3.blake3(text).hexdigest()
    assert [r["round"] for r in history.records()] == [1, 2, 3]
    assert history.first == record(1) and history.last == record(3)
    assert history.participants == {"A", "B"} and history.groups == {"A", "B", "C"}
    again = RoundHistory.load(tmp_path / HISTORY_FILE, len(text), history.digest(), tmp_path)
    assert list(again.records()) == list(history.records())
    assert (again.first, again.last, again.groups) == (history.first, history.last, history.groups)


def test_a_record_out_of_order_is_refused(tmp_path: Path) -> None:
    history = RoundHistory.create(tmp_path / HISTORY_FILE)
    history.append(record(1))
    with pytest.raises(ValueError, match="is a record of round 3, expected round 2"):
        history.append(record(3))
    with pytest.raises(InputError, match=r"^other\[0\]: is a record of round 2, expected round 1"):
        RoundHistory.from_records(tmp_path / "other.jsonl", [record(2)], "other")


def test_a_failed_append_adds_nothing_and_the_next_one_writes_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (a full disk at the fsync) leaves its bytes in the file, beyond the
    records: they are not counted, not read, and the next append starts where the records end."""
    path = tmp_path / HISTORY_FILE
    history = RoundHistory.create(path)
    history.append(record(1))
    committed = (history.nbytes, history.digest())

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(history_module.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        history.append(record(2, groups=("Z",)))
    assert (history.nbytes, history.digest(), len(history)) == (*committed, 1)
    assert path.stat().st_size > history.nbytes  # the failed line is there
    assert [r["round"] for r in history.records()] == [1] and "Z" not in history.groups
    monkeypatch.undo()
    history.append(record(2))
    lines = path.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [record(1), record(2)]


def test_only_the_named_bytes_are_read(tmp_path: Path) -> None:
    """A crash after an append, before state.json counted it: the load reads what it names."""
    history = written(tmp_path, [record(1), record(2)])
    named = (history.nbytes, history.digest())
    with (tmp_path / HISTORY_FILE).open("ab") as f:
        f.write(b'{"round": 3, "partic')
    loaded = RoundHistory.load(tmp_path / HISTORY_FILE, *named, tmp_path / "state.json")
    assert len(loaded) == 2 and loaded.last == record(2)
    assert [r["round"] for r in loaded.records()] == [1, 2]


def test_a_record_that_is_not_json_is_refused_naming_its_line(tmp_path: Path) -> None:
    text = json.dumps(record(1)).encode() + b"\n" + b"{not json\n"
    (tmp_path / HISTORY_FILE).write_bytes(text)
    digest = blake3.blake3(text).hexdigest()
    with pytest.raises(InputError, match=r"history\.jsonl, line 2: not a JSON record"):
        RoundHistory.load(tmp_path / HISTORY_FILE, len(text), digest, tmp_path / "state.json")


def test_metrics_file_merges_rounds_and_evaluations_and_mends_only_when_it_differs(
    tmp_path: Path,
) -> None:
    """metrics.jsonl as the checkpoint has it: each round's evaluation after the round (one of
    round 0 first); a file that matches is left alone, one that does not is written anew."""
    history = written(tmp_path, [record(1), record(2), record(3)])
    evaluations = EvaluationLog.from_records(
        tmp_path / EVALUATIONS_FILE,
        [{"round": r, "kind": "evaluation", "groups": [], "reports": {}} for r in (0, 2)],
        "test",
    )
    state = RunState("r", 3, {}, {}, "enc", history, evaluations)
    metrics = MetricsFile(tmp_path, state)
    metrics.mend()  # no file yet: written
    rows = [json.loads(line) for line in metrics.path.open()]
    assert [(r["round"], r["kind"]) for r in rows] == [
        (0, "evaluation"),
        (1, "round"),
        (2, "round"),
        (2, "evaluation"),
        (3, "round"),
    ]
    inode = metrics.path.stat().st_ino
    MetricsFile(tmp_path, state).mend()
    assert metrics.path.stat().st_ino == inode  # it matched: not rewritten
    text = metrics.path.read_bytes()
    for damaged in (text[:-7], text + b'{"round": 4}\n', text.replace(b"round", b"rounb", 1)):
        metrics.path.write_bytes(damaged)
        MetricsFile(tmp_path, state).mend()
        assert metrics.path.read_bytes() == text


def test_an_empty_history_is_checked_against_its_digest_too(tmp_path: Path) -> None:
    empty = RoundHistory.create(tmp_path / HISTORY_FILE)
    assert len(RoundHistory.load(empty.path, 0, empty.digest(), tmp_path / "state.json")) == 0
    with pytest.raises(InputError, match="do not match the digest"):
        RoundHistory.load(empty.path, 0, "0" * 64, tmp_path / "state.json")


def test_records_not_yet_written_are_read_from_memory_then_written_once(tmp_path: Path) -> None:
    """A version-1 state's records: nothing on disk until its first checkpoint."""
    history = RoundHistory.from_records(tmp_path / HISTORY_FILE, [record(1), record(2)], "test")
    assert not history.path.exists() and [r["round"] for r in history.records()] == [1, 2]
    history.append(record(3))
    lines = history.path.read_bytes().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert history.digest() == blake3.blake3(history.path.read_bytes()).hexdigest()


def evaluation(n: int, groups: tuple[str, ...] = ("A",)) -> Any:
    return {"round": n, "kind": "evaluation", "groups": list(groups), "reports": {}}


def test_an_evaluation_of_the_same_round_replaces_the_one_before(tmp_path: Path) -> None:
    """A finished run evaluated again: the new record follows the old, which stays in the file
    (appended, never rewritten) but is no longer read."""
    log = EvaluationLog.create(tmp_path / EVALUATIONS_FILE)
    for e in (evaluation(0), evaluation(10), evaluation(20), evaluation(20, ("A", "B"))):
        log.append(e)
    assert [(e["round"], e["groups"]) for e in log.records()] == [
        (0, ["A"]),
        (10, ["A"]),
        (20, ["A", "B"]),
    ]
    assert len(log) == 3 and log.rounds == {0, 10, 20} and log.last == evaluation(20, ("A", "B"))
    assert len(log.path.read_bytes().splitlines()) == 4
    with pytest.raises(ValueError, match="is of round 10, after an evaluation of round 20"):
        log.append(evaluation(10))
    again = EvaluationLog.load(log.path, log.nbytes, log.digest(), tmp_path / "state.json")
    assert list(again.records()) == list(log.records()) and again.rounds == log.rounds


def _rows(path: Path) -> list[tuple[int, str]]:
    return [(r["round"], r["kind"]) for r in map(json.loads, path.read_bytes().splitlines())]


def test_metrics_file_not_yet_checked_is_written_anew_not_appended_to(tmp_path: Path) -> None:
    """A process's first write does not trust a metrics.jsonl it has not checked (one a crash or
    another run left): appending to it would keep its stale or duplicate rows for good."""
    history = written(tmp_path, [record(1), record(2)])
    state = RunState("r", 2, {}, {}, "enc", history, EvaluationLog.create(tmp_path / "e.jsonl"))
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "round", "round": 1}\n{"kind": "round", "round": 7}\n')
    MetricsFile(tmp_path, state).write({"kind": "round", **record(2)})
    assert _rows(path) == [(1, "round"), (2, "round")]


def test_a_metrics_row_that_cannot_be_made_durable_stops_the_run_and_is_mended_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An appended row is fsync'd like the checkpoint it follows; a failure there (a full disk)
    is a CheckpointError, and the next write rebuilds the file from the state."""
    history = written(tmp_path, [record(1)])
    state = RunState("r", 1, {}, {}, "enc", history, EvaluationLog.create(tmp_path / "e.jsonl"))
    metrics = MetricsFile(tmp_path, state)
    metrics.write()  # first write: the file made from the state
    history.append(record(2))

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics\.jsonl: .*No space"):
        metrics.write({"kind": "round", **record(2)})
    monkeypatch.undo()
    with metrics.path.open("ab") as f:
        f.write(b'{"round": 2, "parti')  # what a failed write may leave
    history.append(record(3))
    metrics.write({"kind": "round", **record(3)})
    assert _rows(metrics.path) == [(1, "round"), (2, "round"), (3, "round")]


def test_a_stale_metrics_file_is_emptied_by_a_start_with_no_records(tmp_path: Path) -> None:
    """A start that has no record yet still mends a metrics.jsonl it finds (an earlier run's):
    its rows are not this run's. Without a file and without records, none is made."""
    state = RunState(
        "r",
        0,
        {},
        {},
        "enc",
        RoundHistory.create(tmp_path / HISTORY_FILE),
        EvaluationLog.create(tmp_path / EVALUATIONS_FILE),
    )
    MetricsFile(tmp_path, state).mend()
    assert not (tmp_path / "metrics.jsonl").exists()
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "round", "round": 1}\n')
    MetricsFile(tmp_path, state).mend()
    assert (tmp_path / "metrics.jsonl").read_bytes() == b""


def test_an_evaluation_of_a_negative_round_is_refused(tmp_path: Path) -> None:
    """Round 0 is the evaluation before training; there is nothing before it: a record of a
    round before it is refused."""
    log = EvaluationLog.create(tmp_path / EVALUATIONS_FILE)
    with pytest.raises(ValueError, match="is of round -1"):
        log.append(evaluation(-1))
    log.append(evaluation(0))
    assert [e["round"] for e in log.records()] == [0]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"round": True, "participants": []}], r"^h\[0\]: field 'round' missing or not an int"),
        ([{"round": 1, "participants": ["A", 3]}], r"^h\[0\]: field 'participants' must be a"),
        ([{"round": 1, "participants": [], "selected": "AB"}], r"^h\[0\]: field 'selected' must"),
        ([record(1), [1]], r"^h\[1\]: must be an object, got list"),
    ],
)
def test_a_round_record_a_resume_could_not_read_is_refused_naming_it(
    tmp_path: Path, records: list[Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        RoundHistory.from_records(tmp_path / HISTORY_FILE, records, "h")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"held_out_unconnected": "A"}, r"^e\[0\]: field 'held_out_unconnected' must be a list"),
        ({"missing": [None]}, r"^e\[0\]: field 'missing' must be a list of group names"),
        ({"reports": None}, r"^e\[0\]: field 'reports' missing or not an object"),
        ({"round": False}, r"^e\[0\]: field 'round' missing or not an int"),
    ],
)
def test_an_evaluation_record_a_resume_could_not_read_is_refused_naming_it(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        EvaluationLog.from_records(tmp_path / EVALUATIONS_FILE, [{**evaluation(0), **extra}], "e")


def _file(folder: Path, lines: list[bytes]) -> tuple[Path, bytes]:
    path = folder / HISTORY_FILE
    path.write_bytes(b"".join(lines))
    return path, path.read_bytes()


def test_a_history_file_missing_or_cut_is_refused_saying_so(tmp_path: Path) -> None:
    """Each way the records named can be gone gets its own message: the file missing, cut
    shorter than state.json names, or named to end inside a line; an empty line is no record."""
    state = tmp_path / "state.json"
    one, two = (json.dumps(record(n)).encode() + b"\n" for n in (1, 2))
    digest = blake3.blake3(one + two).hexdigest()
    with pytest.raises(InputError, match=r"names 10 bytes of round records in .* which is missing"):
        RoundHistory.load(tmp_path / HISTORY_FILE, 10, digest, state)
    path, text = _file(tmp_path, [one])
    with pytest.raises(InputError, match=rf"holds {len(one)} bytes where .* names the first"):
        RoundHistory.load(path, len(one) + len(two), digest, state)
    path, text = _file(tmp_path, [one, two])
    cut = len(one) + 5
    with pytest.raises(InputError, match=rf"line 2: the {cut} bytes .* end inside this line"):
        RoundHistory.load(path, cut, blake3.blake3(text[:cut]).hexdigest(), state)
    path, text = _file(tmp_path, [one, b"\n", two])
    with pytest.raises(InputError, match=r"history\.jsonl, line 2: is empty, where a record was"):
        RoundHistory.load(path, len(text), blake3.blake3(text).hexdigest(), state)


def test_a_shared_history_with_a_cut_line_beyond_its_records_is_copied_without_it(
    tmp_path: Path,
) -> None:
    """A run forked with `cp -al` after a crash cut an append: the copy made before the first
    append holds the named records only, then the new one; the other folder's file is as it was."""
    history = written(tmp_path, [record(1), record(2)])
    named = (history.nbytes, history.digest())
    with history.path.open("ab") as f:
        f.write(b'{"round": 3, "partic')
    shared = history.path.read_bytes()
    (tmp_path / "fork").mkdir()
    os.link(history.path, tmp_path / "fork" / HISTORY_FILE)
    loaded = RoundHistory.load(history.path, *named, tmp_path / "state.json")
    loaded.append(record(3))
    lines = history.path.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [record(1), record(2), record(3)]
    assert (tmp_path / "fork" / HISTORY_FILE).read_bytes() == shared


def test_a_digest_named_in_upper_case_hex_is_the_same_digest(tmp_path: Path) -> None:
    """state.json's digest is hex: one written in capitals (an operator's edit, another tool)
    names the same bytes and must not be refused as a damaged file."""
    history = written(tmp_path, [record(1), record(2)])
    digest = history.digest()
    assert digest != digest.upper()
    loaded = RoundHistory.load(history.path, history.nbytes, digest.upper(), tmp_path / "s.json")
    assert [r["round"] for r in loaded.records()] == [1, 2]


def test_a_round_record_without_participants_is_refused_naming_it(tmp_path: Path) -> None:
    """Every round record names the groups averaged in (a resumed run reads them): one without
    the field is refused with where it is, not a KeyError from deep in the load."""
    with pytest.raises(InputError, match=r"^h\[1\]: field 'participants' must be a list of group"):
        RoundHistory.from_records(tmp_path / HISTORY_FILE, [record(1), {"round": 2}], "h")
