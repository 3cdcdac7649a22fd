"""The coordinator's round and evaluation records: what the checkpoint keeps and `metrics.jsonl`
holds one per line (with `"kind": "round"` or `"evaluation"`), and the one-line summary of each
that the coordinator's log, its console and `localfed`'s progress print.

Torch-free and grpc-free: the round engine writes these records, launchers read them from disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

# A report of one set of groups: {"model": {alignment, worst, worst_group, fairness, num_groups},
# "context_gain": ..., ...} (`pluralfed.metrics.SetReport.to_dict`)
ReportDict = dict[str, Any]


class RoundRecord(TypedDict):
    """One completed training round (a line of history.jsonl; metrics.jsonl kind "round")."""

    round: int
    task_id: str
    participants: list[str]  # groups whose update was averaged in
    selected: list[str]  # groups asked to train
    outcomes: dict[str, str]  # group -> "accepted", or why its update was not
    seconds: float
    bytes_in: int  # update bytes received
    bytes_out_model: int  # model bytes the selected nodes had to download
    total_weight: float
    update_weights: dict[str, float]  # group -> its update's averaging weight
    node_metrics: dict[str, dict[str, float]]  # group -> what its node reported (loss, ...)
    finished_at: float  # Unix time


class EvaluationRecord(TypedDict):
    """One evaluation of the global model (state.json "evaluations"; metrics.jsonl kind
    "evaluation")."""

    round: int
    kind: Literal["evaluation"]
    groups: list[str]  # groups that reported
    # groups that did not: asked and silent, absent though an earlier evaluation had them, and
    # held-out (evaluate_only) groups whose node was not connected
    missing: list[str]
    # which of `missing` are held-out groups (records written before it existed lack it: their
    # summary line then says nothing of coverage)
    missing_held_out: NotRequired[list[str]]
    # which of those had no node connected when asked (the rest were asked and silent); a
    # restarted coordinator waits for the silent ones, not for a node that may never come
    held_out_unconnected: NotRequired[list[str]]
    seconds: float
    reports: dict[str, ReportDict]  # set name (training groups, held-out groups) -> report
    # group -> {"role": "train" or "evaluate-only", "num_questions": ..., and its metrics}
    per_group: dict[str, dict[str, Any]]


TRAINING, HELD_OUT = "training", "held-out"  # the sets' short names in a summary line
MISSING_NAMED = 5  # missing groups a summary line names; the rest are counted


def short_set_name(name: str) -> str:
    """ "training groups (test questions)" -> "training", "held-out groups" -> "held-out"."""
    return name.split(" ")[0]


def _number(value: object) -> float | None:
    """A finite number as a float, or None for anything else: a bool (JSON's true is no count
    of seconds or bytes) or an int beyond any float (math.isfinite raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _figure(value: object, digits: int) -> str:
    """A number as the summary shows it, or "?" for anything else (a launcher reads records
    from a file another process writes, and must not fail on one)."""
    number = _number(value)
    return "?" if number is None else f"{number:.{digits}f}"


def describe_record(record: Mapping[str, Any], rounds: int | None = None) -> str:
    """One line for a round or evaluation record; `rounds`, the run's, adds "n/rounds"."""
    if record.get("kind") == "evaluation":
        return _describe_evaluation(record)
    of = f"/{rounds}" if rounds is not None else ""
    participants, selected = record.get("participants"), record.get("selected")
    done = len(participants) if isinstance(participants, list) else "?"
    asked = len(selected) if isinstance(selected, list) else "?"
    line = f"round {record.get('round')}{of} done: {done}/{asked} updates in "
    line += f"{_figure(record.get('seconds'), 1)} s"
    bytes_in = _number(record.get("bytes_in"))
    if bytes_in is not None:
        line += f", {bytes_in / 1e6:.1f} MB in"
    return line


def _describe_evaluation(record: Mapping[str, Any]) -> str:
    """ "evaluation after round n:" and each set's figures; with the record's missing groups by
    set, how many groups each set covers and which it lacks, so that figures of 1 of 6 held-out
    groups are not read as the held-out figures."""
    missing = _missing_by_set(record)
    figures: dict[str, str] = {}
    reports = record.get("reports")
    for name, rep in (reports if isinstance(reports, Mapping) else {}).items():
        model = rep.get("model") if isinstance(rep, Mapping) else None
        if isinstance(model, Mapping):
            short = short_set_name(str(name))
            absent = missing.get(short, []) if missing is not None else []
            text = f"{short} {_figure(model.get('alignment'), 4)}"
            if missing is not None:
                text += _coverage(model.get("num_groups"), len(absent))
            text += f" (worst {_figure(model.get('worst'), 4)}"
            if "fairness" in model:
                text += f", FI {_figure(model['fairness'], 3)}"
            if absent:
                text += f"; missing: {_names(absent)}"
            figures[short] = text + ")"
    for short, absent in (missing or {}).items():
        if short not in figures and absent:  # not one group of the set reported
            figures[short] = f"{short} none of {len(absent)} groups (missing: {_names(absent)})"
    order = [TRAINING, *(s for s in figures if s not in (TRAINING, HELD_OUT)), HELD_OUT]
    text = "  ".join(figures[s] for s in order if s in figures)
    return f"evaluation after round {record.get('round')}: {text}"


def _missing_by_set(record: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """The record's missing groups as {"training": [...], "held-out": [...]}, or None for a
    record that does not say which of them are held out (older, or malformed)."""
    missing, held_out = record.get("missing"), record.get("missing_held_out")
    if not (isinstance(missing, list) and isinstance(held_out, list)):
        return None
    names, held = [str(g) for g in missing], {str(g) for g in held_out}
    return {
        TRAINING: [g for g in names if g not in held],
        HELD_OUT: [g for g in names if g in held],
    }


def _coverage(reported: object, absent: int) -> str:
    """ " over 7 groups", or " over 1 of 6 groups" when some did not report."""
    if not isinstance(reported, int) or isinstance(reported, bool):
        return ""
    if not absent:
        return f" over {reported} group{'s' if reported != 1 else ''}"
    return f" over {reported} of {reported + absent} groups"


def _names(groups: list[str]) -> str:
    """The first MISSING_NAMED groups, and how many more: a line stays a line with 100 nodes."""
    shown = ", ".join(groups[:MISSING_NAMED])
    more = len(groups) - MISSING_NAMED
    return shown + (f" and {more} more" if more > 0 else "")
