"""`pluralfed data`'s own refusals: one survey file, given once; and an output that is a JSON-lines
file other than the input (the survey file is what every other command reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pluralfed.cli import main


@pytest.fixture
def survey(tmp_path: Path) -> Path:
    path = tmp_path / "s.jsonl"
    rows = [
        {"group": g, "question": f"Question {i}?", "options": ["Yes", "No"], "distribution": [1, 3]}
        for g in ("A", "B")
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_different_survey_files_are_refused(
    survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data inspect FILE --data OTHER` named two inputs: which one was read was not said."""
    other = tmp_path / "other.jsonl"
    other.write_text(survey.read_text())
    assert main(["data", "inspect", str(survey), "--data", str(other)]) == 2
    assert f"two survey files: {survey} and --data {other}; give one" in capsys.readouterr().err
    assert main(["data", "inspect", str(survey), "--data", str(survey)]) == 0  # the same: fine


def test_convert_output_must_be_jsonl_in_any_case(
    survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The suffix decides the format `load_survey` reads a file as, and it reads .JSONL too."""
    assert main(["data", "convert", str(survey), str(tmp_path / "out.txt")]) == 2
    assert "output must be a .jsonl file" in capsys.readouterr().err
    assert main(["data", "convert", str(survey), str(tmp_path / "OUT.JSONL")]) == 0
    assert len((tmp_path / "OUT.JSONL").read_text().splitlines()) == 6


def test_convert_refuses_to_overwrite_its_input_however_it_is_spelled(
    survey: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A relative path, `./` or a symlink to the input are the input: it would be replaced by
    its own conversion (a CSV's rows lost on a failure half-way)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(survey)
    before = survey.read_text()
    for output in ("s.jsonl", "./s.jsonl", "link.jsonl"):
        assert main(["data", "convert", str(survey), output]) == 2, output
        assert "output would overwrite the input" in capsys.readouterr().err
    assert survey.read_text() == before


def test_synth_output_must_be_jsonl_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A synthetic survey written as s.csv would then be read back as a GlobalOpinionQA CSV:
    refused before anything is written."""
    out = tmp_path / "s.csv"
    assert main(["data", "synth", "--out", str(out), "--groups", "2", "--questions", "5"]) == 2
    assert f"{out}: output must be a .jsonl file" in capsys.readouterr().err
    assert not out.exists()


def test_convert_says_how_many_all_zero_distributions_it_dropped(
    survey: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An all-zero distribution is no answer and is not written: the summary line says so,
    so the rows missing from the output are accounted for."""
    rows = survey.read_text()
    zero = {
        "group": "A",
        "question": "Question 9?",
        "options": ["Yes", "No"],
        "distribution": [0, 0],
    }
    survey.write_text(rows + json.dumps(zero) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(survey), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote 6 distributions (2 groups, skipped 1 all-zero) to {out}" in said
    assert len(out.read_text().splitlines()) == 6
