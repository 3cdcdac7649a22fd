"""The human-readable tables of PROTOCOL.md figures (pluralfed.report) that train, evaluate,
federate and the coordinator print: every predictor row shows its own figures, the worst group
is named, the context gain has its sign, the per-group table lists every group of every set;
and a console is unwrapped exactly when its own stream is not a terminal."""

from __future__ import annotations

import io
import re
import sys

import pytest
from rich.console import Console

from pluralfed.metrics import GroupEvaluation, summarize_groups
from pluralfed.report import UNWRAPPED_WIDTH, make_console, print_reports


def evaluation(
    group: str, model: float, context: float, uniform: float, prior: float
) -> GroupEvaluation:
    return GroupEvaluation(group, 10, model, context, uniform, prior)


def printed() -> str:
    reports = {
        "training groups (test questions)": summarize_groups(
            [
                evaluation("Alpha", 0.81, 0.70, 0.52, 0.61),
                evaluation("Beta", 0.75, 0.66, 0.48, 0.59),
            ]
        ),
        "held-out groups": summarize_groups([evaluation("Gamma", 0.72, 0.69, 0.45, 0.57)]),
    }
    out = io.StringIO()
    print_reports(reports, Console(file=out, width=200, soft_wrap=True))
    return out.getvalue()


def row(text: str, first: str) -> list[list[str]]:
    """The cells of every table row whose first cell is `first`."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] == first:
            rows.append(cells)
    return rows


def test_each_predictor_row_shows_its_own_figures_and_names_the_worst_group() -> None:
    text = printed()
    # training set: model mean 0.78, worst Beta 0.75, context gain 0.78 - 0.68 = +0.10
    gpo, held_gpo = row(text, "GPO")
    assert gpo[1:3] == ["0.7800", "0.7500 (Beta)"]
    assert gpo[4] == "+0.1000"
    assert held_gpo[1:3] == ["0.7200", "0.7200 (Gamma)"] and held_gpo[4] == "+0.0300"
    uniform, _ = row(text, "uniform")
    prior, _ = row(text, "group prior")
    assert uniform[1:3] == ["0.5000", "0.4800 (Beta)"]
    assert prior[1:3] == ["0.6000", "0.5900 (Beta)"]


def test_the_per_group_table_lists_every_group_of_every_set_to_four_places() -> None:
    text = printed()
    assert "per group" in text
    assert row(text, "Alpha") == [["Alpha", "training groups (test questions)", "0.8100"]]
    assert row(text, "Beta") == [["Beta", "training groups (test questions)", "0.7500"]]
    assert row(text, "Gamma") == [["Gamma", "held-out groups", "0.7200"]]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr", [False, True])
def test_a_console_is_unwrapped_when_its_own_stream_is_not_a_terminal(
    stderr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the other stream is a terminal does not matter: `pluralfed train > log` on a
    terminal writes its tables unwrapped to the log, and its stderr keeps the terminal's width."""
    monkeypatch.setenv("COLUMNS", "123")  # the terminal's width, as rich reads it
    own, other = ("stderr", "stdout") if stderr else ("stdout", "stderr")
    monkeypatch.setattr(sys, own, io.StringIO())
    monkeypatch.setattr(sys, other, Terminal())
    assert make_console(stderr=stderr).width == UNWRAPPED_WIDTH
    monkeypatch.setattr(sys, own, Terminal())
    monkeypatch.setattr(sys, other, io.StringIO())
    assert make_console(stderr=stderr).width == 123


def test_a_line_longer_than_the_unwrapped_width_is_not_cut(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Tables get UNWRAPPED_WIDTH, but a log line (a path, an error) is written whole, however
    long: a reader or a script looks for it on one line."""
    path = "/runs/" + "a-folder-name-that-goes-on/" * 12 + "metrics.jsonl"
    assert len(path) > UNWRAPPED_WIDTH
    make_console(stderr=True).print(f"metrics in {path}")
    assert capsys.readouterr().err == f"metrics in {path}\n"
