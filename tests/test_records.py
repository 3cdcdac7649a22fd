"""The one-line summaries of round and evaluation records (coordinator log and console,
localfed progress), from whole records and from malformed rows read off disk."""

from __future__ import annotations

from pluralfed.records import EvaluationRecord, RoundRecord, describe_record

ROUND: RoundRecord = {
    "round": 3,
    "task_id": "t3",
    "participants": ["Argentina", "Germany"],
    "selected": ["Argentina", "Germany", "India"],
    "outcomes": {"Argentina": "accepted", "Germany": "accepted", "India": "no answer"},
    "seconds": 12.345,
    "bytes_in": 9_600_000,
    "bytes_out_model": 14_400_000,
    "total_weight": 2.0,
    "update_weights": {"Argentina": 1.0, "Germany": 1.0},
    "node_metrics": {},
    "finished_at": 0.0,
}

EVALUATION: EvaluationRecord = {
    "round": 10,
    "kind": "evaluation",
    "groups": ["Brazil"],
    "missing": [],
    "seconds": 1.0,
    "reports": {
        "training groups (test questions)": {
            "model": {"alignment": 0.76543, "worst": 0.7, "fairness": 0.9712}
        },
        "held-out groups": {"model": {"alignment": 0.75, "worst": 0.68, "fairness": 0.95}},
    },
    "per_group": {},
}


def test_round_and_evaluation_lines() -> None:
    assert describe_record(ROUND, 100) == "round 3/100 done: 2/3 updates in 12.3 s, 9.6 MB in"
    assert describe_record(ROUND) == "round 3 done: 2/3 updates in 12.3 s, 9.6 MB in"
    assert describe_record(EVALUATION) == (
        "evaluation after round 10: training 0.7654 (worst 0.7000, FI 0.971)  "
        "held-out 0.7500 (worst 0.6800, FI 0.950)"
    )


def test_malformed_rows_are_summarised_not_fatal() -> None:
    assert describe_record({"round": 1}) == "round 1 done: ?/? updates in ? s"
    row = {"round": 2, "participants": "a", "seconds": "slow", "bytes_in": None}
    assert describe_record(row) == "round 2 done: ?/? updates in ? s"
    evaluation = {
        "kind": "evaluation",
        "round": 4,
        "reports": {"held-out groups": {"model": {"alignment": "high", "fairness": None}}, "x": 1},
    }
    assert describe_record(evaluation) == "evaluation after round 4: held-out ? (worst ?, FI ?)"
    assert describe_record({"kind": "evaluation", "round": 5, "reports": [1, 2]}) == (
        "evaluation after round 5: "
    )
    assert describe_record({"round": 6, "seconds": float("nan"), "bytes_in": float("inf")}) == (
        "round 6 done: ?/? updates in ? s"
    )


def test_an_evaluation_line_says_how_many_groups_of_each_set_it_covers() -> None:
    """Operator review: "held-out 0.7327 (worst 0.7327, FI 1.000)" was the figure of 1 of 6
    held-out groups, the other 5 never connected, and nothing said so."""
    one_of_six: EvaluationRecord = {
        **EVALUATION,
        "groups": ["Argentina", "Germany", "Nigeria"],
        "missing": ["Brazil", "China", "India", "Japan", "Mexico", "Russia"],
        "missing_held_out": ["Brazil", "China", "Japan", "Mexico", "Russia"],
        "reports": {
            "training groups (test questions)": {
                "model": {"alignment": 0.76543, "worst": 0.7, "fairness": 0.9712, "num_groups": 2}
            },
            "held-out groups": {
                "model": {"alignment": 0.7327, "worst": 0.7327, "fairness": 1.0, "num_groups": 1}
            },
        },
    }
    assert describe_record(one_of_six) == (
        "evaluation after round 10: training 0.7654 over 2 of 3 groups (worst 0.7000, FI 0.971; "
        "missing: India)  held-out 0.7327 over 1 of 6 groups (worst 0.7327, FI 1.000; missing: "
        "Brazil, China, Japan, Mexico, Russia)"
    )
    none_held_out = {
        **one_of_six,
        "missing": ["H1", "H2", "H3", "H4", "H5", "H6", "H7"],
        "missing_held_out": ["H1", "H2", "H3", "H4", "H5", "H6", "H7"],
        "reports": {
            "training groups (test questions)": one_of_six["reports"][
                "training groups (test questions)"
            ]
        },
    }
    assert describe_record(none_held_out) == (
        "evaluation after round 10: training 0.7654 over 2 groups (worst 0.7000, FI 0.971)  "
        "held-out none of 7 groups (missing: H1, H2, H3, H4, H5 and 2 more)"
    )
    # a record written before missing_held_out existed: its line as it was
    assert describe_record({**one_of_six, "missing_held_out": None}) == (
        "evaluation after round 10: training 0.7654 (worst 0.7000, FI 0.971)  "
        "held-out 0.7327 (worst 0.7327, FI 1.000)"
    )


def test_a_run_without_held_out_groups_has_no_held_out_figure() -> None:
    """A set with no group at all (a run that holds none out) is not named in the line: "none
    of 0 groups" would read as if all of its groups had failed to report."""
    all_reported = {
        **EVALUATION,
        "groups": ["Argentina", "Germany"],
        "missing": [],
        "missing_held_out": [],
        "reports": {
            "training groups (test questions)": {
                "model": {"alignment": 0.76543, "worst": 0.7, "fairness": 0.9712, "num_groups": 2}
            },
        },
    }
    assert describe_record(all_reported) == (
        "evaluation after round 10: training 0.7654 over 2 groups (worst 0.7000, FI 0.971)"
    )


def test_one_group_is_one_group() -> None:
    """ "over 1 group", not "over 1 groups": the line is read by people."""
    one = {
        **EVALUATION,
        "missing": [],
        "missing_held_out": [],
        "reports": {
            "held-out groups": {"model": {"alignment": 0.75, "worst": 0.75, "num_groups": 1}}
        },
    }
    assert (
        describe_record(one)
        == "evaluation after round 10: held-out 0.7500 over 1 group (worst 0.7500)"
    )


def test_a_json_true_in_place_of_a_figure_is_not_shown_as_one() -> None:
    """A row read off disk with true for its seconds or its group count (a hand edit, another
    writer): "?" and no coverage, not "1.0 s" and "over True group"."""
    assert describe_record({"round": 7, "seconds": True}) == "round 7 done: ?/? updates in ? s"
    flagged = {
        **EVALUATION,
        "missing": [],
        "missing_held_out": [],
        "reports": {"held-out groups": {"model": {"alignment": 0.75, "num_groups": True}}},
    }
    assert describe_record(flagged) == "evaluation after round 10: held-out 0.7500 (worst ?)"


def test_the_training_figure_comes_first_even_when_only_held_out_groups_reported() -> None:
    """Every training group silent, a held-out one reported: the line still reads training
    first ("none of"), then held-out, as every other evaluation line does."""
    only_held_out = {
        **EVALUATION,
        "groups": ["Brazil"],
        "missing": ["Argentina", "Germany"],
        "missing_held_out": [],
        "reports": {
            "held-out groups": {"model": {"alignment": 0.75, "worst": 0.75, "num_groups": 1}}
        },
    }
    assert describe_record(only_held_out) == (
        "evaluation after round 10: training none of 2 groups (missing: Argentina, Germany)  "
        "held-out 0.7500 over 1 group (worst 0.7500)"
    )


def test_a_set_of_another_name_is_shown_between_training_and_held_out() -> None:
    """A report of a set neither training nor held-out is not dropped from the line."""
    three_sets = {
        **EVALUATION,
        "reports": {
            "held-out groups": {"model": {"alignment": 0.75, "worst": 0.68}},
            "pilot groups": {"model": {"alignment": 0.5, "worst": 0.5}},
            "training groups (test questions)": {"model": {"alignment": 0.8, "worst": 0.7}},
        },
    }
    assert describe_record(three_sets) == (
        "evaluation after round 10: training 0.8000 (worst 0.7000)  pilot 0.5000 (worst "
        "0.5000)  held-out 0.7500 (worst 0.6800)"
    )


def test_an_evaluation_row_whose_missing_is_not_a_list_is_summarised_without_coverage() -> None:
    """A row off disk with a held-out list but no list of missing groups says nothing of
    coverage, as an older record does, rather than failing or counting its letters."""
    expected = "evaluation after round 10: training 0.8000 (worst 0.7000)"
    for missing in (None, "India"):
        row = {
            **EVALUATION,
            "missing": missing,
            "missing_held_out": [],
            "reports": {
                "training groups (test questions)": {
                    "model": {"alignment": 0.8, "worst": 0.7, "num_groups": 2}
                }
            },
        }
        assert describe_record(row) == expected


def test_a_row_with_a_true_or_an_int_beyond_any_float_is_summarised_not_fatal() -> None:
    """JSON true for bytes_in was shown as "0.0 MB in", and an integer too large for a float
    (json reads any number of digits) raised OverflowError in the launcher's progress."""
    assert describe_record({"round": 8, "seconds": 1.0, "bytes_in": True}) == (
        "round 8 done: ?/? updates in 1.0 s"
    )
    huge = 10**400
    assert describe_record({"round": 9, "seconds": huge, "bytes_in": huge}) == (
        "round 9 done: ?/? updates in ? s"
    )
    evaluation = {
        "kind": "evaluation",
        "round": 10,
        "reports": {"held-out groups": {"model": {"alignment": huge, "worst": 0.5}}},
    }
    assert describe_record(evaluation) == "evaluation after round 10: held-out ? (worst 0.5000)"
