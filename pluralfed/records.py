"""The coordinator's round and evaluation records: what `state.json` keeps and `metrics.jsonl`
holds one per line (with `"kind": "round"` or `"evaluation"`), and the one-line summary of each
that the coordinator's log, its console and `localfed`'s progress print.

Torch-free and grpc-free: the round engine writes these records, launchers read them from disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

# A report of one set of groups: {"model": {alignment, worst, worst_group, fairness, num_groups},
# "context_gain": ..., ...} (`pluralfed.metrics.SetReport.to_dict`)
ReportDict = dict[str, Any]


class RoundRecord(TypedDict):
    """One completed training round (state.json "history"; metrics.jsonl kind "round")."""

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
    missing: list[str]  # groups asked that did not
    seconds: float
    reports: dict[str, ReportDict]  # set name (training groups, held-out groups) -> report
    # group -> {"role": "train" or "evaluate-only", "num_questions": ..., and its metrics}
    per_group: dict[str, dict[str, Any]]


def short_set_name(name: str) -> str:
    """ "training groups (test questions)" -> "training", "held-out groups" -> "held-out"."""
    return name.split(" ")[0]


def _figure(value: object, digits: int) -> str:
    """A number as the summary shows it, or "?" for anything else (a launcher reads records
    from a file another process writes, and must not fail on one)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "?"


def describe_record(record: Mapping[str, Any], rounds: int | None = None) -> str:
    """One line for a round or evaluation record; `rounds`, the run's, adds "n/rounds"."""
    if record.get("kind") == "evaluation":
        figures = []
        reports = record.get("reports")
        for name, rep in (reports if isinstance(reports, Mapping) else {}).items():
            model = rep.get("model") if isinstance(rep, Mapping) else None
            if isinstance(model, Mapping):
                text = f"{short_set_name(str(name))} {_figure(model.get('alignment'), 4)} (worst "
                text += _figure(model.get("worst"), 4)
                if "fairness" in model:
                    text += f", FI {_figure(model['fairness'], 3)}"
                figures.append(text + ")")
        return f"evaluation after round {record.get('round')}: {'  '.join(figures)}"
    of = f"/{rounds}" if rounds is not None else ""
    participants, selected = record.get("participants"), record.get("selected")
    done = len(participants) if isinstance(participants, list) else "?"
    asked = len(selected) if isinstance(selected, list) else "?"
    line = f"round {record.get('round')}{of} done: {done}/{asked} updates in "
    line += f"{_figure(record.get('seconds'), 1)} s"
    if isinstance(record.get("bytes_in"), int | float) and math.isfinite(record["bytes_in"]):
        line += f", {record['bytes_in'] / 1e6:.1f} MB in"
    return line
