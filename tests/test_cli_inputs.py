"""`train` and `evaluate` refuse inputs they cannot finish with before doing any work: groups with
nothing to use as context, and --out paths that cannot be written."""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fedharness import wait_until
from rich.table import Table
from tinymodel import CFG, random_item

import pluralfed.commands.evaluate as evaluate_command
import pluralfed.commands.train as train_command
from pluralfed.cli import build_parser, main, quiet_grpc_core
from pluralfed.commands.common import apply_threads, parse_range
from pluralfed.config import MAX_THREADS
from pluralfed.data import is_test_question
from pluralfed.episodes import GroupSplit
from pluralfed.errors import InputError
from pluralfed.evaluation import evaluate_group
from pluralfed.protocol import EVAL_MAX_CONTEXT
from pluralfed.report import make_console
from pluralfed.training import build_model

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "16", "--mlp-layers", "1"]
TINY += ["--members", "1", "--threads", "1"]


def _questions(n: int, test: bool) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n:
        q = f"Question number {i} about a topic?"
        if is_test_question(q) == test:
            out.append(q)
        i += 1
    return out


def write_survey(path: Path, rows: list[tuple[str, str, list[float]]]) -> Path:
    """A JSON-lines survey of (group, question, distribution over Yes/No) rows, at `path`."""
    path.write_text(
        "".join(
            json.dumps({"group": g, "question": q, "options": ["Yes", "No"], "distribution": d})
            + "\n"
            for g, q, d in rows
        )
    )
    return path


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Groups A and B with train and test questions; C with test questions only."""
    train, test = _questions(8, False), _questions(3, True)
    rows = [(g, q, [0.6, 0.4]) for g in "AB" for q in train + test]
    rows += [("C", q, [0.3, 0.7]) for q in test]
    return write_survey(tmp_path_factory.mktemp("survey") / "s.jsonl", rows)


@pytest.fixture(scope="module")
def checkpoint(survey: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ck"
    cache = tmp_path_factory.mktemp("cache")
    args = ["train", "--data", str(survey), "--groups", "A,B", "--out", str(out), *TINY]
    assert main([*args, "--epochs", "1", "--eval-every", "0", "--cache-dir", str(cache)]) == 0
    return out


def test_evaluate_group_without_context_is_an_input_error() -> None:
    rng = np.random.default_rng(0)
    model = build_model(CFG, 0)
    only_test = GroupSplit("C", train=[], test=[random_item(rng, 2, "q")])
    with pytest.raises(InputError, match="group 'C' has no train questions"):
        evaluate_group(model, only_test)
    with pytest.raises(InputError, match="group 'C' has no test questions"):
        evaluate_group(model, GroupSplit("C", train=only_test.test, test=[]))


def test_train_refuses_a_held_out_group_without_train_questions_before_training(
    survey: Path, tmp_path: Path, session_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ck"
    args = ["train", "--data", str(survey), "--groups", "A,B", "--held-out", "C", *TINY]
    code = main([*args, "--out", str(out), "--epochs", "1", "--cache-dir", str(session_cache_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--held-out: group(s) 'C' have test questions but no train questions" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any training


def test_train_refuses_zero_epochs_before_training(
    survey: Path, tmp_path: Path, session_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--epochs 0 is refused (exit 2, naming the option), not run as a training of nothing
    whose checkpoint is the untrained model."""
    out = tmp_path / "ck"
    args = ["train", "--data", str(survey), "--groups", "A,B", *TINY]
    code = main([*args, "--out", str(out), "--epochs", "0", "--cache-dir", str(session_cache_dir)])
    assert code == 2
    assert "--epochs must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr", "0", "learning_rate must be a finite number > 0, got 0.0"),
        ("--groups-per-step", "0", "groups_per_step must be at least 1, got 0"),
        ("--embedding-noise", "2", "embedding_noise must be in 0..1"),
    ],
)
def test_train_refuses_a_bad_training_setting_before_anything_is_done(
    option: str,
    value: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exit 2 with one line naming the setting, not a traceback, before the data is read."""
    out = tmp_path / "ck"
    args = ["train", "--data", str(tmp_path / "unread.jsonl"), "--groups", "A,B", *TINY]
    assert main([*args, "--out", str(out), option, value]) == 2
    assert f"error: training settings: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--context-range", "--target-range"])
def test_train_refuses_a_bad_episode_range_naming_its_own_option(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each episode range is read from its own option: a reversed --context-range or
    --target-range is refused under that option's name (exit 2) before the data is read, the
    other one's valid default does not stand in for it."""
    out = tmp_path / "ck"
    args = ["train", "--data", str(tmp_path / "unread.jsonl"), "--groups", "A,B", *TINY]
    assert main([*args, "--out", str(out), option, "9,5"]) == 2
    assert f"{option} must satisfy 1 <= low <= high, got '9,5'" in capsys.readouterr().err
    assert not out.exists()


def test_train_metrics_record_the_groups_trained_on_and_held_out(
    tmp_path: Path, session_cache_dir: Path
) -> None:
    """metrics.json says which groups were trained on and which held out, and for how many
    epochs: the record a comparison with a federated run is read from; the checkpoint keeps
    the same record but not the evaluation reports (those are metrics.json's)."""
    train, test = _questions(8, False), _questions(3, True)
    rows = [(g, q, [0.6, 0.4]) for g in "ABD" for q in train + test]
    data = write_survey(tmp_path / "s.jsonl", rows)
    out = tmp_path / "ck"
    args = ["train", "--data", str(data), "--groups", "A,B", "--held-out", "D", *TINY]
    args += ["--out", str(out), "--epochs", "2", "--eval-every", "0"]
    assert main([*args, "--cache-dir", str(session_cache_dir)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training_groups"] == ["A", "B"] and metrics["held_out_groups"] == ["D"]
    assert metrics["epochs"] == 2 and metrics["mode"] == "centralized"
    # the checkpoint's model.json carries the same record, without the evaluation reports
    meta = json.loads((out / "model.json").read_text())["metadata"]
    assert "reports" in metrics and meta == {k: v for k, v in metrics.items() if k != "reports"}


def test_train_with_dropout_is_reproducible_for_one_seed(
    survey: Path, tmp_path: Path, session_cache_dir: Path
) -> None:
    """Dropout draws from torch's global generator: `train` seeds it from --seed, so two runs
    with one seed in one process give the same figures (the default dropout 0 never draws)."""
    args = ["train", "--data", str(survey), "--groups", "A,B", *TINY, "--dropout", "0.5"]
    args += ["--seed", "4", "--epochs", "2", "--eval-every", "0"]
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([*args, "--out", str(out), "--cache-dir", str(session_cache_dir)]) == 0
        reports.append(json.loads((out / "metrics.json").read_text())["reports"])
    assert reports[0] == reports[1]


def test_train_seed_reaches_the_model_and_the_episode_sampling(
    survey: Path, tmp_path: Path, session_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--seed sets both the model's initial weights and the trainer's episode draws (seed 0,
    the default, hid a trainer that ignored it)."""
    seeds: dict[str, int] = {}
    real_build, real_trainer = train_command.build_model, train_command.LocalTrainer

    def build_model(config: object, seed: int) -> object:
        seeds["model"] = seed
        return real_build(config, seed)  # type: ignore[arg-type]

    class LocalTrainer(real_trainer):  # type: ignore[valid-type,misc]
        def __init__(self, model: object, settings: object, seed: int) -> None:
            seeds["trainer"] = seed
            super().__init__(model, settings, seed=seed)

    monkeypatch.setattr(train_command, "build_model", build_model)
    monkeypatch.setattr(train_command, "LocalTrainer", LocalTrainer)
    args = ["train", "--data", str(survey), "--groups", "A,B", *TINY, "--seed", "7"]
    args += ["--epochs", "1", "--eval-every", "0", "--out", str(tmp_path / "o")]
    assert main([*args, "--cache-dir", str(session_cache_dir)]) == 0
    assert seeds == {"model": 7, "trainer": 7}


def test_train_trains_on_a_group_without_test_questions_and_evaluates_the_others(
    tmp_path: Path, session_cache_dir: Path
) -> None:
    """A training group with TRAIN questions only is trained on; the test-question figures are
    those of the groups that have test questions (it was an error after training)."""
    train, test = _questions(8, False), _questions(3, True)
    rows = [(g, q) for g in "AB" for q in train + test] + [("D", q) for q in train]
    data = write_survey(tmp_path / "s.jsonl", [(g, q, [1, 1]) for g, q in rows])
    out = tmp_path / "ck"
    args = ["train", "--data", str(data), "--groups", "A,B,D", "--out", str(out), *TINY]
    assert main([*args, "--epochs", "1", "--cache-dir", str(session_cache_dir)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training_groups"] == ["A", "B", "D"]
    assert set(metrics["reports"][train_command.TRAIN_SET]["per_group"]) == {"A", "B"}


def test_train_refuses_a_group_with_a_single_train_question(
    tmp_path: Path, session_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group trained on needs two train questions (a context and a target): one with a single
    train question is refused by name before training."""
    train, test = _questions(8, False), _questions(3, True)
    rows = [("A", q) for q in train + test] + [("D", train[0]), ("D", test[0])]
    data = write_survey(tmp_path / "s.jsonl", [(g, q, [0.6, 0.4]) for g, q in rows])
    out = tmp_path / "ck"
    args = ["train", "--data", str(data), "--groups", "A,D", *TINY, "--out", str(out)]
    assert main([*args, "--epochs", "1", "--cache-dir", str(session_cache_dir)]) == 2
    assert "group 'D' has 1 train questions, needs 2+" in capsys.readouterr().err
    assert not out.exists()


def test_train_holds_out_the_default_groups_only_when_no_groups_are_named(
    survey: Path,
    tmp_path: Path,
    session_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As `federate`: without --groups the data's default held-out groups are held out; naming
    --groups means exactly those train and only --held-out groups are held out."""
    monkeypatch.setattr(train_command, "default_groups", lambda data: (["A", "B"], ["C"]))
    embedded: list[list[str]] = []

    def record(data: object, groups: list[str], encoder: object) -> None:
        embedded.append(groups)
        raise InputError("recorded")

    monkeypatch.setattr(train_command, "embed_groups", record)
    args = ["train", "--data", str(survey), "--out", str(tmp_path / "ck"), *TINY]
    args += ["--cache-dir", str(session_cache_dir)]
    assert main(args) == 2
    assert main([*args, "--groups", "A"]) == 2
    assert main([*args, "--groups", "A", "--held-out", "B"]) == 2
    assert embedded == [["A", "B", "C"], ["A"], ["A", "B"]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9,5", "--context-range must satisfy 1 <= low <= high, got '9,5'"),
        ("0,5", "--context-range must satisfy 1 <= low <= high, got '0,5'"),
        ("9", "--context-range must look like 9,90, got '9'"),
    ],
)
def test_a_range_option_is_low_then_high_from_one(text: str, message: str) -> None:
    """--context-range LOW,HIGH: a range whose low end is over its high end is refused as such
    (with the option's name), as one starting at 0 is; LOW = HIGH is a range of one."""
    with pytest.raises(InputError) as err:
        parse_range(text, "--context-range")
    assert str(err.value) == message
    assert parse_range("5,5", "--context-range") == (5, 5)


@pytest.mark.parametrize("threads", [0, -1, MAX_THREADS + 1, 10**20])
def test_a_thread_count_out_of_range_is_refused_naming_the_option(threads: int) -> None:
    """--threads 0 is an InputError naming the option, not torch's own error about it; 10**20
    was a ValueError traceback from torch ("Overflow when unpacking long long")."""
    with pytest.raises(InputError) as err:
        apply_threads(threads)
    assert str(err.value) == f"--threads must be 1..1024, got {threads}"


def test_threads_sets_torchs_thread_count() -> None:
    import torch

    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        apply_threads(wanted)
        assert torch.get_num_threads() == wanted
        apply_threads(None)  # not given: torch's choice stays
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_evaluate_max_context_defaults_to_the_protocols() -> None:
    """PROTOCOL.md's evaluation context size, as `train` evaluates with: the figures of the two
    commands agree only if they take the same number of context questions."""
    args = build_parser().parse_args(["evaluate", "--checkpoint", "c", "--data", "d.jsonl"])
    assert args.max_context == EVAL_MAX_CONTEXT


def test_evaluate_refuses_a_group_without_train_questions(
    survey: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(survey), "--threads", "1"]
    assert main([*args, "--groups", "A,C", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--groups: group(s) 'C' have test questions but no train questions" in err
    assert not out.exists()
    assert main([*args, "--groups", "A,B", "--out", str(out)]) == 0  # without C: fine
    assert json.loads(out.read_text())["reports"]


def test_evaluate_names_the_data_file_when_a_default_group_has_no_train_questions(
    checkpoint: Path, tmp_path: Path, session_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --groups the groups come from the checkpoint and the data: a refusal of one of
    them names the data file, not a --groups the user never gave."""
    rows = [("A", q) for q in _questions(3, True)]  # A, trained on, has test questions only here
    rows += [("B", q) for q in _questions(8, False) + _questions(3, True)]
    data = write_survey(tmp_path / "s.jsonl", [(g, q, [1, 1]) for g, q in rows])
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--threads", "1"]
    assert main([*args, "--cache-dir", str(session_cache_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: group(s) 'A' have test questions but no train questions" in err


def test_evaluate_takes_the_memory_options_over_the_checkpoints(
    survey: Path,
    checkpoint: Path,
    tmp_path: Path,
    session_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--memory-* override the checkpoint's context memory for this evaluation: a value out of
    range is refused naming them, and the mix weight given changes the figures."""
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(survey), "--groups", "A,B"]
    args += ["--threads", "1", "--cache-dir", str(session_cache_dir), "--out", str(out)]
    assert main([*args, "--memory-weight", "1.5"]) == 2
    assert "--memory-*: " in capsys.readouterr().err
    figures = []
    for weight in ("0", "1"):
        assert main([*args, "--memory-weight", weight]) == 0
        figures.append(json.loads(out.read_text())["reports"]["requested groups"]["model"])
    assert figures[0] != figures[1]
    capsys.readouterr()


def test_evaluate_leaves_out_a_group_without_test_questions(
    survey: Path,
    checkpoint: Path,
    tmp_path: Path,
    session_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A group with train questions only has nothing to be scored on: it is left out of the
    report (not an error), and the groups that have test questions are evaluated."""
    data = tmp_path / "s.jsonl"
    extra = [
        {"group": "D", "question": q, "options": ["Yes", "No"], "distribution": [0.5, 0.5]}
        for q in _questions(4, False)
    ]
    data.write_text(survey.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--groups", "A,D"]
    args += ["--threads", "1", "--cache-dir", str(session_cache_dir), "--out", str(out)]
    assert main(args) == 0
    written = json.loads(out.read_text())
    assert list(written["reports"]["requested groups"]["per_group"]) == ["A"]
    assert (written["checkpoint"], written["data"]) == (str(checkpoint), str(data))  # of what
    capsys.readouterr()
    # with no group left there is nothing to report: an error, and no JSON
    out.unlink()
    assert main(["D" if a == "A,D" else a for a in args]) == 2
    assert "none of the chosen groups has test questions" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_caches_embeddings_in_the_cache_dir_given_and_nowhere_with_no_cache(
    survey: Path,
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PLURALFED_CACHE_DIR", str(tmp_path / "default"))
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(survey), "--groups", "A,B"]
    assert main([*args, "--threads", "1", "--cache-dir", str(tmp_path / "given")]) == 0
    assert any((tmp_path / "given").iterdir())
    assert (
        main([*args, "--threads", "1", "--no-cache", "--cache-dir", str(tmp_path / "unused")]) == 0
    )
    assert not (tmp_path / "unused").exists()
    assert not (tmp_path / "default").exists()  # neither run fell back to the default folder
    capsys.readouterr()


def test_evaluate_seed_chooses_the_context_questions(
    survey: Path,
    checkpoint: Path,
    tmp_path: Path,
    session_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With more train questions (8) than --max-context (3), --seed picks the context: the
    same seed gives the same figures, another seed other ones; without --seed, seed 0's."""
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(survey), "--groups", "A,B"]
    args += ["--threads", "1", "--max-context", "3", "--cache-dir", str(session_cache_dir)]
    figures = []
    for seed in ([], ["--seed", "0"], ["--seed", "1"]):  # the default seed is 0
        out = tmp_path / "eval.json"
        assert main([*args, *seed, "--out", str(out)]) == 0
        figures.append(json.loads(out.read_text())["reports"]["requested groups"]["model"])
    assert figures[0] == figures[1] != figures[2]
    capsys.readouterr()


def test_evaluate_without_groups_takes_the_held_out_groups_even_when_none_trained_is_there(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --groups, evaluate takes the checkpoint's training groups found in the data and
    the data's held-out groups; only when it finds neither does it take every group. Data
    without the training groups but with held-out ones is evaluated on the held-out ones."""
    monkeypatch.setattr(evaluate_command, "default_groups", lambda data: (["A", "B"], ["C"]))
    embedded: list[list[str]] = []

    def record(data: object, groups: list[str], encoder: object) -> None:
        embedded.append(groups)
        raise InputError("recorded")

    monkeypatch.setattr(evaluate_command, "embed_groups", record)
    # groups C and D; the checkpoint trained on A and B
    rows = [(g, q, [0.5, 0.5]) for g in "CD" for q in _questions(3, False)]
    data = write_survey(tmp_path / "s.jsonl", rows)
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--threads", "1"]
    assert main(args) == 2
    assert embedded == [["C"]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--data", "d.jsonl", "--out", "afile"],
            "--out afile: exists and is not a folder",
        ),
        (
            ["train", "--data", "d.jsonl", "--out", "afile/ck"],
            "--out afile/ck: afile is not a folder",
        ),
        (
            ["evaluate", "--checkpoint", "c", "--data", "d.jsonl", "--out", "afile/x.json"],
            "--out afile/x.json: afile is not a folder",
        ),
        (
            ["evaluate", "--checkpoint", "c", "--data", "d.jsonl", "--out", "adir"],
            "--out adir: is a folder, expected a file name",
        ),
    ],
)
def test_out_that_cannot_be_written_is_refused_up_front(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Checked before the data or the checkpoint is even read (neither exists here), rather
    than as a FileExistsError traceback once the work is done."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_size_option_below_one_is_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--max-context 0 is refused when the command line is read, before any model or data is
    loaded ("must be at least 1"); 1 is taken."""
    parser = build_parser()
    base = ["train", "--data", "x.jsonl", "--out", "o", "--max-context"]
    assert parser.parse_args([*base, "1"]).max_context == 1
    with pytest.raises(SystemExit) as err:
        parser.parse_args([*base, "0"])
    assert err.value.code == 2
    assert "--max-context: must be at least 1, got 0" in capsys.readouterr().err


def test_federate_refuses_negative_personalize_steps_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--personalize-steps -1 is refused up front (exit 2, naming the option), before any data
    is made or node started; nothing is written."""
    out = tmp_path / "run"
    assert main(["federate", "--out", str(out), "--personalize-steps", "-1"]) == 2
    assert "--personalize-steps must be 0 or more, got -1" in capsys.readouterr().err
    assert not out.exists()


def test_train_help_says_when_held_out_groups_are_chosen() -> None:
    """With --groups given no held-out group is chosen by default; the help must say so."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(commands, argparse._SubParsersAction)
    sub = commands.choices["train"]
    held = next(a for a in sub._actions if a.dest == "held_out")
    assert held.help is not None
    assert "when the data has them and --groups is not given, else none" in held.help


def test_write_json_follows_a_symlink_and_writes_through_a_device(tmp_path: Path) -> None:
    """--out may be a symlink (its target gets the JSON, the link stays) or a device or pipe
    such as /dev/stdout, which an atomic replace cannot handle (review, session 16). The pipe
    is the test's own: a write_json that replaced it must not replace the machine's /dev/null
    (a mutant of round 4 did, for every later process)."""
    from pluralfed.commands.common import write_json

    target = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    assert target.read_text().endswith("}\n")  # a text file: its last line ends
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()), daemon=True)
    reader.start()
    write_json(pipe, {"b": 2})  # not a regular file: written through, not replaced
    reader.join(10)
    assert pipe.is_fifo() and read and json.loads(read[0]) == {"b": 2}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_peak_rss_is_in_mib() -> None:
    """`train` reports peak_rss_mib: the kernel's own high-water mark (VmHWM, in kB) over 1024,
    not a figure a thousand times off."""
    from pluralfed.commands.common import peak_rss_mib

    status = Path("/proc/self/status").read_text()
    hwm_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]
    )
    assert hwm_kib / 1024 / 2 <= peak_rss_mib() <= hwm_kib / 1024 * 2


def test_train_takes_the_coordinators_names_for_layers_and_heads() -> None:
    """`train --layers` and the coordinator's `--n-layers` named one setting two ways
    (walkthrough review, session 17): train takes both."""
    from pluralfed.cli import build_parser

    args = build_parser("train").parse_args(
        ["train", "--data", "x.csv", "--out", "o", "--n-layers", "3", "--n-heads", "2"]
    )
    assert (args.layers, args.heads) == (3, 2)


def test_train_model_options_reach_the_model_config() -> None:
    """Each model option sets its own field of the model's configuration: --layers 3 --heads 2
    is a 3-layer, 2-head encoder, not the other way round (both are valid shapes)."""
    from pluralfed.cli import build_parser

    argv = ["train", "--data", "x.csv", "--out", "o", "--layers", "3", "--heads", "2"]
    argv += ["--d-model", "8", "--d-ff", "12", "--mlp-layers", "1", "--members", "2"]
    cfg = train_command.model_config(build_parser("train").parse_args(argv), embed_dim=5)
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_ff) == (3, 2, 8, 12)
    assert (cfg.mlp_layers, cfg.members, cfg.embed_dim) == (1, 2, 5)


def test_train_defaults_are_the_protocols_settings() -> None:
    """Without options `train` is PROTOCOL.md's centralized baseline: its episode ranges,
    epochs, learning rate and evaluation, one group per step and no embedding noise (the
    range defaults are strings of their own, not the protocol's constants)."""
    from pluralfed import protocol
    from pluralfed.cli import build_parser

    args = build_parser("train").parse_args(["train", "--data", "x.csv", "--out", "o"])
    assert parse_range(args.context_range, "--context-range") == protocol.CONTEXT_RANGE
    assert parse_range(args.target_range, "--target-range") == protocol.TARGET_RANGE
    assert (args.epochs, args.lr) == (protocol.CENTRALIZED_EPOCHS, protocol.LEARNING_RATE)
    assert (args.eval_every, args.max_context) == (protocol.EVAL_EVERY, protocol.EVAL_MAX_CONTEXT)
    assert (args.groups_per_step, args.embedding_noise) == (1, 0.0)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["coordinator", "--config", "c.toml"], {}, "NONE"),
        (["node", "run", "-v"], {}, "NONE"),  # a word after the command is the command's
        (["-v", "coordinator"], {}, None),  # debug logging: gRPC core speaks too
        (["--verbose", "node", "run"], {}, None),
        (["-vv", "coordinator"], {}, None),  # what argparse takes as -v too
        (["coordinator"], {"GRPC_VERBOSITY": "INFO"}, "INFO"),  # the operator's choice stands
    ],
)
def test_grpc_core_is_quiet_unless_asked(
    argv: list[str], environ: dict[str, str], expected: str | None
) -> None:
    quiet_grpc_core(argv, environ)
    assert environ.get("GRPC_VERBOSITY") == expected


def test_the_top_level_options_take_no_abbreviations() -> None:
    """`--verb` would turn on debug logging without `quiet_grpc_core` seeing it."""
    with pytest.raises(SystemExit):
        build_parser("certs").parse_args(["--verb", "certs", "show", "x"])


def test_output_into_a_file_or_pipe_is_not_wrapped(capsys: pytest.CaptureFixture[str]) -> None:
    """rich wrapped at 80 columns there: a log's "metrics in <path>" line was split in the
    middle of the path, and per-group table rows over two lines."""
    path = "/runs/" + "a-rather-long-folder-name/" * 5 + "metrics.jsonl"
    make_console(stderr=True).print(f"federation finished: 3 rounds; metrics in {path}")
    table = Table()
    table.add_column("group")
    table.add_column("set")
    table.add_row("India (Current national sample)", "training groups (test questions), " * 2)
    make_console().print(table)
    out, err = capsys.readouterr()
    assert f"metrics in {path}\n" in err
    assert "training groups (test questions), training groups (test questions)," in out


def open_for_writing_once_read(pipe: Path, proc: subprocess.Popen[str]) -> int | None:
    """A write end of `pipe` once `proc` has opened it to read (None before); never blocks, so
    a command that exits without opening it fails the test instead of hanging it."""
    if proc.poll() is not None:
        raise AssertionError(f"the command exited ({proc.returncode}) before reading the pipe")
    try:
        return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:  # ENXIO: no reader yet
        if err.errno != errno.ENXIO:
            raise
        return None


def test_ctrl_c_ends_a_command_with_exit_code_130_and_no_traceback(tmp_path: Path) -> None:
    """A shell or a supervisor tells an interrupted command (128 + SIGINT) from a finished (0)
    or failed (1, 2) one. The command here blocks reading a pipe nobody writes to."""
    pipe = tmp_path / "groups.jsonl"
    os.mkfifo(pipe)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pluralfed.cli", "data", "inspect", str(pipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background job's children start with SIGINT ignored: this one must take it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        writer = wait_until(lambda: open_for_writing_once_read(pipe, proc), 60.0, "the read")
        try:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err


def main_thread_state(pid: int) -> str:
    """The scheduler's state letter of `pid`'s main thread (R running, S waiting, ...)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def test_ctrl_c_taken_by_another_thread_still_ends_a_read_of_a_pipe(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGINT to any thread (numpy's BLAS threads too), and
    CPython then only notes it for the main thread: a main thread blocked in read(2) would wait
    for the writer for ever. Here the signal goes to a helper thread on purpose, once the main
    thread waits on the pipe."""
    pipe = tmp_path / "groups.jsonl"
    os.mkfifo(pipe)
    code = (
        "import sys, threading\n"
        "from pluralfed import cli\n"
        "helper = threading.Thread(target=threading.Event().wait, daemon=True)\n"
        "helper.start()\n"
        "print(helper.native_id, flush=True)\n"
        f"sys.exit(cli.main(['data', 'inspect', {str(pipe)!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        helper_tid = int(proc.stdout.readline())
        writer = wait_until(lambda: open_for_writing_once_read(pipe, proc), 60.0, "the read")
        try:
            wait_until(lambda: main_thread_state(proc.pid) == "S", 60.0, "the wait for bytes")
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.tgkill(proc.pid, helper_tid, signal.SIGINT) == 0, ctypes.get_errno()
            _, err = proc.communicate(timeout=30)
        finally:
            os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "level"), [(["-v"], "DEBUG"), ([], "INFO")])
def test_verbose_turns_on_debug_logging(tmp_path: Path, argv: list[str], level: str) -> None:
    code = (
        "import logging, sys\n"
        "from pluralfed import cli\n"
        f"code = cli.main({[*argv, 'data', 'inspect', str(tmp_path / 'none.jsonl')]!r})\n"
        "print(code, logging.getLevelName(logging.getLogger().level))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", level]


def test_an_in_process_caller_with_grpc_loaded_keeps_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPC_VERBOSITY only matters before gRPC is imported: a program (or a test) that calls
    `main` with gRPC already loaded has its environment, and its later children's, left alone."""
    import grpc  # noqa: F401 - loaded, as in such a program

    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    assert main(["data", "inspect", str(tmp_path / "none.jsonl")]) == 2
    assert "GRPC_VERBOSITY" not in os.environ
