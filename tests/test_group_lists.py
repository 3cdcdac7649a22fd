"""`--groups` (and `--held-out`) read group names the same way in every command: as separate
arguments or as one argument separated by ';' or ','. `data split` and `data inspect` took only
the first form, `train`, `evaluate`, `federate` and `reward serve` only the second."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pluralfed.cli import build_parser
from pluralfed.commands.common import GROUP_LIST_SYNTAX, group_list_args, parse_group_names
from pluralfed.errors import InputError


@pytest.mark.parametrize(
    ("values", "names"),
    [
        (["Japan"], ["Japan"]),
        (["Japan", "New Zealand"], ["Japan", "New Zealand"]),  # separate arguments
        (["Japan;New Zealand"], ["Japan", "New Zealand"]),
        (["Japan, New Zealand"], ["Japan", "New Zealand"]),
        (["Japan ; New Zealand;"], ["Japan", "New Zealand"]),
        (["Korea, South;Mali"], ["Korea, South", "Mali"]),  # ';' first: a name may hold ','
        (["Korea, South;"], ["Korea, South"]),
        (["Korea, South", "Mali"], ["Korea, South", "Mali"]),  # several: each taken whole
        (["A;B", "A;B"], ["A;B"]),
        (["A,B,A"], ["A", "B"]),  # duplicates dropped, order kept
        ("A,B", ["A", "B"]),  # one string, as callers in code passed it before
        (None, None),
    ],
)
def test_parse_group_names(values: list[str] | str | None, names: list[str] | None) -> None:
    assert parse_group_names(values) == names


@pytest.mark.parametrize("values", [[""], [" ; "], [","], ["", " "]])
def test_an_empty_group_list_is_refused_naming_the_option(values: list[str]) -> None:
    with pytest.raises(InputError, match=r"^--held-out: no group names in "):
        parse_group_names(values, "--held-out")


NASTY = ["Cote d'Ivoire", "Korea, South", "A;B", "A, B; C", "Mali", "New Zealand"]


@pytest.mark.parametrize("names", [[n] for n in NASTY] + [NASTY, NASTY[:2]])
def test_group_list_args_read_back_as_the_same_names(names: list[str]) -> None:
    """What a script writes on a command line (gen_compose's `data split --groups`) is read back
    as exactly those names, a single name with ',' or ';' included."""
    assert parse_group_names(group_list_args(names)) == names


def _group_options(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _group_options(sub, f"{path} {name}".strip())
        elif {"--groups", "--held-out"} & set(action.option_strings):
            yield f"{path} {action.option_strings[0]}", action


def test_every_group_list_option_takes_both_forms() -> None:
    """One parser, one help text, wherever an option takes group names (`data synth --groups N`,
    a number of groups, and gen_compose's `--held-out N` are no lists of names)."""
    found = dict(_group_options(build_parser()))
    found.pop("data synth --groups")
    assert sorted(found) == [
        "data convert --groups",
        "data inspect --groups",
        "data split --groups",
        "evaluate --groups",
        "federate --groups",
        "federate --held-out",
        "reward serve --groups",
        "train --groups",
        "train --held-out",
    ]
    for where, action in found.items():
        assert action.nargs == "+", where
        assert action.help.endswith(GROUP_LIST_SYNTAX), where


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "s.jsonl", "--out", "o"],
        ["evaluate", "--checkpoint", "c", "--data", "s.jsonl"],
        ["federate"],
        ["reward", "serve", "--checkpoint", "c", "--allow-list", "a", "--groups-data", "s.jsonl"],
        ["data", "inspect", "s.jsonl"],
        ["data", "split", "s.jsonl", "--out-dir", "o"],
    ],
)
@pytest.mark.parametrize("form", [["A", "New Zealand"], ["A;New Zealand"], ["A,New Zealand"]])
def test_each_command_reads_both_forms_alike(argv: list[str], form: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--groups", *form])
    assert parse_group_names(args.groups) == ["A", "New Zealand"]


def test_data_inspect_takes_a_separated_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, `data inspect --groups 'A;B'` looked for one group named 'A;B'."""
    rec = {"question": "Q1?", "options": ["Yes", "No"], "distribution": [1, 2]}
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"group": g, **rec}) + "\n" for g in ["A", "B", "C"]))
    args = build_parser().parse_args(["data", "inspect", str(data), "--groups", "A;B"])
    assert args.func(args) == 0
    assert "groups: 2" in capsys.readouterr().out
