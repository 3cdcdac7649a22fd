"""The run's evaluations, as the round engine reads them: the PROTOCOL.md figures combined from
the groups' reports (`combine_evaluations`: training groups' test questions apart from the
held-out groups'), and which groups the evaluations so far had (`EvaluatedGroups`): the engine
needs those to tell whom a later evaluation waits for and counts as missing.

The records themselves are written and kept by history.py (evaluations.jsonl); this file only
reads them. No lock of its own: `EvaluatedGroups` is changed only by the engine's driver
thread with the engine's lock held, and read under that lock or by the driver thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from coordinator.sessions import Role
from pluralfed.metrics import GroupEvaluation, SetReport, summarize_groups
from pluralfed.records import EvaluationRecord

TRAIN_SET, HELD_OUT_SET = "training groups (test questions)", "held-out groups"


class EvaluatedGroups:
    """What the engine reads of the run's evaluations, kept as they come (the records themselves
    are in evaluations.jsonl, one read at a time): the groups they had (`groups`, see
    RoundEngine._evaluated_groups) and the held-out groups they named (`held_out`)."""

    def __init__(self) -> None:
        self.groups: set[str] = set()  # groups the run's evaluations had (see `note`)
        self.held_out: set[str] = set()  # held-out groups its evaluations named

    def reload(self, records: Iterable[EvaluationRecord]) -> None:
        """What the engine reads of the evaluations in force, from evaluations.jsonl (one
        record at a time): at start, and after an evaluation replaced the last one."""
        self.groups, self.held_out = set(), set()
        for evaluation in records:
            self.note(evaluation)

    def note(self, e: EvaluationRecord) -> None:
        """What the engine reads of every evaluation, kept as they come (the records
        themselves are in evaluations.jsonl): the groups they had, and the held-out ones."""
        unconnected = _held_out_unconnected(e)
        self.groups.update(e.get("groups", ()))
        self.groups.update(g for g in e.get("missing", ()) if g not in unconnected)
        rows = e.get("per_group")
        for g, row in rows.items() if isinstance(rows, Mapping) else ():
            if isinstance(row, Mapping) and row.get("role") == Role.EVALUATE_ONLY:
                self.held_out.add(g)
        self.held_out.update(_held_out_named(e))


def _held_out_named(record: Mapping[str, Any], key: str = "missing_held_out") -> set[str]:
    """The record's missing held-out groups (records older than the field lack it: none
    then)."""
    names = record.get(key)
    return {g for g in names if isinstance(g, str)} if isinstance(names, list) else set()


def _held_out_unconnected(record: Mapping[str, Any]) -> set[str]:
    """The record's held-out groups that had no node connected when it was asked for; records
    written before that field existed say only which were missing, so all of those."""
    if "held_out_unconnected" in record:
        return _held_out_named(record, "held_out_unconnected")
    return _held_out_named(record)


def combine_evaluations(
    evaluations: Iterable[tuple[Role, GroupEvaluation]],
) -> dict[str, SetReport]:
    """PROTOCOL.md figures from per-group reports: training nodes' test questions vs held-out."""
    sets: dict[str, list[GroupEvaluation]] = {TRAIN_SET: [], HELD_OUT_SET: []}
    for role, e in evaluations:
        sets[TRAIN_SET if role == Role.TRAIN else HELD_OUT_SET].append(e)
    return {name: summarize_groups(evals) for name, evals in sets.items() if evals}
