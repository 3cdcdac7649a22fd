"""What the round engine reads of the run's evaluations (coordinator.evaluations): which groups
they had, which were held out, and the PROTOCOL.md figures of each set. A restarted coordinator
rebuilds this from evaluations.jsonl, so records of every age must read the same way: those
written before `missing_held_out` or `held_out_unconnected` existed, and hand-edited ones."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.evaluations import HELD_OUT_SET, TRAIN_SET, EvaluatedGroups, combine_evaluations
from coordinator.sessions import Role
from pluralfed.metrics import GroupEvaluation
from pluralfed.records import EvaluationRecord


def record(**fields: Any) -> EvaluationRecord:
    base: dict[str, Any] = {
        "round": 3,
        "kind": "evaluation",
        "groups": [],
        "missing": [],
        "seconds": 1.0,
        "reports": {},
        "per_group": {},
    }
    return base | fields  # type: ignore[return-value]


def row(role: Role) -> dict[str, Any]:
    return {"role": role.value, "num_questions": 4, "model": 0.8}


def noted(*records: EvaluationRecord) -> EvaluatedGroups:
    evaluated = EvaluatedGroups()
    evaluated.reload(records)
    return evaluated


def test_only_groups_that_reported_as_evaluate_only_are_held_out() -> None:
    e = noted(
        record(
            groups=["A", "B", "H"],
            per_group={"A": row(Role.TRAIN), "B": row(Role.TRAIN), "H": row(Role.EVALUATE_ONLY)},
        )
    )
    assert e.groups == {"A", "B", "H"}
    assert e.held_out == {"H"}


def test_a_held_out_group_that_never_reported_is_still_held_out() -> None:
    """Named only by `missing_held_out` (its node was never there to report its role): a later
    evaluation must still count it as a held-out group, not forget it."""
    e = noted(
        record(
            groups=["A"],
            missing=["H"],
            missing_held_out=["H"],
            held_out_unconnected=["H"],
            per_group={"A": row(Role.TRAIN)},
        )
    )
    assert e.held_out == {"H"}
    assert e.groups == {"A"}  # unconnected: the run's end is not held up for it


def test_an_older_record_counts_every_missing_held_out_group_as_unconnected() -> None:
    """Such a record says only which held-out groups were missing: all of them are left out
    of the groups a restarted coordinator waits for; a silent training group is not."""
    old = record(groups=["A"], missing=["B", "H"], missing_held_out=["H"])
    e = noted(old)
    assert e.groups == {"A", "B"}
    assert e.held_out == {"H"}
    # a newer record says which were asked and silent: those are waited for
    e = noted(record(**{**old, "held_out_unconnected": []}))
    assert e.groups == {"A", "B", "H"}


def test_names_that_are_not_strings_in_an_edited_record_are_ignored() -> None:
    e = noted(record(groups=["A"], missing=["H"], missing_held_out=["H", 7, None]))
    assert e.held_out == {"H"}


def test_a_reload_forgets_what_the_replaced_records_had() -> None:
    e = noted(record(groups=["A", "H"], per_group={"H": row(Role.EVALUATE_ONLY)}))
    e.reload([record(groups=["A"])])
    assert e.groups == {"A"} and e.held_out == set()


def evaluation(group: str, model: float) -> GroupEvaluation:
    return GroupEvaluation(group, 4, model, 0.5, 0.4, 0.45)


@pytest.mark.parametrize(
    ("roles", "sets"),
    [
        ({"A": Role.TRAIN, "H": Role.EVALUATE_ONLY}, {TRAIN_SET: ["A"], HELD_OUT_SET: ["H"]}),
        ({"H": Role.EVALUATE_ONLY, "I": Role.EVALUATE_ONLY}, {HELD_OUT_SET: ["H", "I"]}),
        ({"A": Role.TRAIN}, {TRAIN_SET: ["A"]}),
    ],
)
def test_reports_are_combined_per_set_and_a_set_without_reports_has_no_figures(
    roles: dict[str, Role], sets: dict[str, list[str]]
) -> None:
    reports = combine_evaluations(
        (role, evaluation(g, 0.7 + 0.01 * i)) for i, (g, role) in enumerate(roles.items())
    )
    assert {name: sorted(rep.per_group) for name, rep in reports.items()} == sets
