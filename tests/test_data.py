"""The data layer: loaders (real GlobalOpinionQA CSV and JSON lines), validation, helpers, CLI."""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pluralfed import cli, protocol
from pluralfed.data import (
    GROUPS_MANIFEST,
    SurveyData,
    SurveyItem,
    group_file_names,
    group_slug,
    is_test_question,
    load_global_opinions_csv,
    load_global_opinions_hub,
    load_jsonl,
    load_survey,
    n_items,
    question_id_for,
    select_groups,
    split_items,
    summary,
    unique_questions,
    unknown_groups_message,
    write_group_files,
    write_jsonl,
)
from pluralfed.errors import InputError
from pluralfed.protocol import HELD_OUT_GROUPS, TRAINING_GROUPS

# Questions per country as data/README.md states them. Those counts include all-zero distributions:
# France and China each have one (on the question "If 'yes', was the loan used for", whose every
# distribution is all zero), so the loader, which skips all-zero ones, keeps one fewer for each.
README_COUNTS = {
    "Germany": 264,
    "United States": 264,
    "France": 248,
    "Spain": 215,
    "Argentina": 179,
    "Japan": 178,
    "Egypt": 154,
    "Brazil": 149,
    "Canada": 148,
    "Australia": 147,
    "Nigeria": 132,
    "India (Current national sample)": 116,
    "China": 68,
    "New Zealand": 36,
}
ALL_ZERO_IN_README_COUNTS = {"France": 1, "China": 1}


@pytest.fixture(scope="module")
def goqa(goqa_csv: Path) -> SurveyData:
    return load_global_opinions_csv(goqa_csv)


# --------------------------------------------------------------------------------------------------
# the real file


def test_real_csv_shape(goqa: SurveyData, goqa_csv: Path) -> None:
    with open(goqa_csv, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 1727
    # 1,727 records, 1,725 distinct texts (two questions appear twice with different option
    # wordings), and one question has only all-zero distributions, so 1,724 survive
    assert len({r["question"] for r in records}) == 1725
    assert len(unique_questions(goqa)) == 1724
    assert len(goqa.groups) == 130
    # 9,814 distributions in the file = 9,804 kept + 9 all-zero + 1 duplicate (group, question)
    assert goqa.skipped_all_zero == 9
    assert sum(goqa.skipped_by_group.values()) == 9
    assert n_items(goqa) == 9804
    assert len(goqa.notes) == 1
    assert "Indonesia" in goqa.notes[0]
    assert f"{goqa_csv}:1480:" in goqa.notes[0] and "line 307" in goqa.notes[0]
    assert goqa.source == str(goqa_csv)


def test_real_csv_protocol_group_counts(goqa: SurveyData) -> None:
    assert set(README_COUNTS) == set(TRAINING_GROUPS) | set(HELD_OUT_GROUPS)
    for group, readme_count in README_COUNTS.items():
        kept = len(goqa.groups[group])
        assert kept == readme_count - ALL_ZERO_IN_README_COUNTS.get(group, 0), group
        assert kept + goqa.skipped_by_group.get(group, 0) == readme_count, group


def test_protocol_constants_are_what_protocol_md_says(goqa_csv: Path) -> None:
    """pluralfed.protocol is ../shared/PROTOCOL.md as constants, and every figure is made with
    them: a constant that drifts from the document (a group dropped, steps drawn from 9..89, lr
    1e-4, 5 local steps) makes figures that no longer compare with the reference, silently."""
    text = " ".join((goqa_csv.parents[2] / "PROTOCOL.md").read_text("utf-8").split())

    def found(pattern: str) -> str:
        m = re.search(pattern, text)
        assert m is not None, f"PROTOCOL.md no longer says {pattern!r}"
        return m.group(1)

    assert found(r"Training groups \([^)]*\): (.+?)\. - Held-out").split(", ") == list(
        protocol.TRAINING_GROUPS
    )
    assert found(r"Held-out groups \([^)]*\): (.+?)\. ").split(", ") == list(
        protocol.HELD_OUT_GROUPS
    )
    low, high = found(r"drawn uniformly from (\d+\.\.\d+)").split("..")
    assert protocol.CONTEXT_RANGE == protocol.TARGET_RANGE == (int(low), int(high))
    assert float(found(r"Adam, lr ([\d.e-]+)\. ")) == protocol.LEARNING_RATE
    assert protocol.LOCAL_OPTIMIZER == "adam"
    assert found(r"Federated: (\d+ rounds x \d+ local steps)") == (
        f"{protocol.FEDERATED_ROUNDS} rounds x {protocol.LOCAL_STEPS} local steps"
    )
    assert found(r"(\d+) epochs of one step") == str(protocol.CENTRALIZED_EPOCHS)
    assert found(r"at most (\d+), fixed seed") == str(protocol.EVAL_MAX_CONTEXT)
    assert found(r"every (\d+) rounds") == str(protocol.EVAL_EVERY)


def test_real_csv_items_are_clean(goqa: SurveyData) -> None:
    max_options = 0
    for items in goqa.groups.values():
        questions = [it.question for it in items]
        assert len(questions) == len(set(questions))
        for it in items:
            assert it.distribution.dtype == np.float64
            assert it.distribution.shape == (len(it.options),)
            assert np.all(it.distribution >= 0)
            assert abs(it.distribution.sum() - 1.0) < 1e-12
            assert all(isinstance(o, str) and o for o in it.options)
            assert it.question_id == hashlib.sha256(it.question.encode()).hexdigest()[:16]
            max_options = max(max_options, len(it.options))
    assert max_options == 18


def test_real_csv_renormalises_published_values(goqa: SurveyData, goqa_csv: Path) -> None:
    """Published values sum to 0.997..1.003: the loader's distribution is value / sum."""
    with open(goqa_csv, newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    sel = first["selections"]
    raw = ast.literal_eval(sel[sel.index("{") : sel.rindex("}") + 1])
    croatia = np.array(raw["Croatia"])
    item = next(it for it in goqa.groups["Croatia"] if it.question == first["question"])
    np.testing.assert_allclose(item.distribution, croatia / croatia.sum(), rtol=0, atol=1e-15)


def test_real_csv_group_filter(goqa: SurveyData, goqa_csv: Path) -> None:
    names = ["New Zealand", "Germany", "China"]
    sub = load_global_opinions_csv(goqa_csv, groups=names)
    assert list(sub.groups) == names  # requested order
    assert sub.skipped_all_zero == 1  # China's
    for g in names:
        assert [it.question for it in sub.groups[g]] == [it.question for it in goqa.groups[g]]
    same = select_groups(goqa, names)
    assert list(same.groups) == names and same.skipped_all_zero == 1
    with pytest.raises(InputError, match=r"'Germny' \(did you mean 'Germany'"):
        load_global_opinions_csv(goqa_csv, groups=["Germny"])


def test_split_matches_independent_computation(goqa: SurveyData, goqa_csv: Path) -> None:
    """PROTOCOL.md split, recomputed from the raw CSV with a different big-int path."""
    with open(goqa_csv, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))

    def is_test(q: str) -> bool:
        return int.from_bytes(hashlib.sha256(q.encode("utf-8")).digest(), "big") % 5 == 0

    texts = {r["question"] for r in records}
    assert all(is_test(q) == is_test_question(q) for q in texts)
    share = sum(map(is_test, texts)) / len(texts)
    assert 0.15 < share < 0.25
    for group in ("Germany", "China", "New Zealand"):
        items = goqa.groups[group]
        train, test = split_items(items)
        assert [it.question for it in test] == [it.question for it in items if is_test(it.question)]
        assert [it.question for it in train] == [
            it.question for it in items if not is_test(it.question)
        ]
        assert len(train) + len(test) == len(items)


def test_summary_of_real_data(goqa: SurveyData) -> None:
    text = summary(select_groups(goqa, ["Germany", "France"]))
    assert "groups: 2" in text
    assert "skipped all-zero distributions: 1" in text
    train, test = split_items(goqa.groups["Germany"])
    assert any(
        line.split() == ["Germany", "264", str(len(train)), str(len(test)), "0"]
        for line in text.splitlines()
    )


def test_summary_and_skip_counts_of_a_small_file(tmp_path: Path) -> None:
    """Every all-zero distribution of a group is counted (not just whether it had one), and the
    summary lists at most ten notes, saying how many more there are."""
    rows = [jl(group="A", question=f"Z{i}", options=["x"], distribution=[0]) for i in range(3)]
    rows += [jl(group="A", question="Q", options=["x"], distribution=[1])] * 13
    data = load_jsonl(write(tmp_path, "s.jsonl", "".join(rows)))
    assert data.skipped_by_group == {"A": 3} and data.skipped_all_zero == 3
    assert len(data.notes) == 12
    lines = summary(data).splitlines()
    assert "skipped all-zero distributions: 3" in lines and "notes: 12" in lines
    assert [line for line in lines if "duplicate question" in line] == [
        f"  {n}" for n in data.notes[:10]
    ]
    assert "  ... 2 more" in lines
    assert lines[-1].split() == [
        "A",
        "1",
        *(["0", "1"] if is_test_question("Q") else ["1", "0"]),
        "3",
    ]


def test_summary_table_columns_line_up_under_the_header_for_short_group_names(
    tmp_path: Path,
) -> None:
    rows = [jl(group=g, question="Q", options=["x"], distribution=[1]) for g in ("A", "BC")]
    lines = summary(load_jsonl(write(tmp_path, "s.jsonl", "".join(rows)))).splitlines()
    header, *table = lines[-3:]
    assert header.split() == ["group", "items", "train", "test", "skipped"]
    assert [len(line) for line in table] == [len(header)] * 2
    assert [line[:7] for line in table] == ["A      ", "BC     "]


def test_summary_with_exactly_ten_notes_lists_them_all_and_no_more_line(tmp_path: Path) -> None:
    rows = [jl(group="A", question="Q", options=["x"], distribution=[1])] * 11
    data = load_jsonl(write(tmp_path, "s.jsonl", "".join(rows)))
    lines = summary(data).splitlines()
    assert "notes: 10" in lines
    assert [line for line in lines if line.startswith("  ")] == [f"  {n}" for n in data.notes]


def test_a_record_without_a_question_id_is_written_without_the_key(tmp_path: Path) -> None:
    item = SurveyItem("Q?", ("x", "y"), np.array([0.25, 0.75]))
    write_jsonl(SurveyData(groups={"A": [item]}), tmp_path / "o.jsonl")
    (line,) = (tmp_path / "o.jsonl").read_text("utf-8").splitlines()
    assert json.loads(line) == {
        "group": "A",
        "question": "Q?",
        "options": ["x", "y"],
        "distribution": [0.25, 0.75],
    }


def test_invalid_json_names_the_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", GOOD_JL + '{"group": "A", "question" 7}\n')
    with pytest.raises(
        InputError, match=r"c\.jsonl:2: invalid JSON: Expecting ':' delimiter \(column 27\)$"
    ):
        load_jsonl(path)


def test_a_number_python_will_not_read_is_refused_without_pythons_own_advice(
    tmp_path: Path,
) -> None:
    """Beyond 4300 digits Python refuses to read an integer and suggests
    sys.set_int_max_str_digits(): advice for a programmer, not for whoever wrote the file."""
    big = "1" + "0" * 5000
    path = write(tmp_path, "h.jsonl", jl_with().replace("[0.5, 0.5]", f"[{big}, 1]"))
    with pytest.raises(InputError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:1: cannot read a number in this line: ")
    assert "set_int_max_str_digits" not in message and "5001" not in message


# --------------------------------------------------------------------------------------------------
# small well-formed files

CSV_HEADER = "question,selections,options,source\n"


def csv_row(question: str, selections: str, options: str, source: str = "GAS") -> str:
    """One CSV record, quoted like the real file."""
    cells = [question, selections, options, source]
    return ",".join('"' + c.replace('"', '""') + '"' for c in cells) + "\n"


def sel(groups: dict[str, list[float]]) -> str:
    return f"defaultdict(<class 'list'>, {groups!r})"


def jl(**rec: object) -> str:
    return json.dumps(rec) + "\n"


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def test_csv_small_file(tmp_path: Path) -> None:
    text = (
        CSV_HEADER
        + csv_row(
            "Q one\nwith a second line", sel({"A": [0.2, 0.3], "B": [0.0, 0.0]}), "['x', 'y']"
        )
        + csv_row("Q two", "{'A': [1, 1, 2], 'C': [3, 0, 1]}", "[1, 2.5, 'z']")
    )
    data = load_global_opinions_csv(write(tmp_path, "s.csv", text))
    assert list(data.groups) == ["A", "C"]  # B had only an all-zero distribution
    assert data.skipped_all_zero == 1 and data.skipped_by_group == {"B": 1}
    a1, a2 = data.groups["A"]
    assert a1.question == "Q one\nwith a second line"
    np.testing.assert_allclose(a1.distribution, [0.4, 0.6])
    assert a2.options == ("1", "2.5", "z")  # numeric options become strings
    np.testing.assert_allclose(a2.distribution, [0.25, 0.25, 0.5])
    assert a2.question_id == question_id_for("Q two")


def test_csv_tolerates_crlf_bom_extra_and_reordered_columns(tmp_path: Path) -> None:
    text = (
        "\ufeffsource,options,extra,question,selections\r\n"
        + '"WVS","[\'a\', \'b\']","","Q?","{\'G\': [1, 3]}"\r\n'
        + "\r\n"
    )
    data = load_global_opinions_csv(write(tmp_path, "c.csv", text))
    np.testing.assert_allclose(data.groups["G"][0].distribution, [0.25, 0.75])


def test_csv_tolerates_a_bom_before_a_required_column_padded_names_and_blank_lines(
    tmp_path: Path,
) -> None:
    """The BOM is no part of the first column's name, spaces around a column name are not
    either, nor around an options literal (even a line break and an indent, which Python would
    read as an IndentationError), and a line of only whitespace between records is
    skipped like an empty one."""
    text = (
        "\ufeffquestion , selections,options\r\n"
        + "\"Q?\",\"{'G': [1, 3]}\",\"['a', 'b']\"\r\n"
        + "   \r\n"
        + "\"Q2?\",\"{'G': [1, 1]}\",\"\n  ['a', 'b'] \"\r\n"
    )
    data = load_global_opinions_csv(write(tmp_path, "c.csv", text))
    assert [it.question for it in data.groups["G"]] == ["Q?", "Q2?"]
    np.testing.assert_allclose(data.groups["G"][0].distribution, [0.25, 0.75])


def test_jsonl_tolerates_a_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "b.jsonl", "\ufeff" + GOOD_JL)
    assert [it.question for it in load_jsonl(path).groups["A"]] == ["Q1"]


def test_a_distribution_off_one_by_more_than_rounding_is_renormalised(tmp_path: Path) -> None:
    """Values are kept exactly only when they already sum to 1 up to float rounding; 1.0000001
    is a distribution to renormalise, not one to keep."""
    path = write(
        tmp_path,
        "n.jsonl",
        jl(group="A", question="Q1", options=["x", "y"], distribution=[0.5, 0.5000001])
        + jl(group="A", question="Q2", options=["x", "y"], distribution=[0.1, 0.9]),
    )
    off, exact = load_jsonl(path).groups["A"]
    assert abs(off.distribution.sum() - 1.0) <= 1e-12
    np.testing.assert_allclose(off.distribution, np.array([0.5, 0.5000001]) / 1.0000001)
    assert list(exact.distribution) == [0.1, 0.9]  # already sums to 1: kept as written


def test_jsonl_round_trip_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    """write_jsonl writes text unescaped; a record is one \\n-terminated line even when its
    strings hold other characters Python counts as line breaks (U+2028, U+0085, form feed)."""
    question = "First part\u2028second part\x85third\x0cfourth"
    data = SurveyData(
        groups={"Mali": [SurveyItem(question, ("a\u2029b", "c"), np.array([0.25, 0.75]))]}
    )
    path = tmp_path / "u.jsonl"
    write_jsonl(data, path)
    assert path.read_text(encoding="utf-8").count("\n") == 1
    (back,) = load_jsonl(path).groups["Mali"]
    assert (back.question, back.options) == (question, ("a\u2029b", "c"))
    assert list(back.distribution) == [0.25, 0.75]


def test_jsonl_small_file(tmp_path: Path) -> None:
    text = (
        "\n"
        + jl(group="A", question="Q1", options=["x", "y"], distribution=[1, 3], question_id="q1")
        + "   \n"
        + jl(group="B", question="Q1", options=["x", "y"], distribution=[0, 0])
        + jl(group="A", question="Q2", options=["x"], distribution=[0.5], extra="ignored")
        + jl(group="A", question="Q1", options=["x", "y"], distribution=[1, 0])
    )
    path = write(tmp_path, "s.jsonl", text)
    data = load_jsonl(path)
    assert list(data.groups) == ["A"]
    assert data.skipped_all_zero == 1
    a1, a2 = data.groups["A"]
    np.testing.assert_allclose(a1.distribution, [0.25, 0.75])  # renormalised counts
    assert a1.question_id == "q1" and a2.question_id == question_id_for("Q2")
    # the repeated (A, Q1) on line 6 is dropped, the first kept, and a note says so
    assert data.notes == [
        f"{path}:6: duplicate question for group 'A' (first at line 2); kept the first"
    ]


def test_jsonl_round_trip(goqa: SurveyData, tmp_path: Path) -> None:
    sub = select_groups(goqa, ["China", "India (Current national sample)", "Egypt"])
    path = tmp_path / "rt.jsonl"
    assert write_jsonl(sub, path) == n_items(sub)
    back = load_survey(path)
    assert list(back.groups) == list(sub.groups)
    for g, items in sub.groups.items():
        assert len(back.groups[g]) == len(items)
        for a, b in zip(items, back.groups[g], strict=True):
            assert (a.question, a.options, a.question_id) == (b.question, b.options, b.question_id)
            np.testing.assert_allclose(a.distribution, b.distribution, rtol=0, atol=1e-15)
    # writing what was read back gives the same bytes
    again = tmp_path / "rt2.jsonl"
    write_jsonl(back, again)
    assert again.read_bytes() == path.read_bytes()


def test_write_jsonl_leaves_no_temp_file_on_any_error(tmp_path: Path) -> None:
    """Not only OSError: text UTF-8 cannot encode (built in code, past the loaders) fails
    mid-write, and the half-written temp file must go too."""
    bad = SurveyData(groups={"A": [SurveyItem("Q\ud800", ("x",), np.array([1.0]))]})
    with pytest.raises(UnicodeEncodeError):
        write_jsonl(bad, tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_write_jsonl_refuses_nothing_and_unwritable(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothing to write"):
        write_jsonl(SurveyData(groups={}), tmp_path / "e.jsonl")
    one = SurveyData(groups={"A": [SurveyItem("Q", ("x",), np.array([1.0]))]})
    with pytest.raises(InputError, match="cannot write"):
        write_jsonl(one, tmp_path / "missing-dir" / "e.jsonl")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# --------------------------------------------------------------------------------------------------
# malformed input: every case names the file and the line where the bad record starts

GOOD_ROW = csv_row("First\nquestion over\nthree lines", sel({"A": [0.5, 0.5]}), "['x', 'y']")
# GOOD_ROW occupies lines 2-4, so a bad record after it starts on line 5; the bad records below
# span two lines (question with a newline) so that the start line differs from the end line
BAD_Q = "Bad\nquestion"

CSV_CASES: dict[str, tuple[str, int, str]] = {
    "missing column": ("question,options,source\n" + '"Q","[\'x\']","GAS"\n', 1, "missing column"),
    # the second options column was ignored without a word
    "repeated column": (
        "question,selections,options,options\n" + '"Q","{}","[\'x\']","[\'y\']"\n',
        1,
        "column(s) options appear more than once",
    ),
    "field count": (CSV_HEADER + GOOD_ROW + '"Bad\nquestion","{}"\n', 5, "expected 4 fields"),
    "too many fields": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0]}), "['x']").rstrip("\n") + ',"x"\n',
        5,
        "expected 4 fields (question, selections, options, source), found 5",
    ),
    "unterminated quote": (
        CSV_HEADER + GOOD_ROW + '"Bad\nquestion,"{}","[]","GAS"\n',
        5,
        "malformed CSV record",
    ),
    "text after quote": (
        CSV_HEADER + GOOD_ROW + '"Bad\nquestion"x,"{}","[]","GAS"\n',
        5,
        "malformed CSV record",
    ),
    "selections syntax": (
        CSV_HEADER
        + GOOD_ROW
        + csv_row(BAD_Q, "defaultdict(<class 'list'>, {'A': [0.5,)})", "['x']"),
        5,
        "cannot parse selections",
    ),
    "selections unclosed": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "defaultdict(<class 'list'>, {'A': [0.5]", "['x']"),
        5,
        "selections has no {...} dict",
    ),
    "selections no dict": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "nothing here", "['x']"),
        5,
        "selections has no {...} dict",
    ),
    "selections a set": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{1, 2}", "['x']"),
        5,
        "selections is not a dict",
    ),
    "selections empty": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{}", "['x']"),
        5,
        "selections has no groups",
    ),
    "selections call": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A': __import__('os')}", "['x']"),
        5,
        "cannot parse selections",
    ),
    "group not a string": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{1: [1.0]}", "['x']"),
        5,
        "group name must be a non-empty string",
    ),
    "options syntax": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0]}), "['x'"),
        5,
        "cannot parse options",
    ),
    "options not a list": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0]}), "'x'"),
        5,
        "options must be a list",
    ),
    "options empty": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": []}), "[]"),
        5,
        "options is empty",
    ),
    "option not a string": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0]}), "[None]"),
        5,
        "options[0] must be a string",
    ),
    "option blank": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0, 1.0]}), "['x', ' ']"),
        5,
        "options[1] is empty",
    ),
    "duplicate options": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0, 1.0]}), "['x', 'x']"),
        5,
        "option 'x' appears twice",
    ),
    "length mismatch": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [0.5, 0.5, 0.0]}), "['x', 'y']"),
        5,
        "selections['A'] has 3 values but there are 2 options",
    ),
    "values not a list": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A': 0.5}", "['x']"),
        5,
        "selections['A'] must be a list",
    ),
    "negative": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [0.5, -0.1]}), "['x', 'y']"),
        5,
        "selections['A'][1] is negative",
    ),
    "infinite": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A': [1e999, 0.5]}", "['x', 'y']"),
        5,
        "selections['A'][0] is not finite",
    ),
    "not a number": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A': ['0.5', 0.5]}", "['x', 'y']"),
        5,
        "selections['A'][0] must be a number",
    ),
    "option boolean": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0, 1.0]}), "[True, 'x']"),
        5,
        "options[0] must be a string",
    ),
    "boolean value": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A': [True, 0.5]}", "['x', 'y']"),
        5,
        "selections['A'][0] must be a number",
    ),
    "empty question": (
        CSV_HEADER + GOOD_ROW + csv_row("  ", sel({"A": [1.0]}), "['x']"),
        5,
        "question is empty",
    ),
    # a Python literal may spell a lone surrogate, which no UTF-8 file can hold or write
    "group lone surrogate": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, "{'A\\ud800': [1.0]}", "['x']"),
        5,
        "group 'A\\ud800' is not valid UTF-8 text",
    ),
    "option lone surrogate": (
        CSV_HEADER + GOOD_ROW + csv_row(BAD_Q, sel({"A": [1.0, 1.0]}), "['x', 'y\\udc80']"),
        5,
        "options[1] is not valid UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_csv_malformed(tmp_path: Path, case: str) -> None:
    text, line, message = CSV_CASES[case]
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(InputError) as err:
        load_global_opinions_csv(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert message in str(err.value)


def test_csv_not_utf8_names_line(tmp_path: Path) -> None:
    raw = (CSV_HEADER + GOOD_ROW).encode() + csv_row("Caf\xe9", sel({"A": [1.0]}), "['x']").encode(
        "latin-1"
    )
    path = write(tmp_path, "latin.csv", raw)
    with pytest.raises(InputError, match=rf"^{path}:5: not UTF-8 text"):
        load_global_opinions_csv(path)


def test_a_survey_path_that_is_no_survey_file_is_refused_before_memory_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/zero (a typo in a path, a device) never ends; a file far larger than any survey is
    another wrong path. Both are refused with the limit named (lowered here to 1 MiB)."""
    monkeypatch.setattr("pluralfed.data.MAX_SURVEY_BYTES", 1 << 20)
    big = write(tmp_path, "big.csv", b"\0" * ((1 << 20) + 1))
    for load, path in ((load_jsonl, Path("/dev/zero")), (load_global_opinions_csv, big)):
        with pytest.raises(InputError) as err:
            load(path)
        assert str(err.value) == (
            f"{path}: more than 1 MiB, too large for a survey file (surveys are a few MB): "
            "is it the right file?"
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty file"), ("\n\n", "empty file"), (CSV_HEADER, "no records")],
    ids=["zero bytes", "blank lines", "header only"],
)
def test_csv_empty(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "empty.csv", text)
    with pytest.raises(InputError, match=rf"^{path}: .*{message}"):
        load_global_opinions_csv(path)


GOOD_JL = jl(group="A", question="Q1", options=["x", "y"], distribution=[0.5, 0.5])
# the bad record is on line 4: a good record, a blank line (ignored but counted), a good record
JL_PREFIX = GOOD_JL + "\n" + jl(group="B", question="Q1", options=["x", "y"], distribution=[1, 0])
JL_OK = {"group": "A", "question": "Q2", "options": ["x", "y"], "distribution": [0.5, 0.5]}


DROP = object()  # jl_with(field=DROP) leaves the field out


def jl_with(**changes: object) -> str:
    """A JSON line: a good record with some fields changed or dropped."""
    rec = {**JL_OK, **changes}
    return json.dumps({k: v for k, v in rec.items() if v is not DROP}) + "\n"


JSONL_CASES: dict[str, tuple[str, str]] = {
    "invalid json": ('{"group": "A", "question": \n', "invalid JSON"),
    "nested too deeply": ('{"a": ' * 100_000 + "\n", "invalid JSON: nested too deeply"),
    "trailing garbage": (jl_with().rstrip("\n") + " x\n", "invalid JSON"),
    "not an object": ('["A", "Q2"]\n', "expected a JSON object, got list"),
    "missing distribution": (jl_with(distribution=DROP), "missing field(s) distribution"),
    "missing group and options": (
        jl_with(group=DROP, options=DROP),
        "missing field(s) group, options",
    ),
    "group not a string": (jl_with(group=3), "group must be a non-empty string"),
    "group empty": (jl_with(group=""), "group must be a non-empty string"),
    "question not a string": (jl_with(question=["Q"]), "question must be a string"),
    "question blank": (jl_with(question=" \t"), "question is empty"),
    "question invisible": (jl_with(question="\u200b\u200c"), "question is empty"),
    "options not a list": (jl_with(options="x, y"), "options must be a list"),
    "options empty": (jl_with(options=[], distribution=[]), "options is empty"),
    "option not a string": (jl_with(options=["x", 2]), "options[1] must be a string"),
    "option blank": (jl_with(options=["x", ""]), "options[1] is empty"),
    "option invisible": (jl_with(options=["x", "\ufeff"]), "options[1] is empty"),
    "duplicate options": (jl_with(options=["x", "x"]), "option 'x' appears twice"),
    "distribution not a list": (jl_with(distribution={"x": 1}), "distribution must be a list"),
    "length mismatch": (
        jl_with(distribution=[0.2, 0.3, 0.5]),
        "distribution has 3 values but there are 2 options",
    ),
    "value not a number": (jl_with(distribution=["0.5", 0.5]), "distribution[0] must be a number"),
    "value null": (jl_with(distribution=[0.5, None]), "distribution[1] must be a number"),
    "value boolean": (jl_with(distribution=[True, False]), "distribution[0] must be a number"),
    "negative": (jl_with(distribution=[0.5, -0.5]), "distribution[1] is negative"),
    "nan": (jl_with().replace("[0.5, 0.5]", "[NaN, 0.5]"), "distribution[0] is not finite"),
    "infinity": (
        jl_with().replace("[0.5, 0.5]", "[0.5, Infinity]"),
        "distribution[1] is not finite",
    ),
    "huge number": (
        jl_with().replace("[0.5, 0.5]", "[0.5, 1e999]"),
        "distribution[1] is not finite",
    ),
    "question_id not a string": (jl_with(question_id=7), "question_id must be a non-empty string"),
    "question_id empty": (
        jl_with(question_id=""),
        "question_id must be a non-empty string, got ''",
    ),
    # json.dumps writes these as the escapes "\\ud800" etc., which json.loads reads back as lone
    # surrogates: valid JSON, but not text UTF-8 can encode (hashing or writing it would crash)
    "question lone surrogate": (jl_with(question="Q\ud800?"), "question is not valid UTF-8"),
    "option lone surrogate": (jl_with(options=["x", "y\udc80"]), "options[1] is not valid UTF-8"),
    "group lone surrogate": (jl_with(group="M\udc80li"), "group is not valid UTF-8 text"),
    "question_id lone surrogate": (jl_with(question_id="q\ud800"), "question_id is not valid"),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_malformed(tmp_path: Path, case: str) -> None:
    bad, message = JSONL_CASES[case]
    path = write(tmp_path, "bad.jsonl", JL_PREFIX + bad + GOOD_JL)
    with pytest.raises(InputError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:4: "), str(err.value)
    assert message in str(err.value)


def test_jsonl_not_utf8_names_line(tmp_path: Path) -> None:
    raw = JL_PREFIX.encode() + jl_with(question="Caf\xe9").encode("latin-1").replace(
        b"\\u00e9", b"\xe9"
    )
    path = write(tmp_path, "latin.jsonl", raw)
    with pytest.raises(InputError, match=rf"^{path}:4: not UTF-8 text"):
        load_jsonl(path)


def test_jsonl_array_file(tmp_path: Path) -> None:
    path = write(tmp_path, "array.json", json.dumps([JL_OK]) + "\n")
    with pytest.raises(InputError, match=rf"^{path}:1: looks like a JSON array"):
        load_survey(path)


@pytest.mark.parametrize("text", ["", "\n  \n\n"], ids=["zero bytes", "blank lines"])
def test_jsonl_empty(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "empty.jsonl", text)
    with pytest.raises(InputError, match=rf"^{path}: no records"):
        load_jsonl(path)


@pytest.mark.parametrize(
    "loader", [load_global_opinions_csv, load_jsonl, load_survey], ids=["csv", "jsonl", "survey"]
)
def test_missing_file_and_directory(tmp_path: Path, loader: Callable[[Path], SurveyData]) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match=rf"^{missing}: file not found"):
        loader(missing)
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(InputError, match=rf"^{folder}: is a directory"):
        loader(folder)


def test_load_survey_dispatch(tmp_path: Path) -> None:
    jsonl_text = jl_with()
    for name in ("a.jsonl", "b.JSONL", "c.ndjson", "d.json"):
        data = load_survey(write(tmp_path, name, jsonl_text))
        assert list(data.groups) == ["A"]
    csv_text = CSV_HEADER + GOOD_ROW
    assert list(load_survey(write(tmp_path, "e.CSV", csv_text)).groups) == ["A"]
    for name in ("f.txt", "noext"):
        path = write(tmp_path, name, jsonl_text)
        with pytest.raises(InputError, match=rf"^{path}: unknown file type"):
            load_survey(path)


def test_unknown_and_unusable_groups_in_loader(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "g.jsonl",
        GOOD_JL + jl(group="Zed", question="Q1", options=["x"], distribution=[0]),
    )
    with pytest.raises(InputError) as err:
        load_jsonl(path, groups=["a", "Nobody"])
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown group(s): 'a' (did you mean 'A'?); 'Nobody'")
    assert "Available (2): A, Zed" in msg
    with pytest.raises(InputError, match="'Zed' have only all-zero distributions"):
        load_jsonl(path, groups=["Zed"])
    # a bare string is one group name, not an iterable of letters
    assert list(load_jsonl(path, groups="A").groups) == ["A"]


def test_a_negative_value_however_small_is_refused(tmp_path: Path) -> None:
    """No tolerance for rounding below zero: a value of -1e-300 would renormalise into a
    negative probability, which no distribution has."""
    path = write(tmp_path, "n.jsonl", jl_with(distribution=[1.0, -1e-300]))
    with pytest.raises(InputError, match=r"n\.jsonl:1: distribution\[1\] is negative \(-1e-300\)$"):
        load_jsonl(path)


def test_csv_values_given_as_a_tuple_load_like_a_list(tmp_path: Path) -> None:
    """selections is a Python literal: a group's values written as a tuple are as good as a list."""
    text = CSV_HEADER + csv_row("Q", "{'A': (1, 3), 'B': [1, 3]}", "('x', 'y')")
    data = load_global_opinions_csv(write(tmp_path, "t.csv", text))
    assert data.groups["A"][0].options == ("x", "y")
    np.testing.assert_array_equal(data.groups["A"][0].distribution, [0.25, 0.75])
    np.testing.assert_array_equal(data.groups["B"][0].distribution, [0.25, 0.75])


def test_csv_group_names_holding_braces_load_whole(tmp_path: Path) -> None:
    """The selections dict is the text from its first '{' to its LAST '}': a group name holding
    a brace does not end it early."""
    text = CSV_HEADER + csv_row("Q", sel({"A}": [1.0, 3.0], "{B}": [2.0, 2.0]}), "['x', 'y']")
    data = load_global_opinions_csv(write(tmp_path, "b.csv", text))
    assert list(data.groups) == ["A}", "{B}"]
    np.testing.assert_allclose(data.groups["A}"][0].distribution, [0.25, 0.75])


# --------------------------------------------------------------------------------------------------
# helpers


def test_select_groups(goqa: SurveyData) -> None:
    sub = select_groups(goqa, ["China", "France", "China"])
    assert list(sub.groups) == ["China", "France"]
    assert sub.skipped_by_group == {"China": 1, "France": 1} and sub.skipped_all_zero == 2
    assert sub.groups["China"] is goqa.groups["China"]
    assert sub.notes == goqa.notes and sub.notes is not goqa.notes  # its own list of them
    # a bare string is one group name, not an iterable of letters (a one-letter name cannot tell)
    assert list(select_groups(goqa, "China").groups) == ["China"]
    with pytest.raises(InputError) as err:
        select_groups(goqa, ["Frnace", "Germany", "india"])
    msg = str(err.value)
    assert "unknown group(s): 'Frnace' (did you mean 'France'" in msg
    india = msg.split("'india' (did you mean ")[1].split("?)")[0]
    assert "'India (Current national sample)'" in india
    assert "Available (130):" in msg and "Germany" not in msg.split("Available")[0]
    with pytest.raises(InputError, match="empty list of groups"):
        select_groups(goqa, [])
    with pytest.raises(InputError, match="non-empty strings"):
        select_groups(goqa, [""])
    with pytest.raises(InputError, match="group names must be non-empty strings, got 3"):
        select_groups(goqa, ["China", 3])  # type: ignore[list-item]


def test_an_unknown_group_is_hinted_at_most_five_close_names() -> None:
    """Case-insensitive equal first, then up to three names holding it, then the closest
    spellings: five at most."""
    avail = ["ab", "xab1", "xab2", "xab3", "AB1", "AB2", "AB3"]
    message = unknown_groups_message("s.jsonl", ["AB"], avail)
    assert "'AB' (did you mean 'ab', 'xab1', 'xab2', 'xab3', 'AB3'?)." in message


def test_an_unknown_group_is_hinted_a_name_three_quarters_alike() -> None:
    message = unknown_groups_message("s.jsonl", ["Jpn"], ["Japan", "Mali"])
    assert (
        message
        == "s.jsonl: unknown group(s): 'Jpn' (did you mean 'Japan'?). Available (2): Japan, Mali"
    )


def test_an_unknown_group_asked_for_twice_is_named_once() -> None:
    data = SurveyData(groups={"A": [], "B": []}, source="s.jsonl")
    with pytest.raises(InputError) as err:
        select_groups(data, ["Nowhere", "A", "Nowhere"])
    assert str(err.value) == "s.jsonl: unknown group(s): 'Nowhere'. Available (2): A, B"


@pytest.mark.parametrize(("n_groups", "more"), [(40, ""), (41, ", ... 1 more")])
def test_an_unknown_group_message_lists_up_to_40_available_groups(n_groups: int, more: str) -> None:
    names = [f"g{i:02d}" for i in range(n_groups)]
    data = SurveyData(groups={n: [] for n in names}, source="s.jsonl")
    with pytest.raises(InputError) as err:
        select_groups(data, ["zzz"])
    assert str(err.value).endswith(f"Available ({n_groups}): " + ", ".join(names[:40]) + more)


def test_group_slugs_and_file_names() -> None:
    assert group_slug("India (Current national sample)") == "india-current-national-sample"
    assert group_slug("Côte d'Ivoire") == "cote-d-ivoire"
    assert group_slug("Palest. ter.") == "palest-ter"
    assert group_slug("../../etc/passwd") == "etc-passwd"
    assert group_slug("中国") == "group"
    names = group_file_names(["Group A", "group a", "Group-A", "Japan"])
    assert names["Japan"] == "japan.jsonl"
    assert len(set(names.values())) == 4
    assert all(n.startswith("group-a-") for g, n in names.items() if g != "Japan")
    digest = hashlib.sha256(b"group a").hexdigest()[:8]  # of the exact name
    assert names["group a"] == f"group-a-{digest}.jsonl"
    # a colliding name's file does not depend on which other names collide with it
    assert group_file_names(["Group A", "group a"])["Group A"] == names["Group A"]


def test_write_group_files(goqa: SurveyData, tmp_path: Path) -> None:
    sub = select_groups(goqa, ["New Zealand", "India (Current national sample)"])
    paths = write_group_files(sub, tmp_path / "nodes")
    manifest = json.loads((tmp_path / "nodes" / GROUPS_MANIFEST).read_text())
    assert manifest == {
        "New Zealand": "new-zealand.jsonl",
        "India (Current national sample)": "india-current-national-sample.jsonl",
    }
    for group, path in paths.items():
        one = load_jsonl(path)
        assert list(one.groups) == [group]  # each file holds its own group only
        assert [it.question for it in one.groups[group]] == [
            it.question for it in sub.groups[group]
        ]


def test_write_group_files_creates_the_missing_folders_on_the_way(
    goqa: SurveyData, tmp_path: Path
) -> None:
    out = tmp_path / "run" / "federation" / "nodes"
    paths = write_group_files(select_groups(goqa, ["New Zealand"]), out)
    assert paths == {"New Zealand": out / "new-zealand.jsonl"}
    assert sorted(p.name for p in out.iterdir()) == [GROUPS_MANIFEST, "new-zealand.jsonl"]


def test_hub_loader_without_datasets() -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed; the hub loader is never run in tests (network)")
    with pytest.raises(InputError, match="needs the `datasets` package"):
        load_global_opinions_hub()


def stand_in_hub(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, object]]) -> list[object]:
    """A `datasets` module whose load_dataset serves `rows` (the hub is the network); returns
    the list of what it was asked for."""
    asked: list[object] = []

    def load_dataset(name: str, split: str) -> list[dict[str, object]]:
        asked.append((name, split))
        return rows

    hub = types.ModuleType("datasets")
    hub.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", hub)
    return asked


def test_the_hub_loader_reads_the_published_rows_as_the_csv_loader_reads_the_file(
    goqa: SurveyData, goqa_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(goqa_csv, encoding="utf-8-sig", newline="") as f:
        rows: list[dict[str, object]] = list(csv.DictReader(f))
    asked = stand_in_hub(monkeypatch, rows)
    data = load_global_opinions_hub(groups=["Japan", "China"])
    assert asked == [("Anthropic/llm_global_opinions", "train")]
    assert data.source == "hf:Anthropic/llm_global_opinions"
    expected = select_groups(goqa, ["Japan", "China"])
    assert list(data.groups) == ["Japan", "China"]
    assert data.skipped_by_group == expected.skipped_by_group == {"China": 1}
    for group, items in expected.groups.items():
        got = data.groups[group]
        assert [(it.question, it.options, it.question_id) for it in got] == [
            (it.question, it.options, it.question_id) for it in items
        ]
        for a, b in zip(got, items, strict=True):
            np.testing.assert_array_equal(a.distribution, b.distribution)


GOOD_HUB_ROW: dict[str, object] = {
    "question": "Q1",
    "selections": "{'A': [1, 3]}",
    "options": "['x', 'y']",
}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD_HUB_ROW, "selections": {"A": [1, 3]}}, "selections and options must be strings"),
        ({**GOOD_HUB_ROW, "options": ["x", "y"]}, "selections and options must be strings"),
        ({"question": "Q2", "selections": "{'A': [1, 3]}"}, "missing column 'options'"),
    ],
    ids=["selections a dict", "options a list", "no options"],
)
def test_the_hub_loader_refuses_a_bad_row_naming_its_number(
    monkeypatch: pytest.MonkeyPatch, row: dict[str, object], message: str
) -> None:
    stand_in_hub(monkeypatch, [GOOD_HUB_ROW, row])
    with pytest.raises(InputError, match=rf"^hf:Anthropic/llm_global_opinions:2: {message}$"):
        load_global_opinions_hub()


# --------------------------------------------------------------------------------------------------
# CLI (the real `pluralfed` parser; the command's own errors propagate, for pytest.raises)


def run_cli(argv: list[str]) -> int:
    args = cli.build_parser().parse_args(argv)
    return int(args.func(args))


def test_cli_inspect(goqa_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["data", "inspect", str(goqa_csv), "--groups", "Japan", "New Zealand"]) == 0
    out = capsys.readouterr().out
    assert "groups: 2" in out
    japan = next(line for line in out.splitlines() if line.startswith("Japan "))
    assert japan.split()[1] == "178"


def test_cli_inspect_and_split_take_the_file_as_data_too(
    goqa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train, evaluate and federate take the survey as --data; `data inspect --data F` was
    "unrecognized arguments"."""
    assert run_cli(["data", "inspect", "--data", str(goqa_csv), "--groups", "Japan"]) == 0
    assert "groups: 1" in capsys.readouterr().out
    out = tmp_path / "nodes"
    assert (
        run_cli(
            ["data", "split", "--data", str(goqa_csv), "--groups", "Egypt", "--out-dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / GROUPS_MANIFEST).read_text()) == {"Egypt": "egypt.jsonl"}
    with pytest.raises(InputError, match="no survey file: give it as FILE or --data FILE"):
        run_cli(["data", "inspect"])
    with pytest.raises(InputError, match="two survey files"):
        run_cli(["data", "inspect", str(goqa_csv), "--data", str(tmp_path / "other.csv")])


def test_cli_convert_and_split(
    goqa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "protocol.jsonl"
    assert run_cli(["data", "convert", str(goqa_csv), str(out), "--protocol-groups"]) == 0
    data = load_jsonl(out)
    assert list(data.groups) == [*TRAINING_GROUPS, *HELD_OUT_GROUPS]
    assert n_items(data) == sum(README_COUNTS.values()) - 2

    assert run_cli(["data", "split", str(out), "--out-dir", str(tmp_path / "nodes")]) == 0
    manifest = json.loads((tmp_path / "nodes" / GROUPS_MANIFEST).read_text())
    assert len(manifest) == 14
    egypt = load_jsonl(tmp_path / "nodes" / manifest["Egypt"])
    assert list(egypt.groups) == ["Egypt"] and len(egypt.groups["Egypt"]) == 154
    assert "wrote 14 group files" in capsys.readouterr().out


@pytest.mark.parametrize("input_name", ["mali.jsonl", GROUPS_MANIFEST])
def test_cli_split_refuses_to_overwrite_its_input(tmp_path: Path, input_name: str) -> None:
    """Splitting a file into its own folder would replace it with one group's rows (or with
    the groups.json manifest): refused before anything is written."""
    text = jl(group="Mali", question="Q?", options=["x", "y"], distribution=[1, 2]) + jl(
        group="Chad", question="Q?", options=["x", "y"], distribution=[2, 1]
    )
    src = write(tmp_path, input_name, text)
    with pytest.raises(InputError, match=rf"^{tmp_path / input_name}: output would overwrite"):
        run_cli(["data", "split", str(src), "--out-dir", str(tmp_path)])
    assert src.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [input_name]  # nothing else written
    # the same file by another name (a symlink into the output folder) is refused too
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mali.jsonl").symlink_to(src)
    link = tmp_path / "out" / "mali.jsonl"
    with pytest.raises(InputError, match=rf"^{link}: output would overwrite the input {src}$"):
        run_cli(["data", "split", str(src), "--out-dir", str(tmp_path / "out")])
    assert src.read_text() == text


def test_cli_errors(goqa_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown group"):
        run_cli(["data", "inspect", str(goqa_csv), "--groups", "Atlantis"])
    with pytest.raises(InputError, match=r"output must be a \.jsonl file"):
        run_cli(["data", "convert", str(goqa_csv), str(tmp_path / "out.csv")])
    same = write(tmp_path, "same.jsonl", jl_with())
    with pytest.raises(InputError, match="would overwrite the input"):
        run_cli(["data", "convert", str(same), str(same)])
    with pytest.raises(SystemExit):  # argparse: missing --out-dir
        run_cli(["data", "split", str(goqa_csv)])


def test_full_cli_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through `pluralfed.cli.main`: an error is one line on stderr and exit code 2."""
    assert cli.main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# group names are identities: not two spellings of one name


NFC_NAME = "C\u00f4te d'Ivoire"  # "ô" as one code point
NFD_NAME = "Co\u0302te d'Ivoire"  # "o" + combining circumflex: looks the same


@pytest.mark.parametrize("name", ["Japan ", " Japan", "Japan\t", "\u00a0Japan"])
def test_group_names_with_surrounding_whitespace_are_refused(tmp_path: Path, name: str) -> None:
    """'Japan ' loaded as a group apart from 'Japan', which no allow-list or --groups named."""
    rows = jl(group="Japan", question="Q1", options=["x", "y"], distribution=[1, 2])
    rows += jl(group=name, question="Q2", options=["x", "y"], distribution=[1, 2])
    path = write(tmp_path, "g.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_jsonl(path)
    assert str(err.value) == (
        f"{path}:2: group name {name!r} has leading or trailing whitespace; remove it ('Japan')"
    )
    csv_path = write(
        tmp_path,
        "g.csv",
        CSV_HEADER + csv_row("Q1", sel({"Mali": [1, 2], name: [2, 1]}), "['x','y']"),
    )
    with pytest.raises(InputError) as err:
        load_global_opinions_csv(csv_path)
    assert str(err.value).startswith(f"{csv_path}:2: group name {name!r} has leading")


def test_group_names_equal_in_nfc_are_refused_naming_both(tmp_path: Path) -> None:
    """NFC and NFD spellings of one name loaded as two groups, each with part of the answers."""
    rows = jl(group=NFC_NAME, question="Q1", options=["x", "y"], distribution=[1, 2])
    rows += jl(group="Mali", question="Q1", options=["x", "y"], distribution=[1, 2])
    rows += jl(group=NFD_NAME, question="Q2", options=["x", "y"], distribution=[1, 2])
    path = write(tmp_path, "g.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_jsonl(path, groups=["Mali"])  # checked for every group, not only those asked for
    assert str(err.value) == (
        f"{path}:3: group {NFD_NAME!r} (escaped {NFD_NAME!a}, first here) and group "
        f"{NFC_NAME!r} (escaped {NFC_NAME!a}, first at {path}:1) differ only in Unicode "
        "normalisation (equal in NFC); spell them the same, e.g. both as "
        "unicodedata.normalize('NFC', name)"
    )
    body = csv_row("Q1", sel({NFD_NAME: [1, 2]}), "['x','y']")
    body += csv_row("Q2", sel({"Mali": [1, 2], NFC_NAME: [2, 1]}), "['x','y']")
    csv_path = write(tmp_path, "g.csv", CSV_HEADER + body)
    with pytest.raises(InputError, match=rf"^{csv_path}:3: group .* first at {csv_path}:2\)"):
        load_global_opinions_csv(csv_path)
    # one spelling throughout, whichever it is, loads as before
    same = rows.replace(json.dumps(NFD_NAME), json.dumps(NFC_NAME))  # as json.dumps wrote it
    assert list(load_jsonl(write(tmp_path, "ok.jsonl", same)).groups) == [NFC_NAME, "Mali"]


def test_a_requested_name_that_differs_only_in_spelling_gets_the_reason(tmp_path: Path) -> None:
    """Asked for 'Japan ' or an NFD name, the hint named a group that looked the same."""
    rows = jl(group="Japan", question="Q1", options=["x", "y"], distribution=[1, 2])
    rows += jl(group=NFC_NAME, question="Q1", options=["x", "y"], distribution=[1, 2])
    path = write(tmp_path, "g.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_jsonl(path, groups=["Japan ", NFD_NAME])
    assert str(err.value).startswith(
        f"{path}: unknown group(s): 'Japan ' (did you mean 'Japan'? remove the leading or "
        f"trailing whitespace); {NFD_NAME!r} (did you mean {NFC_NAME!r}? the same text in another "
        f"Unicode normalisation: asked for {NFD_NAME!a}, the data has {NFC_NAME!a})"
    )
