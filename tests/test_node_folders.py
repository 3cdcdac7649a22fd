"""`node run` checks the folders it writes into (save_updates_dir, personalized_dir) before it
loads data or joins, not when it first writes them: after every round's training, or after the
whole run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fedharness import HOST, Pki, free_port
from test_validation_node import FakeEncoder

import pluralfed.commands.node as commands_node
from pluralfed.cli import main
from pluralfed.data import load_survey, write_jsonl

GROUP = "Switzerland"


@pytest.fixture(scope="module")
def data(goqa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real GlobalOpinionQA group's rows, as a partner node holds them."""
    path = tmp_path_factory.mktemp("data") / "switzerland.jsonl"
    write_jsonl(load_survey(goqa_csv, groups=[GROUP]), path)
    return path


def node_run(data: Path, monkeypatch: pytest.MonkeyPatch, *options: str) -> int:
    """`pluralfed node run` against a port where nobody listens: once set up it gives up at
    once (exit 1); a setup problem exits 2."""
    monkeypatch.setattr(commands_node, "open_encoder", lambda _cfg: FakeEncoder())
    monkeypatch.setattr(commands_node, "stop_on_signals", lambda _node: None)
    argv = ["node", "run", "--insecure", "--group", GROUP, "--data", str(data), *options]
    return main([*argv, "--coordinator", f"{HOST}:{free_port()}", "--give-up-after-s", "0.1"])


@pytest.mark.parametrize(
    "options",
    [
        ["--save-updates-dir", "{bad}"],
        ["--personalize-steps", "2", "--personalized-dir", "{bad}"],
    ],
)
@pytest.mark.parametrize(
    ("bad", "says"), [("afile", "exists and is not a folder"), ("afile/sub", "cannot write there")]
)
def test_an_unusable_output_folder_is_refused_before_the_data_is_loaded(
    options: list[str],
    bad: str,
    says: str,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "afile").write_text("")
    path = tmp_path / bad
    monkeypatch.setattr(commands_node, "load_survey", lambda *a, **k: pytest.fail("data loaded"))
    assert node_run(data, monkeypatch, *[o.format(bad=path) for o in options]) == 2
    setting = options[-2].lstrip("-").replace("-", "_")
    assert f"{setting} {path}: {says}" in capsys.readouterr().err


def test_missing_output_folders_are_made_at_start(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates, personal = tmp_path / "a" / "updates", tmp_path / "b" / "personal"
    options = ["--save-updates-dir", str(updates), "--personalize-steps", "2"]
    assert node_run(data, monkeypatch, *options, "--personalized-dir", str(personal)) == 1
    assert updates.is_dir() and personal.is_dir()
    assert list(updates.iterdir()) == [] and list(personal.iterdir()) == []


def test_a_bad_revocation_list_is_refused_before_the_data_is_loaded(
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It was read only at the first join, after the data had been loaded and embedded
    (minutes with a cold cache), though the certificates were checked first."""
    pki = Pki(tmp_path / "pki")
    crl = tmp_path / "crl.pem"
    crl.write_text("not a revocation list\n")
    monkeypatch.setattr(commands_node, "load_survey", lambda *a, **k: pytest.fail("data loaded"))
    monkeypatch.setattr(commands_node, "open_encoder", lambda _cfg: FakeEncoder())
    argv = ["node", "run", "--group", GROUP, "--data", str(data), "--tls-crl", str(crl)]
    argv += ["--tls-dir", str(pki.node("node-a")), "--coordinator", f"{HOST}:{free_port()}"]
    assert main(argv) == 2
    assert str(crl) in capsys.readouterr().err


def test_a_node_without_data_is_refused_before_it_makes_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data setting is checked first: a node that cannot run leaves nothing behind."""
    updates = tmp_path / "updates"
    monkeypatch.setattr(commands_node, "open_encoder", lambda _cfg: pytest.fail("encoder opened"))
    argv = ["node", "run", "--insecure", "--group", GROUP, "--save-updates-dir", str(updates)]
    assert main([*argv, "--coordinator", f"{HOST}:{free_port()}"]) == 2
    assert "data is required to run" in capsys.readouterr().err
    assert not updates.exists()


def test_a_folder_that_exists_but_takes_no_files_is_refused(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe file, not the folder's existence, decides: /proc is a folder nobody (root
    included) can create a file in."""
    monkeypatch.setattr(commands_node, "load_survey", lambda *a, **k: pytest.fail("data loaded"))
    assert node_run(data, monkeypatch, "--save-updates-dir", "/proc") == 2
    assert "save_updates_dir /proc: cannot write there" in capsys.readouterr().err


def test_personalized_dir_is_not_probed_when_nothing_is_personalized(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config may name personalized_dir with personalize_steps = 0 (off): the folder is then
    not used, so neither refused nor made."""
    (tmp_path / "afile").write_text("")
    options = ["--personalize-steps", "0", "--personalized-dir", str(tmp_path / "afile" / "sub")]
    assert node_run(data, monkeypatch, *options) == 1  # set up, then gave up on the coordinator
    unused = tmp_path / "personal"
    assert node_run(data, monkeypatch, "--personalized-dir", str(unused)) == 1
    assert not unused.exists()


def test_node_run_uses_the_threads_it_is_given(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert node_run(data, monkeypatch, "--threads", str(before + 1)) == 1
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_no_writable_temporary_folder_is_refused_before_the_data_is_loaded(
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`node run` in a container run with --read-only (no candidate temporary folder exists):
    exit 2 at start, not a failure in the first round after joining."""
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "none")])
    monkeypatch.setattr(commands_node, "load_survey", lambda *a, **k: pytest.fail("data loaded"))
    assert node_run(data, monkeypatch) == 2
    assert "no writable temporary folder" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_says_why_in_words(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal gives the system's reason in words ("Not a directory"), not Python's
    "[Errno 20] ...: '/path'" repeating the path the message has already named."""
    (tmp_path / "afile").write_text("")
    folder = tmp_path / "afile" / "sub"
    assert node_run(data, monkeypatch, "--save-updates-dir", str(folder)) == 2
    err = capsys.readouterr().err
    assert f"save_updates_dir {folder}: cannot write there (Not a directory); " in err
    assert "Errno" not in err
