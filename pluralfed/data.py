"""Survey data in one in-memory form: group -> list of SurveyItem.

Every loader returns a SurveyData; everything downstream (embedding, training, metrics) reads only
that. Loaders check their input hard and fail with an `InputError` naming `file:LINE: what is
wrong`, because a silently mangled distribution would only show up much later, as a bad score.

Input formats
=============

GlobalOpinionQA CSV (`.csv`)
----------------------------
The layout of `data/global_opinions.csv` in Anthropic/llm_global_opinions: a header row with (at
least) the columns ``question``, ``selections`` and ``options`` (other columns, e.g. ``source``, are
ignored).

* ``selections``: a Python-literal string
  ``defaultdict(<class 'list'>, {'Country': [p1, p2, ...], ...})``; the ``{...}`` part is parsed
  with `ast.literal_eval` (never eval), so a bare ``{...}`` dict works too;
* ``options``: a Python-literal list, e.g. ``['Yes', 'No', 'DK/Refused']``; numeric options become
  strings.

Questions may contain newlines; error messages name the line where the record STARTS.

Generic JSON lines (`.jsonl`, `.ndjson`, `.json`)
-------------------------------------------------
One JSON object per line, one line per (group, question); blank lines are ignored::

    {"group": "France", "question": "Is it?", "options": ["Yes", "No"], "distribution": [0.6, 0.4]}
    {"group": "Japan", "question": "Is it?", "options": ["Yes", "No"], "distribution": [31, 69]}
    {"group": "Mali", "question": "Q?", "question_id": "q7", "options": ["A"], "distribution": [2]}

* ``group``: non-blank string, the group (e.g. a country) whose answers these are;
* ``question``: non-empty string, used verbatim (the PROTOCOL.md train/test split hashes this text);
* ``options``: non-empty list of distinct non-empty strings;
* ``distribution``: list of finite non-negative numbers, one per option: probabilities or counts,
  since they are renormalised to sum 1 (an all-zero distribution is skipped and counted);
* ``question_id``: optional string (or null); defaults to `question_id_for(question)`.

Other keys are ignored, so files may carry extra annotations. `write_jsonl` writes this format.

Rules common to both formats
----------------------------
* Distributions are renormalised to sum 1; all-zero ones are skipped and counted in
  `SurveyData.skipped_all_zero` (and per group in `SurveyData.skipped_by_group`).
* Group names are identities (allow-lists, certificates, --groups name them exactly), so they
  are refused, never silently fixed, when they have leading or trailing whitespace, or when two
  distinct names are equal after `unicodedata.normalize("NFC", ...)` (the same text in two
  Unicode normalisations, which look alike and would load as two groups).
* A repeated (group, question) pair keeps its FIRST occurrence; each repeat adds a line to
  `SurveyData.notes` (the real GlobalOpinionQA file has one such pair).
* A file with no records at all is an error; so is a requested group that is not in the file.
"""

from __future__ import annotations

import ast
import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pluralfed.errors import InputError
from pluralfed.fsutil import (
    InputTooLarge,
    atomic_write_bytes,
    read_input_bytes,
    same_file,
    size_text,
)

GOQA_REQUIRED_COLUMNS: tuple[str, ...] = ("question", "selections", "options")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES: tuple[str, ...] = (".csv",)
HUB_DATASET = "Anthropic/llm_global_opinions"
GROUPS_MANIFEST = "groups.json"


@dataclass(frozen=True)
class SurveyItem:
    """One group's answers to one question: how the group's answers spread over the options."""

    question: str
    options: tuple[str, ...]
    distribution: np.ndarray  # float64, shape (len(options),), non-negative, sums to 1
    question_id: str | None = None


@dataclass
class SurveyData:
    """group name -> its items, plus what loading skipped (all-zero distributions)."""

    groups: dict[str, list[SurveyItem]]
    skipped_all_zero: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # all-zero distributions skipped, per group (sums to skipped_all_zero), so that a selection of
    # groups can still say what it lost
    skipped_by_group: dict[str, int] = field(default_factory=dict)


def is_test_question(question: str) -> bool:
    """PROTOCOL.md split: a question is a TEST question iff sha256(text) % 5 == 0."""
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 5 == 0


def split_items(items: list[SurveyItem]) -> tuple[list[SurveyItem], list[SurveyItem]]:
    """(train, test) per PROTOCOL.md, order preserved."""
    train = [it for it in items if not is_test_question(it.question)]
    test = [it for it in items if is_test_question(it.question)]
    return train, test


def question_id_for(question: str) -> str:
    """A stable id from the question text alone (first 16 hex chars of its sha256), so that the same
    question gets the same id in every file and every group."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# validation shared by the loaders


class _Collector:
    """Builds a SurveyData record by record: group filter, all-zero skipping, duplicate notes."""

    def __init__(self, source: str, groups: Iterable[str] | None) -> None:
        self.source = source
        self.wanted: list[str] | None = _normalise_group_names(groups)
        self.wanted_set = set(self.wanted) if self.wanted is not None else None
        self.groups: dict[str, list[SurveyItem]] = {}
        self.seen_groups: dict[str, None] = {}  # every group name in the file, in order
        # NFC form of each group name -> (the name as first spelled, where it first occurs)
        self.first_spelling: dict[str, tuple[str, str]] = {}
        self.first_line: dict[tuple[str, str], int] = {}
        self.skipped_by_group: dict[str, int] = {}
        self.notes: list[str] = []
        self.records = 0

    def add(
        self,
        where: str,
        line: int,
        group: str,
        question: str,
        options: tuple[str, ...],
        values: Sequence[float],
        question_id: str | None,
    ) -> None:
        if group not in self.seen_groups:
            self._check_new_spelling(where, group)
        self.seen_groups.setdefault(group, None)
        if self.wanted_set is not None and group not in self.wanted_set:
            return
        dist = np.asarray(values, dtype=np.float64)
        normalised = normalise_distribution(dist)
        if normalised is None:  # all zero (negatives were rejected before)
            self.skipped_by_group[group] = self.skipped_by_group.get(group, 0) + 1
            return
        key = (group, question)
        if key in self.first_line:
            self.notes.append(
                f"{where}: duplicate question for group {group!r} "
                f"(first at line {self.first_line[key]}); kept the first"
            )
            return
        self.first_line[key] = line
        item = SurveyItem(
            question=question,
            options=options,
            # values already summing to 1 (up to rounding) are kept as they are, so that writing
            # and reading back is exact
            distribution=dist if _sums_to_one(dist) else normalised,
            question_id=question_id if question_id is not None else question_id_for(question),
        )
        self.groups.setdefault(group, []).append(item)

    def _check_new_spelling(self, where: str, group: str) -> None:
        """Refuse a group name that is another's in a different Unicode normalisation (NFC "ô"
        vs NFD "o" + combining accent): they look the same, yet would load as two groups, each
        with part of the answers. Not merged silently, since a name is an identity (allow-lists,
        certificates, --groups): the file must spell it one way."""
        key = unicodedata.normalize("NFC", group)
        if key in self.first_spelling:
            other, other_where = self.first_spelling[key]
            raise InputError(
                f"{where}: group {group!r} (escaped {group!a}, first here) and group "
                f"{other!r} (escaped {other!a}, first at {other_where}) differ only in "
                "Unicode normalisation (equal in NFC); spell them the same, e.g. both as "
                "unicodedata.normalize('NFC', name)"
            )
        self.first_spelling[key] = (group, where)

    def finish(self) -> SurveyData:
        if self.records == 0:
            raise InputError(f"{self.source}: no records (empty file?)")
        groups = self.groups
        if self.wanted is not None:
            unknown = [g for g in self.wanted if g not in self.seen_groups]
            if unknown:
                raise InputError(unknown_groups_message(self.source, unknown, self.seen_groups))
            unusable = [g for g in self.wanted if g not in groups]
            if unusable:
                raise InputError(
                    f"{self.source}: group(s) {_names(unusable)} have only all-zero distributions"
                )
            groups = {g: groups[g] for g in self.wanted}
        return SurveyData(
            groups=groups,
            skipped_all_zero=sum(self.skipped_by_group.values()),
            source=self.source,
            notes=self.notes,
            skipped_by_group=self.skipped_by_group,
        )


def normalise_distribution(dist: np.ndarray) -> np.ndarray | None:
    """Finite non-negative values scaled to sum 1, or None when all are zero. Values whose sum
    overflows float64 (two of 1e308) are scaled by their largest first, so they normalise like any
    others instead of turning into inf / inf = NaN or, worse, silently into zeros."""
    peak = float(dist.max(initial=0.0))
    if peak <= 0.0:
        return None
    with np.errstate(over="ignore"):  # an overflowing sum is handled right below
        total = float(dist.sum())
    if not math.isfinite(total):
        dist = dist / peak
        total = float(dist.sum())
    return dist / total


def _sums_to_one(dist: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # an overflowing sum is simply not 1
        return abs(float(dist.sum()) - 1.0) <= 1e-12


def _normalise_group_names(groups: Iterable[str] | None) -> list[str] | None:
    """Requested group names, de-duplicated, in order; a bare string is one group, not letters."""
    if groups is None:
        return None
    if isinstance(groups, str):
        groups = [groups]
    names: list[str] = []
    for name in groups:
        if not isinstance(name, str) or not name:
            raise InputError(f"group names must be non-empty strings, got {name!r}")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("an empty list of groups was requested")
    return names


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def unknown_groups_message(source: str, unknown: list[str], available: Iterable[str]) -> str:
    """Says which names are unknown, the closest known ones and what is available."""
    avail = list(available)
    parts = []
    for name in unknown:
        same = [a for a in avail if _same_name_apart_from_spelling(name, a)]
        if same:  # looks exactly like a known name: say what differs, or the hint looks wrong
            parts.append(
                f"{name!r} (did you mean {same[0]!r}? {_spelling_difference(name, same[0])})"
            )
            continue
        folded = name.casefold()
        close = [a for a in avail if a.casefold() == folded]
        close += [a for a in avail if folded in a.casefold() and a not in close][:3]
        close += [a for a in difflib.get_close_matches(name, avail, 3, 0.5) if a not in close]
        close = close[:5]
        parts.append(f"{name!r}" + (f" (did you mean {_names(close)}?)" if close else ""))
    shown = avail if len(avail) <= 40 else [*avail[:40], f"... {len(avail) - 40} more"]
    prefix = f"{source}: " if source else ""
    return (
        f"{prefix}unknown group(s): {'; '.join(parts)}. "
        f"Available ({len(avail)}): {', '.join(shown)}"
    )


def _same_name_apart_from_spelling(name: str, known: str) -> bool:
    """True if `name` is `known` but for surrounding whitespace or Unicode normalisation."""
    return name != known and unicodedata.normalize("NFC", name.strip()) == unicodedata.normalize(
        "NFC", known
    )


def _spelling_difference(name: str, known: str) -> str:
    """What makes `name` differ from `known` (see `_same_name_apart_from_spelling`)."""
    if name != name.strip():
        return "remove the leading or trailing whitespace"
    return (
        f"the same text in another Unicode normalisation: asked for {name!a}, "
        f"the data has {known!a}"
    )


def _check_values(where: str, what: str, values: Any, n_options: int) -> list[float]:
    """A list of finite non-negative numbers, one per option, or an InputError saying why not."""
    if not isinstance(values, list | tuple):
        raise InputError(f"{where}: {what} must be a list of numbers, got {type(values).__name__}")
    if len(values) != n_options:
        raise InputError(
            f"{where}: {what} has {len(values)} values but there are {n_options} options"
        )
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InputError(f"{where}: {what}[{i}] must be a number, got {v!r}")
        try:
            f = float(v)
        except OverflowError:  # an integer literal beyond float64 (1 followed by 400 zeros)
            raise InputError(
                f"{where}: {what}[{i}] is too large: an integer of about "
                f"{int(int(v).bit_length() * math.log10(2)) + 1} digits, beyond float64 "
                "(about 1.8e308)"
            ) from None
        if not math.isfinite(f):
            raise InputError(f"{where}: {what}[{i}] is not finite ({v!r})")
        if f < 0:
            raise InputError(f"{where}: {what}[{i}] is negative ({v!r})")
        out.append(f)
    return out


def is_blank(text: str) -> bool:
    """True if `text` shows nothing: only whitespace and invisible format or control characters
    (zero-width spaces and joiners, byte-order marks, ...), which `str.strip` keeps."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def _check_utf8(where: str, what: str, text: str) -> None:
    """Refuse text Python holds but UTF-8 cannot encode (a lone surrogate such as JSON's
    "\\ud800"): it passes every other check and would crash later, when hashed or written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: {what} is not valid UTF-8 text") from None


def _check_options(where: str, options: Any, *, allow_numbers: bool) -> tuple[str, ...]:
    """Non-empty, distinct, non-empty option strings (numbers turned into strings if allowed)."""
    if not isinstance(options, list | tuple):
        raise InputError(f"{where}: options must be a list, got {type(options).__name__}")
    if not options:
        raise InputError(f"{where}: options is empty")
    out: list[str] = []
    for i, o in enumerate(options):
        if allow_numbers and isinstance(o, int | float) and not isinstance(o, bool):
            o = str(o)
        if not isinstance(o, str):
            raise InputError(f"{where}: options[{i}] must be a string, got {o!r}")
        if is_blank(o):
            raise InputError(f"{where}: options[{i}] is empty")
        _check_utf8(where, f"options[{i}]", o)
        if o in out:
            raise InputError(f"{where}: option {o!r} appears twice")
        out.append(o)
    return tuple(out)


def _check_question(where: str, question: Any) -> str:
    if not isinstance(question, str):
        raise InputError(f"{where}: question must be a string, got {type(question).__name__}")
    if is_blank(question):
        raise InputError(f"{where}: question is empty")
    _check_utf8(where, "question", question)
    return question


def _check_group(where: str, group: Any) -> str:
    if not isinstance(group, str) or is_blank(group):
        raise InputError(f"{where}: group must be a non-empty string, got {group!r}")
    _check_utf8(where, "group", group)
    _check_group_spaces(where, group)
    return group


def _check_group_spaces(where: str, group: str) -> None:
    """Refuse leading or trailing whitespace in a group name: "Japan " would load as a group
    apart from "Japan", and no allow-list, certificate or --groups would name it. Refused, not
    stripped, since a group name is an identity and must be the same everywhere."""
    if group != group.strip():
        raise InputError(
            f"{where}: group name {group!r} has leading or trailing whitespace; "
            f"remove it ({group.strip()!r})"
        )


# --------------------------------------------------------------------------------------------------
# GlobalOpinionQA CSV


def _parse_goqa_record(
    where: str, selections: str, options: str
) -> tuple[tuple[str, ...], list[tuple[str, list[float]]]]:
    """(options, [(group, values)]) from one record's `selections` and `options` strings."""
    try:
        opts_raw = ast.literal_eval(options.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise InputError(f"{where}: cannot parse options {_short(options)}: {err}") from None
    opts = _check_options(where, opts_raw, allow_numbers=True)

    start, end = selections.find("{"), selections.rfind("}")
    if start < 0 or end < start:
        raise InputError(f"{where}: selections has no {{...}} dict: {_short(selections)}")
    try:
        tree = ast.parse(selections[start : end + 1].strip(), mode="eval").body
        if isinstance(tree, ast.Dict):  # a literal dict keeps the last of two equal keys: refuse
            keys = Counter(ast.literal_eval(k) for k in tree.keys if k is not None)
            twice = sorted(repr(k) for k, n in keys.items() if n > 1)
            if twice:
                raise InputError(f"{where}: selections lists group {', '.join(twice)} twice")
        sel = ast.literal_eval(tree)
    except InputError:
        raise
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise InputError(f"{where}: cannot parse selections {_short(selections)}: {err}") from None
    if not isinstance(sel, dict):
        raise InputError(f"{where}: selections is not a dict: {_short(selections)}")
    if not sel:
        raise InputError(f"{where}: selections has no groups")
    pairs: list[tuple[str, list[float]]] = []
    for group, values in sel.items():
        if not isinstance(group, str) or is_blank(group):
            raise InputError(f"{where}: group name must be a non-empty string, got {group!r}")
        _check_utf8(where, f"group {group!r}", group)
        _check_group_spaces(where, group)
        pairs.append((group, _check_values(where, f"selections[{group!r}]", values, len(opts))))
    return opts, pairs


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# The most a survey file may hold. Surveys are a few MB (GlobalOpinionQA's CSV: 1.3 MB); this
# leaves room for any real one, yet a wrong path (/dev/zero, a disk image) is refused before it
# fills the memory.
MAX_SURVEY_BYTES = 1 << 30


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text (a BOM is tolerated); OS and decoding errors become InputErrors,
    a decoding error naming its line."""
    try:
        raw = read_input_bytes(path, MAX_SURVEY_BYTES)
    except InputTooLarge:
        raise InputError(
            f"{path}: more than {size_text(MAX_SURVEY_BYTES)}, too large for a survey file "
            "(surveys are a few MB): is it the right file?"
        ) from None
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a data file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None


def load_global_opinions_csv(path: str | Path, groups: Iterable[str] | None = None) -> SurveyData:
    """Load the GlobalOpinionQA CSV (the original Anthropic layout; see the module docstring)."""
    path = Path(path)
    col = _Collector(str(path), groups)
    text = _read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty file (no header row, no records)")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as err:
        raise InputError(f"{path}:1: malformed CSV header: {err}") from None
    names = [h.strip() for h in header]
    missing = [c for c in GOQA_REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(
            f"{path}:1: missing column(s) {', '.join(missing)} (header has: {', '.join(names)})"
        )
    twice = sorted(c for c in GOQA_REQUIRED_COLUMNS if names.count(c) > 1)
    if twice:  # which of the two would be the data? (the first was taken, without a word)
        raise InputError(f"{path}:1: column(s) {', '.join(twice)} appear more than once")
    idx = {c: names.index(c) for c in GOQA_REQUIRED_COLUMNS}
    while True:
        line = reader.line_num + 1  # where the next record starts (a blank line yields [])
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise InputError(f"{path}:{line}: malformed CSV record: {err}") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        where = f"{path}:{line}"
        if len(row) != len(names):
            raise InputError(
                f"{where}: expected {len(names)} fields ({', '.join(names)}), found {len(row)}"
            )
        col.records += 1
        question = _check_question(where, row[idx["question"]])
        opts, pairs = _parse_goqa_record(where, row[idx["selections"]], row[idx["options"]])
        for group, values in pairs:
            col.add(where, line, group, question, opts, values, None)
    return col.finish()


def load_global_opinions_hub(
    groups: Iterable[str] | None = None, split: str = "train"
) -> SurveyData:
    """Fetch GlobalOpinionQA from the Hugging Face hub with `datasets` (optional dependency), for
    users without a local copy. Records are checked like the CSV; 'line' N is the N-th row."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            "loading from the hub needs the `datasets` package (pip install datasets); "
            "or download global_opinions.csv and pass its path"
        ) from None
    source = f"hf:{HUB_DATASET}"
    try:
        ds = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # network, auth, unknown split: all are the user's to fix
        raise InputError(f"{source}: cannot load: {err}") from None
    col = _Collector(source, groups)
    for i, rec in enumerate(ds, start=1):
        where = f"{source}:{i}"
        try:
            question, selections, options = (rec[c] for c in GOQA_REQUIRED_COLUMNS)
        except KeyError as err:
            raise InputError(f"{where}: missing column {err}") from None
        if not isinstance(selections, str) or not isinstance(options, str):
            raise InputError(f"{where}: selections and options must be strings")
        col.records += 1
        question = _check_question(where, question)
        opts, pairs = _parse_goqa_record(where, selections, options)
        for group, values in pairs:
            col.add(where, i, group, question, opts, values, None)
    return col.finish()


# --------------------------------------------------------------------------------------------------
# JSON lines

_JSONL_FIELDS: tuple[str, ...] = ("group", "question", "options", "distribution")


class _DuplicateKey(Exception):
    """A JSON object with one key twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line. Splits on \\n only: JSON strings may hold other line
    separators (U+2028, ...) that str.splitlines would break on."""
    for lineno, text in enumerate(_read_text(path).split("\n"), start=1):
        yield lineno, text.removesuffix("\r")


def load_jsonl(path: str | Path, groups: Iterable[str] | None = None) -> SurveyData:
    """Load the generic JSON-lines format described in the module docstring."""
    path = Path(path)
    col = _Collector(str(path), groups)
    for lineno, text in _iter_lines(path):
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        if lineno == 1 and text.lstrip().startswith("["):
            raise InputError(
                f"{where}: looks like a JSON array; expected one JSON object per line (JSON lines)"
            )
        try:
            rec = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as err:
            raise InputError(f"{where}: key {err} appears twice in one object") from None
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:
            raise InputError(f"{where}: invalid JSON: nested too deeply") from None
        except ValueError as err:  # an integer of more than 4300 digits: Python will not read it
            reason = str(err).split(":")[0]
            raise InputError(f"{where}: cannot read a number in this line: {reason}") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in _JSONL_FIELDS if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
        col.records += 1
        group = _check_group(where, rec["group"])
        question = _check_question(where, rec["question"])
        opts = _check_options(where, rec["options"], allow_numbers=False)
        values = _check_values(where, "distribution", rec["distribution"], len(opts))
        qid = rec.get("question_id")
        if qid is not None and (not isinstance(qid, str) or not qid):
            raise InputError(f"{where}: question_id must be a non-empty string, got {qid!r}")
        if qid is not None:
            _check_utf8(where, "question_id", qid)
        col.add(where, lineno, group, question, opts, values, qid)
    return col.finish()


def iter_jsonl_records(data: SurveyData) -> Iterator[dict[str, Any]]:
    """The JSON-lines records of `data`, group by group, in item order."""
    for group, items in data.groups.items():
        for it in items:
            rec: dict[str, Any] = {
                "group": group,
                "question": it.question,
                "options": list(it.options),
                "distribution": [float(x) for x in it.distribution],
            }
            if it.question_id is not None:
                rec["question_id"] = it.question_id
            yield rec


def write_jsonl(data: SurveyData, path: str | Path) -> int:
    """Write `data` in the JSON-lines format (atomically: a reader never sees half a file).
    Returns the number of records written."""
    path = Path(path)
    n_items = sum(len(items) for items in data.groups.values())
    if n_items == 0:
        raise InputError(f"{path}: nothing to write (no items)")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for rec in iter_jsonl_records(data):
                f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:  # on any error (also one that is not the disk's): no stray temp file
        tmp.unlink(missing_ok=True)
    return n_items


# --------------------------------------------------------------------------------------------------
# dispatch and helpers


def load_survey(path: str | Path, groups: Iterable[str] | None = None) -> SurveyData:
    """Load a survey file by its extension: .csv (GlobalOpinionQA) or .jsonl/.ndjson/.json (JSON
    lines)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return load_global_opinions_csv(path, groups)
    if suffix in JSONL_SUFFIXES:
        return load_jsonl(path, groups)
    raise InputError(
        f"{path}: unknown file type {suffix or '(no extension)'!r}; expected "
        f"{', '.join(CSV_SUFFIXES)} (GlobalOpinionQA layout) or {', '.join(JSONL_SUFFIXES)} "
        "(JSON lines)"
    )


def select_groups(data: SurveyData, names: Iterable[str]) -> SurveyData:
    """The given groups only, in the order given; unknown names are an InputError that lists the
    closest matches and the available groups."""
    wanted = _normalise_group_names(names)
    assert wanted is not None
    unknown = [g for g in wanted if g not in data.groups]
    if unknown:
        raise InputError(unknown_groups_message(data.source, unknown, data.groups))
    skipped = {g: data.skipped_by_group[g] for g in wanted if g in data.skipped_by_group}
    return SurveyData(
        groups={g: data.groups[g] for g in wanted},
        skipped_all_zero=sum(skipped.values()),
        source=data.source,
        notes=list(data.notes),
        skipped_by_group=skipped,
    )


def n_items(data: SurveyData) -> int:
    """Number of (group, question) distributions."""
    return sum(len(items) for items in data.groups.values())


def unique_questions(data: SurveyData) -> list[str]:
    """Every distinct question text, in first-appearance order."""
    seen: dict[str, None] = {}
    for items in data.groups.values():
        for it in items:
            seen.setdefault(it.question, None)
    return list(seen)


def summary(data: SurveyData) -> str:
    """A short human-readable account: how many groups and questions, what was skipped, and per
    group the PROTOCOL.md train/test counts (what a group node will train and be scored on)."""
    lines = [
        f"source: {data.source or '(in memory)'}",
        f"groups: {len(data.groups)}",
        f"questions: {len(unique_questions(data))} distinct",
        f"distributions: {n_items(data)} (group, question) pairs",
        f"skipped all-zero distributions: {data.skipped_all_zero}",
    ]
    if data.notes:
        lines.append(f"notes: {len(data.notes)}")
        lines.extend(f"  {n}" for n in data.notes[:10])
        if len(data.notes) > 10:
            lines.append(f"  ... {len(data.notes) - 10} more")
    if data.groups:
        width = max(len("group"), *(len(g) for g in data.groups))
        lines.append(f"{'group':<{width}}  {'items':>5}  {'train':>5}  {'test':>5}  {'skipped':>7}")
        for group, items in data.groups.items():
            train, test = split_items(items)
            skipped = data.skipped_by_group.get(group, 0)
            lines.append(
                f"{group:<{width}}  {len(items):>5}  {len(train):>5}  {len(test):>5}  {skipped:>7}"
            )
    return "\n".join(lines)


def group_slug(name: str) -> str:
    """A file-name-safe, lowercase ASCII slug of a group name ('India (Current national sample)' ->
    'india-current-national-sample'), so each group node can be handed just its own file."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")
    return slug or "group"


def group_file_names(names: Iterable[str]) -> dict[str, str]:
    """group -> '<slug>.jsonl', unique even when slugs collide (case, accents, punctuation):
    colliding names get a short hash of the exact name appended (independent of the other names)."""
    names = list(names)
    by_slug: dict[str, list[str]] = {}
    for n in names:
        by_slug.setdefault(group_slug(n), []).append(n)
    out: dict[str, str] = {}
    for n in names:
        slug = group_slug(n)
        if len(by_slug[slug]) > 1:
            slug = f"{slug}-{hashlib.sha256(n.encode('utf-8')).hexdigest()[:8]}"
        out[n] = f"{slug}.jsonl"
    return out


def write_group_files(
    data: SurveyData, out_dir: str | Path, inputs: Iterable[str | Path] = ()
) -> dict[str, Path]:
    """One JSON-lines file per group in `out_dir`, plus `groups.json` (group name -> file name), so
    each group node gets only its own group's data. Returns group -> path. Refuses, before writing
    anything, to write over one of `inputs` (splitting a file into its own folder would replace it
    with one group's rows)."""
    out_dir = Path(out_dir)
    files = group_file_names(data.groups)
    targets = [out_dir / name for name in (*files.values(), GROUPS_MANIFEST)]
    for inp in map(Path, inputs):
        for target in targets:
            if same_file(target, inp):
                also = "" if target == inp else f" {inp}"
                raise InputError(f"{target}: output would overwrite the input{also}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out_dir}: cannot create directory: {err.strerror or err}") from None
    paths: dict[str, Path] = {}
    for group, items in data.groups.items():
        one = SurveyData(groups={group: items}, source=data.source)
        paths[group] = out_dir / files[group]
        write_jsonl(one, paths[group])
    manifest = out_dir / GROUPS_MANIFEST
    try:
        text = json.dumps(files, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(manifest, text.encode("utf-8"))  # never half a manifest
    except OSError as err:
        raise InputError(f"{manifest}: cannot write: {err.strerror or err}") from None
    return paths
