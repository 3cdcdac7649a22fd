"""bench/reach.py: its vectorised score is the project's metric, and its mix fit finds a planted mix."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pluralfed.data import SurveyItem
from pluralfed.episodes import EmbeddedItem
from pluralfed.metrics import alignment_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
try:
    from reach import DonorTable, fit_mix, key
finally:
    sys.path.pop(0)


def item(rng: np.random.Generator, q: int, k: int, dist: np.ndarray | None = None) -> EmbeddedItem:
    d = rng.dirichlet(np.ones(k)) if dist is None else dist
    options = tuple(f"option {i}" for i in range(k))
    return EmbeddedItem(SurveyItem(f"question {q}", options, d), np.zeros((k, 4), np.float32))


def test_mean_score_is_alignment_score_over_the_covered_questions() -> None:
    rng = np.random.default_rng(0)
    items = [item(rng, q, k) for q, k in enumerate([2, 3, 4, 5, 3, 4])]
    donors = [
        {key(e): rng.dirichlet(np.ones(e.num_options)) for e in items if rng.random() < 0.7}
        for _ in range(3)
    ]
    table = DonorTable(items, donors)
    weights = np.array([0.5, 0.3, 0.2])
    expected = []
    for e in items:
        asked = [(w, d[key(e)]) for w, d in zip(weights, donors, strict=True) if key(e) in d]
        if asked:
            total = sum(w for w, _ in asked)
            pred = sum(w / total * a for w, a in asked)
            expected.append(alignment_score(pred, e.item.distribution))
    assert table.covered.sum() == len(expected) > 0
    assert table.mean_score(weights) == pytest.approx(float(np.mean(expected)), abs=1e-9)


def test_fit_mix_recovers_a_planted_mix() -> None:
    rng = np.random.default_rng(1)
    shapes = [int(k) for k in rng.integers(2, 6, size=40)]
    donor_answers = [[rng.dirichlet(np.ones(k)) for k in shapes] for _ in range(3)]
    planted = np.array([0.6, 0.0, 0.4])
    items = [
        item(rng, q, k, sum(w * donor_answers[d][q] for d, w in enumerate(planted)))
        for q, k in enumerate(shapes)
    ]
    donors = [{key(e): donor_answers[d][q] for q, e in enumerate(items)} for d in range(3)]
    table = DonorTable(items, donors)
    weights = fit_mix(table)
    assert table.mean_score(weights) > 0.995
    assert weights == pytest.approx(planted, abs=0.05)
    assert table.mean_score(np.full(3, 1 / 3)) < table.mean_score(weights)
