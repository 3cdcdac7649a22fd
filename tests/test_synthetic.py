"""The synthetic survey generator: deterministic, with the structure a predictor should learn."""

from __future__ import annotations

import argparse
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from pluralfed.commands import data as data_cmd
from pluralfed.data import SurveyData, is_test_question, load_jsonl, split_items, write_jsonl
from pluralfed.errors import InputError
from pluralfed.synthetic import (
    SCALES,
    TOPICS,
    SyntheticWorld,
    generate_synthetic,
    group_names,
    synthetic_world,
)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return synthetic_world(n_groups=8, n_questions=200, seed=0)


def flat(data: SurveyData) -> list[tuple[str, str, tuple[str, ...], list[float], str | None]]:
    return [
        (g, it.question, it.options, it.distribution.tolist(), it.question_id)
        for g, items in data.groups.items()
        for it in items
    ]


def by_question(data: SurveyData) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for g, items in data.groups.items():
        for it in items:
            out[it.question][g] = it.distribution
    return out


def endorsement(world: SyntheticWorld, question: str, dist: np.ndarray) -> float:
    """How far a group's answer goes in the topic's direction: E[score] times the polarity."""
    q = next(q for q in world.questions if q.text == question)
    return q.polarity * float(dist @ np.array(SCALES[q.scale].scores))


def test_deterministic_under_seed(tmp_path: Path) -> None:
    a, b = generate_synthetic(seed=3), generate_synthetic(seed=3)
    assert flat(a) == flat(b)
    write_jsonl(a, tmp_path / "a.jsonl")
    write_jsonl(b, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    c = generate_synthetic(seed=4)
    assert flat(c) != flat(a)
    assert [it.question for it in c.groups["Aldoria"]] != [
        it.question for it in a.groups["Aldoria"]
    ]


def test_shape_and_validity(world: SyntheticWorld) -> None:
    data = world.data
    assert list(data.groups) == group_names(8)
    texts = [q.text for q in world.questions]
    assert len(texts) == len(set(texts)) == 200
    per_topic = {t: sum(q.topic == t for q in world.questions) for t in TOPICS}
    assert min(per_topic.values()) >= 15  # topics interleaved, none starved
    assert {q.scale for q in world.questions} == set(SCALES)
    scale_of = {q.text: q.scale for q in world.questions}
    for items in data.groups.values():
        # every group answers most questions (about 10% dropped)
        assert 0.8 * 200 <= len(items) <= 0.98 * 200
        for it in items:
            assert it.options == SCALES[scale_of[it.question]].options
            assert it.distribution.dtype == np.float64
            assert np.all(it.distribution > 0)
            assert abs(it.distribution.sum() - 1) < 1e-12
    # the PROTOCOL.md split gives every group test questions
    for items in data.groups.values():
        train, test = split_items(items)
        assert len(test) >= 20 and len(train) >= 100


def test_topic_visible_in_text(world: SyntheticWorld) -> None:
    for q in world.questions:
        items = [item for slot in TOPICS[q.topic].values() for item, _ in slot]
        assert any(item.lower() in q.text.lower() for item in items), q.text


def test_groups_differ(world: SyntheticWorld) -> None:
    js = [
        jensenshannon(a, b)
        for dists in by_question(world.data).values()
        for a, b in combinations(dists.values(), 2)
    ]
    assert np.mean(js) > 0.15  # the real data's protocol countries: about 0.19
    flat_world = synthetic_world(seed=0, temperature=0.0)
    js0 = [
        jensenshannon(a, b)
        for dists in by_question(flat_world.data).values()
        for a, b in combinations(dists.values(), 2)
    ]
    assert np.mean(js0) < 0.5 * np.mean(js)  # without stances, groups differ much less


def test_stance_consistent_within_topic(world: SyntheticWorld) -> None:
    """A group's answers on some questions of a topic predict its answers on the others: this is
    what context can tell a predictor. Checked on the PROTOCOL.md train/test split."""
    train_mean, test_mean, truth = [], [], []
    for g, items in world.data.groups.items():
        per: dict[tuple[str, bool], list[float]] = defaultdict(list)
        for it in items:
            topic = next(q.topic for q in world.questions if q.text == it.question)
            per[topic, is_test_question(it.question)].append(
                endorsement(world, it.question, it.distribution)
            )
        for ti, topic in enumerate(world.topics):
            if per[topic, False] and per[topic, True]:
                train_mean.append(np.mean(per[topic, False]))
                test_mean.append(np.mean(per[topic, True]))
                truth.append(world.stances[g][ti])
    assert len(truth) >= 50
    assert np.corrcoef(train_mean, test_mean)[0, 1] > 0.8
    assert np.corrcoef(train_mean, truth)[0, 1] > 0.9


def test_baselines_are_beatable(world: SyntheticWorld) -> None:
    """Uniform < group prior < knowing the question (other groups' mean answer): there is signal in
    the question text beyond a group's average, and in the group beyond the question."""
    data = world.data
    dists = by_question(data)
    uniform, prior, others = [], [], []
    for g, items in data.groups.items():
        train, test = split_items(items)
        for it in test:
            n = len(it.options)
            same = [t.distribution for t in train if len(t.options) == n]
            other = [d for h, d in dists[it.question].items() if h != g]
            uniform.append(1 - jensenshannon(np.full(n, 1 / n), it.distribution))
            prior.append(1 - jensenshannon(np.mean(same, axis=0), it.distribution))
            others.append(1 - jensenshannon(np.mean(other, axis=0), it.distribution))
    assert np.mean(uniform) < np.mean(prior) < np.mean(others) < 0.9


def test_many_questions_and_groups_stay_distinct() -> None:
    w = synthetic_world(n_groups=30, n_questions=1200, seed=1)
    texts = [q.text for q in w.questions]
    assert len(set(texts)) == 1200
    assert len(set(w.data.groups)) == 30
    assert all(len(items) > 0 for items in w.data.groups.values())


def test_tiny_and_no_drop() -> None:
    data = generate_synthetic(n_groups=1, n_questions=1, seed=0, drop_rate=0.0)
    assert len(data.groups["Aldoria"]) == 1
    full = generate_synthetic(n_groups=3, n_questions=30, seed=0, drop_rate=0.0)
    assert all(len(items) == 30 for items in full.groups.values())


def test_every_group_answers_something_even_at_a_high_drop_rate() -> None:
    """A group with no answers would be a group a loader refuses and a node cannot train:
    whatever the drop rate, each group keeps at least one question."""
    data = generate_synthetic(n_groups=40, n_questions=2, seed=0, drop_rate=0.99)
    assert len(data.groups) == 40
    assert all(len(items) >= 1 for items in data.groups.values())


def test_a_group_that_would_answer_nothing_gets_a_question_drawn_at_random() -> None:
    """The one question kept for a group the drop rate left without any is drawn at random:
    always the first question would give every such group the same one, and when it is a
    TEST question (PROTOCOL.md split) none of them would have a question to train on."""
    data = generate_synthetic(n_groups=40, n_questions=50, seed=0, drop_rate=0.999)
    kept = {items[0].question for items in data.groups.values() if len(items) == 1}
    assert len(kept) > 5


def test_stances_far_beyond_the_logit_range_still_give_distributions() -> None:
    """The temperature has no upper limit, so logits can pass exp's float range: the softmax
    is taken shift-invariantly, and the distributions stay finite and sum to 1 (not NaN)."""
    data = generate_synthetic(n_groups=8, n_questions=40, seed=0, temperature=2000.0)
    for items in data.groups.values():
        for it in items:
            assert np.isfinite(it.distribution).all()
            assert abs(it.distribution.sum() - 1) < 1e-12


def test_the_source_names_every_argument_the_data_depends_on() -> None:
    """`source` is how a file written from synthetic data says how to make it again."""
    source = generate_synthetic(n_groups=2, n_questions=10, seed=3, drop_rate=0.2).source
    assert source == (
        "synthetic(n_groups=2, n_questions=10, seed=3, temperature=1.0, drop_rate=0.2, "
        "noise=0.15, question_bias=0.5)"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_groups": 0},
        {"n_questions": 0},
        {"drop_rate": 1.0},
        {"drop_rate": -0.1},
        {"temperature": -1.0},
        {"noise": float("nan")},
        {"temperature": float("inf")},
        {"question_bias": float("inf")},
        {"n_groups": 10_001},
        {"n_questions": 100_001},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        generate_synthetic(**kwargs)


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pluralfed")
    data_cmd.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    out = tmp_path / "s.jsonl"
    assert run("data", "synth", "--out", str(out), "--groups", "3", "--questions", "40") == 0
    assert "3 groups" in capsys.readouterr().out
    loaded = load_jsonl(out)
    expected = generate_synthetic(n_groups=3, n_questions=40, seed=0)
    assert [(g, q, o, i) for g, q, o, _, i in flat(loaded)] == [
        (g, q, o, i) for g, q, o, _, i in flat(expected)
    ]
    for a, b in zip(flat(loaded), flat(expected), strict=True):
        np.testing.assert_allclose(a[3], b[3], rtol=0, atol=1e-15)
    with pytest.raises(InputError, match="number of groups"):
        run("data", "synth", "--out", str(out), "--groups", "0")
    # every option reaches the generator: the file is generate_synthetic's with the same settings
    options = ["--seed", "3", "--drop-rate", "0.4", "--temperature", "0.5"]
    assert (
        run("data", "synth", "--out", str(out), "--groups", "3", "--questions", "40", *options) == 0
    )
    expected = generate_synthetic(3, 40, seed=3, drop_rate=0.4, temperature=0.5)
    for a, b in zip(flat(load_jsonl(out)), flat(expected), strict=True):
        assert a[:3] == b[:3] and a[4] == b[4]
        np.testing.assert_allclose(a[3], b[3], rtol=0, atol=1e-15)
    # and without them, its defaults: 8 groups, 200 questions
    assert run("data", "synth", "--out", str(out)) == 0
    assert [(g, q, o, i) for g, q, o, _, i in flat(load_jsonl(out))] == [
        (g, q, o, i) for g, q, o, _, i in flat(generate_synthetic())
    ]
