"""Metrics against independent computations (scipy, numpy)."""

from __future__ import annotations

import dataclasses
import json
from itertools import permutations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from tinymodel import CFG, random_item

from pluralfed.data import SurveyItem
from pluralfed.episodes import GroupSplit, with_uniform_answers
from pluralfed.evaluation import (
    GroupEvaluation,
    evaluate_group,
    predict_targets,
    summarize_groups,
)
from pluralfed.metrics import alignment_score, group_prior, rounds_to_fraction, summarize
from pluralfed.training import build_model


@pytest.mark.parametrize("seed", range(20))
def test_alignment_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    p, q = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
    if seed % 3 == 0:
        p[0] = 0.0  # zeros must be handled as scipy does
    q_unnormalised = q * 1.07  # true distributions are renormalised
    assert alignment_score(p, q_unnormalised) == pytest.approx(1 - jensenshannon(p, q), abs=1e-12)


def test_alignment_extremes() -> None:
    assert alignment_score(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == pytest.approx(1.0)
    disjoint = alignment_score(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert disjoint == pytest.approx(1 - np.sqrt(np.log(2)))
    with pytest.raises(ValueError):
        alignment_score(np.array([0.0, 0.0]), np.array([0.5, 0.5]))


def test_summary_fairness_index() -> None:
    scores = {"a": 0.8, "b": 0.7, "c": 0.9}
    s = summarize(scores)
    values = np.array(list(scores.values()))
    assert s.alignment == pytest.approx(values.mean())
    assert s.worst == pytest.approx(0.7) and s.worst_group == "b"
    assert s.fairness == pytest.approx(1 / (1 + np.std(values, ddof=0) / values.mean()))
    assert summarize({"a": 0.5, "b": 0.5}).fairness == pytest.approx(1.0)


def test_a_summary_is_the_same_in_whatever_order_the_groups_come() -> None:
    """Reports reach the coordinator in any order; a float sum taken in arrival order differed
    in its last bit between two runs of one seed ((0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1). Ties
    for the worst group go to the first name, not the first to arrive."""
    scores = {"c": 0.1, "a": 0.2, "b": 0.3, "e": 0.1}
    summaries = {summarize({g: scores[g] for g in order}) for order in permutations(scores)}
    assert len(summaries) == 1
    (summary,) = summaries
    assert summary.worst_group == "c" and summary.num_groups == 4

    evals = [
        GroupEvaluation(g, 5, v, v / 2, 0.1 * (i + 1), v) for i, (g, v) in enumerate(scores.items())
    ]
    reports = {
        json.dumps(summarize_groups([evals[i] for i in order]).to_dict())
        for order in permutations(range(len(evals)))
    }
    assert len(reports) == 1  # the same figures to the bit, per_group in the same order
    assert list(json.loads(reports.pop())["per_group"]) == ["a", "b", "c", "e"]


def test_group_prior() -> None:
    items = [
        SurveyItem("q1", ("a", "b"), np.array([0.2, 0.8])),
        SurveyItem("q2", ("a", "b"), np.array([0.4, 0.6])),
        SurveyItem("q3", ("a", "b", "c"), np.array([0.1, 0.1, 0.8])),
    ]
    assert np.allclose(group_prior(items, 2), [0.3, 0.7])
    assert np.allclose(group_prior(items, 3), [0.1, 0.1, 0.8])
    assert np.allclose(group_prior(items, 4), [0.25] * 4)


def test_rounds_to_fraction() -> None:
    history = [(10, 0.5), (20, 0.7), (30, 0.79), (40, 0.8), (50, 0.78)]
    assert rounds_to_fraction(history, 0.95) == 30  # 0.7 < 0.76 <= 0.79
    assert rounds_to_fraction(history, 0.99) == 40  # 0.79 < 0.792 <= 0.8


def test_context_gain_is_difference_of_means() -> None:
    evals = [
        GroupEvaluation("a", 10, 0.8, 0.75, 0.6, 0.7),
        GroupEvaluation("b", 5, 0.7, 0.69, 0.5, 0.6),
    ]
    rep = summarize_groups(evals)
    assert rep.context_gain == pytest.approx(((0.8 - 0.75) + (0.7 - 0.69)) / 2)
    assert rep.prior_baseline.alignment == pytest.approx(0.65)
    again = GroupEvaluation.from_metrics("a", 10, evals[0].metrics())
    assert again == evals[0]
    with pytest.raises(ValueError, match="lacks"):
        GroupEvaluation.from_metrics("a", 10, {"model": 0.5})
    with pytest.raises(ValueError, match=r"not in \[0, 1\]"):
        GroupEvaluation.from_metrics("a", 10, {**evals[0].metrics(), "model": float("nan")})


def test_evaluate_group_baselines_are_the_uniform_and_the_group_prior_predictions() -> None:
    """The prior baseline predicts each test question by the mean answers of the group's TRAIN
    questions with as many options, not the uniform distribution: reports compare the model
    with both, and a prior equal to the uniform one would hide what the context adds."""
    rng = np.random.default_rng(3)
    train = [random_item(rng, 3, f"t{i}") for i in range(4)] + [random_item(rng, 2, "t4")]
    test = [random_item(rng, 3, "q0"), random_item(rng, 3, "q1"), random_item(rng, 4, "q2")]
    ev = evaluate_group(build_model(CFG, 0), GroupSplit("G", train=train, test=test))
    truths = [t.item.distribution for t in test]
    prior = [group_prior([e.item for e in train], t.num_options) for t in test]
    uniform = [np.full(t.num_options, 1.0 / t.num_options) for t in test]
    expected_prior = np.mean([alignment_score(p, q) for p, q in zip(prior, truths, strict=True)])
    expected_uniform = np.mean(
        [alignment_score(p, q) for p, q in zip(uniform, truths, strict=True)]
    )
    assert ev.group == "G" and ev.num_questions == 3
    assert ev.prior_baseline == pytest.approx(expected_prior, abs=1e-12)
    assert ev.uniform_baseline == pytest.approx(expected_uniform, abs=1e-12)
    assert abs(ev.prior_baseline - ev.uniform_baseline) > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_a_prediction_leaves_the_model_in_the_mode_it_found_it(training: bool) -> None:
    """Predictions run in eval mode (no dropout); the model is then put back as it was: a
    reward model held in eval mode must not be left training (dropout on) by its first score,
    nor a model being trained left in eval mode by an evaluation between its steps."""
    rng = np.random.default_rng(0)
    model = build_model(CFG, 0)
    model.train(training)
    context, targets = [random_item(rng, 3, "c")], [random_item(rng, 2, "t")]
    preds = predict_targets(model, context, targets)
    assert [p.shape for p in preds] == [(2,)] and model.training is training


def test_a_prediction_in_a_training_model_has_no_dropout() -> None:
    """A model with dropout, found training, predicts in eval mode: the same questions get the
    same prediction every time (with dropout on, each call would draw other noise)."""
    rng = np.random.default_rng(0)
    model = build_model(dataclasses.replace(CFG, dropout=0.5), 0)
    model.train(True)
    context, targets = [random_item(rng, 3, f"c{i}") for i in range(3)], [random_item(rng, 2, "t")]
    first = predict_targets(model, context, targets)
    second = predict_targets(model, context, targets)
    np.testing.assert_array_equal(first[0], second[0])
    assert model.training


def test_the_uniform_context_figure_is_the_model_with_uniform_context_answers() -> None:
    """`uniform_context` scores the model given the same context questions with uniform
    answers, so context gain is what the answers add: it equals `model` exactly when the
    answers already are uniform, and differs when they are not."""
    rng = np.random.default_rng(7)
    train = [random_item(rng, 3, f"t{i}") for i in range(4)]
    test = [random_item(rng, 3, "q0"), random_item(rng, 2, "q1")]
    model = build_model(CFG, 0)
    ev = evaluate_group(model, GroupSplit("G", train=train, test=test))
    assert ev.uniform_context != ev.model
    flat = evaluate_group(model, GroupSplit("G", train=with_uniform_answers(train), test=test))
    assert flat.uniform_context == flat.model == ev.uniform_context


def test_the_seed_chooses_the_context_when_there_are_more_train_questions_than_it_takes() -> None:
    """With more TRAIN questions than --max-context, `seed` picks which are context: the same
    seed, the same figures; another seed, another context and (with random answers) others."""
    rng = np.random.default_rng(11)
    train = [random_item(rng, 3, f"t{i}") for i in range(12)]
    split = GroupSplit("G", train=train, test=[random_item(rng, 3, "q0")])
    model = build_model(CFG, 0)
    seed0 = evaluate_group(model, split, max_context=3, seed=0)
    assert evaluate_group(model, split, max_context=3, seed=0) == seed0
    assert evaluate_group(model, split, max_context=3, seed=1).model != seed0.model


@pytest.mark.parametrize(
    "pred",
    [[float("nan"), 0.5], [float("inf"), 0.5], [0.0, 0.0], [-0.5, 0.25]],
    ids=["NaN", "inf", "zeros", "negative sum"],
)
def test_a_prediction_that_is_not_a_distribution_is_refused(pred: list[float]) -> None:
    """A model whose predictions are NaN must fail its task (the node's TaskFailed is this
    ValueError), not score NaN or a made-up figure."""
    with pytest.raises(ValueError, match="not a distribution"):
        alignment_score(np.array(pred), np.array([0.5, 0.5]))


def test_the_uniform_context_keeps_the_questions_and_makes_every_answer_equally_likely() -> None:
    """The context-gain figure compares the model with the same context questions whose answer
    distributions are uniform: 1/k for each of k options, summing to 1 as every distribution."""
    rng = np.random.default_rng(5)
    items = [random_item(rng, k, f"q{k}") for k in (2, 3, 5)]
    uniform = with_uniform_answers(items)
    for before, after in zip(items, uniform, strict=True):
        k = before.num_options
        np.testing.assert_array_equal(after.item.distribution, np.full(k, 1.0 / k))
        assert after.item.question == before.item.question
        assert after.item.options == before.item.options
        assert after.embeddings is before.embeddings


def test_the_uniform_context_keeps_each_questions_id() -> None:
    rng = np.random.default_rng(6)
    items = [random_item(rng, 3, f"q{i}") for i in range(2)]
    items = [
        dataclasses.replace(e, item=dataclasses.replace(e.item, question_id=f"id{i}"))
        for i, e in enumerate(items)
    ]
    assert [e.item.question_id for e in with_uniform_answers(items)] == ["id0", "id1"]


def test_a_prediction_with_another_number_of_options_is_refused() -> None:
    """A one-option prediction broadcasts against any true distribution in numpy: without the
    shape check it would be scored, not refused, and a question would count with a made-up
    figure."""
    with pytest.raises(ValueError, match=r"shapes differ: \(1,\) vs \(3,\)"):
        alignment_score(np.array([1.0]), np.array([0.2, 0.3, 0.5]))


def test_a_prediction_equal_to_the_truth_scores_exactly_one_not_nan() -> None:
    """The same distribution given at another scale leaves a Jensen-Shannon divergence a hair
    below zero after rounding (-5.6e-18 here); its square root would be NaN, which poisons every
    mean it enters."""
    p = np.array([0.1, 0.2, 0.7])
    assert alignment_score(p, 3 * p) == 1.0


def test_the_fairness_of_groups_that_all_score_zero_is_zero() -> None:
    """A mean of 0 has no coefficient of variation: the index is 0 (the worst), not the NaN a
    0/0 would give."""
    assert summarize({"a": 0.0, "b": 0.0}).fairness == 0.0


def test_the_round_that_reaches_the_target_fraction_exactly_counts() -> None:
    """`fraction` of the best is reached by a round equal to it: with fraction 1 the first round
    at the best is the answer (never None), and 0.5 of 0.8 is reached at 0.4."""
    assert rounds_to_fraction([(1, 0.7), (2, 0.8), (3, 0.8)], 1.0) == 2
    assert rounds_to_fraction([(1, 0.4), (2, 0.8)], 0.5) == 1


def test_a_group_scored_at_exactly_the_bounds_is_accepted() -> None:
    """Alignment lies in [0, 1] both ends included: a group whose model predicts every answer
    exactly reports 1.0, a report that must be taken; no questions at all is refused."""
    perfect = {"model": 1.0, "uniform_context": 0.0, "uniform_baseline": 0.5, "prior_baseline": 1}
    assert GroupEvaluation.from_metrics("a", 3, perfect).model == 1.0
    with pytest.raises(ValueError, match="covers no questions"):
        GroupEvaluation.from_metrics("a", 0, perfect)
