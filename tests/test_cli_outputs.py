"""`train` and `evaluate` never overwrite what their --out already held unless told to: a
coordinator's state folder, an earlier checkpoint, or the command's own input data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pluralfed.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint
from pluralfed.cli import main
from pluralfed.data import load_survey, write_jsonl

# two small real groups of GlobalOpinionQA (11 and 12 questions): quick to embed and train
GROUPS = "Switzerland,Estonia"
TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "16", "--mlp-layers", "1"]
TINY += ["--members", "1", "--threads", "1", "--epochs", "1", "--eval-every", "0"]


def train_argv(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--groups", GROUPS, "--out", str(out), *TINY]


def train(data: Path, out: Path, cache: Path, *extra: str) -> int:
    return main([*train_argv(data, out, cache), "--cache-dir", str(cache), *extra])


@pytest.fixture(scope="module")
def small(goqa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two groups' real rows as a JSONL file: `evaluate` without --groups embeds them all."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    write_jsonl(load_survey(goqa_csv, groups=GROUPS.split(",")), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(
    small: Path, session_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "ck"
    assert train(small, out, session_cache_dir) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_train_into_a_coordinator_state_folder_is_refused_and_its_history_kept(
    small: Path, session_cache_dir: Path, tmp_path: Path
) -> None:
    """The real CLI: `train --out <state folder>` deleted the federated run's history.jsonl,
    and the run could no longer resume."""
    state = tmp_path / "coordinator"
    state.mkdir()
    (state / "state.json").write_text('{"round": 3}\n')
    (state / "history.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n')
    before = snapshot(state)
    argv = [*train_argv(small, state, session_cache_dir), "--cache-dir", str(session_cache_dir)]
    proc = subprocess.run(
        [sys.executable, "-m", "pluralfed.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--out {state}: is a coordinator's state folder (it holds state.json)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(state) == before


def test_train_into_a_federated_final_model_is_refused_even_forced(
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "coordinator"
    final = state / "final"
    final.mkdir(parents=True)
    (state / "state.json").write_text('{"round": 3}\n')
    for p in checkpoint.glob("model.*"):
        (final / p.name).write_bytes(p.read_bytes())
    before = snapshot(final)
    assert train(small, final, session_cache_dir, "--force") == 2
    assert f"--out {final}: is in a coordinator's state folder" in capsys.readouterr().err
    assert snapshot(final) == before


def test_train_refuses_an_existing_checkpoint_unless_forced(
    small: Path, session_cache_dir: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(checkpoint)
    assert set(before) == {"model.safetensors", "model.json", "metrics.json", "history.jsonl"}
    assert train(small, checkpoint, session_cache_dir, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert f"--out {checkpoint}: holds a checkpoint or metrics already" in err
    assert "pass --force to replace them" in err
    assert snapshot(checkpoint) == before
    # with --force the earlier run's output is replaced by this run's
    assert train(small, checkpoint, session_cache_dir, "--seed", "1", "--force") == 0
    assert json.loads((checkpoint / "metrics.json").read_text())["seed"] == 1
    assert load_checkpoint(checkpoint).metadata["seed"] == 1
    assert len((checkpoint / "history.jsonl").read_text().splitlines()) == 1


def test_train_refuses_a_folder_holding_other_files_even_forced(
    small: Path, session_cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert train(small, tmp_path, session_cache_dir, *extra) == 2
        err = capsys.readouterr().err
        assert f"--out {tmp_path}: the folder holds files that are not a `train` run's" in err
        assert "(notes.txt)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_train_into_an_empty_folder_is_fine(
    small: Path, session_cache_dir: Path, tmp_path: Path
) -> None:
    assert train(small, tmp_path, session_cache_dir) == 0
    assert (tmp_path / META_FILE).is_file()


def test_train_eval_every_must_not_be_negative(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(small), "--out", str(tmp_path / "o"), "--eval-every", "-1"])
    assert exit_.value.code == 2
    assert "--eval-every: must be 0 or more, got -1" in capsys.readouterr().err


def evaluate(checkpoint: Path, data: Path, cache: Path, *extra: str) -> int:
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--threads", "1"]
    return main([*argv, "--cache-dir", str(cache), *extra])


def test_evaluate_out_must_not_be_its_data(
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`evaluate --out` equal to --data replaced the survey file with the metrics JSON."""
    data = tmp_path / "mine.jsonl"
    data.write_bytes(small.read_bytes())
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    for out in (data, link, tmp_path / "." / "mine.jsonl"):
        assert evaluate(checkpoint, data, session_cache_dir, "--out", str(out)) == 2
        assert f"--out {out}: is --data's {data}, which it would replace" in capsys.readouterr().err
    assert data.read_bytes() == small.read_bytes()
    weights = checkpoint / "model.safetensors"
    assert evaluate(checkpoint, data, session_cache_dir, "--out", str(weights)) == 2
    assert f"is --checkpoint's {weights}" in capsys.readouterr().err
    # any other file is written
    out = tmp_path / "eval.json"
    assert evaluate(checkpoint, data, session_cache_dir, "--groups", GROUPS, "--out", str(out)) == 0
    assert json.loads(out.read_text())["reports"]


@pytest.mark.parametrize("value", [5, "Switzerland", [1, 2]])
def test_evaluate_refuses_training_groups_of_the_wrong_type(
    value: object,
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "ck"
    bad.mkdir()
    for p in checkpoint.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    meta = json.loads((bad / META_FILE).read_text())
    meta["metadata"]["training_groups"] = value
    (bad / META_FILE).write_text(json.dumps(meta))
    assert evaluate(bad, small, session_cache_dir) == 2
    err = capsys.readouterr().err
    assert f"{bad / META_FILE}: metadata field 'training_groups' must be a list of group" in err
    assert "Traceback" not in err


def test_evaluate_takes_a_checkpoint_without_training_groups_as_none_trained(
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A checkpoint whose metadata does not say what it trained on (the field is optional) is
    evaluated on every group of the data, not refused."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    meta = json.loads((ck / META_FILE).read_text())
    del meta["metadata"]["training_groups"]
    (ck / META_FILE).write_text(json.dumps(meta))
    out = tmp_path / "eval.json"
    assert evaluate(ck, small, session_cache_dir, "--out", str(out)) == 0
    reports = json.loads(out.read_text())["reports"]
    assert sorted(reports["all groups"]["per_group"]) == sorted(GROUPS.split(","))
    capsys.readouterr()


def test_evaluate_checkpoint_near_misses_get_a_hint(
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in (META_FILE, WEIGHTS_FILE):  # either of its two files
        assert evaluate(checkpoint / name, small, session_cache_dir) == 2
        assert f"is a checkpoint's file; give its folder: {checkpoint}" in capsys.readouterr().err
    state = tmp_path / "coordinator"
    (state / "final").mkdir(parents=True)
    (state / "final" / META_FILE).write_text("{}")
    assert evaluate(state, small, session_cache_dir) == 2
    assert f"a federated run's final model is in {state / 'final'}" in capsys.readouterr().err
    # a folder that is a checkpoint itself is evaluated, whatever sub-folder it also holds
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    shutil.copytree(checkpoint, ck / "final")
    assert evaluate(ck, small, session_cache_dir, "--groups", GROUPS) == 0
    capsys.readouterr()


def test_evaluate_a_misspelt_group_gets_the_closest_names(
    small: Path, session_cache_dir: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It listed the first 20 groups in alphabetical order; the data loaders say which is near."""
    assert evaluate(checkpoint, small, session_cache_dir, "--groups", "Switzerlnd") == 2
    err = capsys.readouterr().err
    assert "unknown group(s): 'Switzerlnd' (did you mean 'Switzerland'?)" in err, err


def test_evaluate_refuses_a_checkpoint_trained_with_another_encoder(
    small: Path,
    session_cache_dir: Path,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A model reads the vectors of the encoder it was trained with: evaluated on another
    encoder's vectors it scores noise, with nothing to say the figures mean nothing."""
    other = tmp_path / "ck"
    other.mkdir()
    for p in checkpoint.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    meta = json.loads((other / META_FILE).read_text())
    trained_with = meta["encoder"]
    meta["encoder"] = "some-other-encoder/v1"
    (other / META_FILE).write_text(json.dumps(meta))
    out = tmp_path / "metrics.json"
    assert evaluate(other, small, session_cache_dir, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert (
        f"trained with encoder 'some-other-encoder/v1', but --encoder gives {trained_with!r}" in err
    )
    assert not out.exists()


def test_train_takes_a_folder_holding_only_hidden_files_as_empty(tmp_path: Path) -> None:
    """A .gitkeep or an editor's or file system's hidden file is no earlier output: such a
    folder is as good as empty (refusing it would send users to delete files they did not make)."""
    from pluralfed.commands.train import check_train_out

    (tmp_path / ".gitkeep").write_text("")
    (tmp_path / ".nfs0001").write_text("")
    check_train_out(tmp_path, force=False)  # no error


def test_train_refuses_a_group_both_trained_on_and_held_out(
    small: Path, session_cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A held-out group is one the model never saw: one that is also trained on would report
    a held-out figure that is really a training one. Refused before anything is written."""
    out = tmp_path / "ck"
    argv = ["--held-out", "Switzerland"]
    assert (
        main(
            [
                *train_argv(small, out, session_cache_dir),
                "--cache-dir",
                str(session_cache_dir),
                *argv,
            ]
        )
        == 2
    )
    assert "groups both trained on and held out: ['Switzerland']" in capsys.readouterr().err
    assert not out.exists()


def test_train_names_five_of_the_foreign_files_and_counts_the_rest(tmp_path: Path) -> None:
    """A folder of data files: the refusal names the first five (sorted) and says how many more,
    so a long listing does not drown the message and none goes unmentioned."""
    from pluralfed.commands.train import check_train_out
    from pluralfed.errors import InputError

    for name in "gfedcba":
        (tmp_path / f"{name}.csv").write_text("")
    (tmp_path / "model.json").write_text("{}")  # an earlier run's output is not foreign
    with pytest.raises(InputError) as refused:
        check_train_out(tmp_path, force=True)
    assert "(a.csv, b.csv, c.csv, d.csv, e.csv and 2 more)" in str(refused.value)


def test_train_names_exactly_five_foreign_files_without_a_count(tmp_path: Path) -> None:
    """Five foreign files are all named: the message adds no "and 0 more" (the count starts
    only past five)."""
    from pluralfed.commands.train import check_train_out
    from pluralfed.errors import InputError

    for name in "edcba":
        (tmp_path / f"{name}.csv").write_text("")
    with pytest.raises(InputError) as refused:
        check_train_out(tmp_path, force=True)
    assert "(a.csv, b.csv, c.csv, d.csv, e.csv): choose" in str(refused.value)
