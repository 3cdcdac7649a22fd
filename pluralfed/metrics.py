"""PROTOCOL.md metrics: per-question 1 - Jensen-Shannon distance, per-group means, and summaries.

Pure numpy so that both the nodes (which score their own test questions) and the coordinator
(which only combines per-group figures it is sent) use the same definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pluralfed.data import SurveyItem


def _normalise(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"not a distribution (sum {total})")
    return p / total


def alignment_score(pred: np.ndarray, true: np.ndarray) -> float:
    """1 - Jensen-Shannon distance with natural log, as scipy.spatial.distance.jensenshannon."""
    p, q = _normalise(pred), _normalise(true)
    if p.shape != q.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {q.shape}")
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    js = 0.5 * kl(p) + 0.5 * kl(q)
    return 1.0 - float(np.sqrt(max(js, 0.0)))


def uniform_prediction(item: SurveyItem) -> np.ndarray:
    k = len(item.options)
    return np.full(k, 1.0 / k)


def group_prior(train: Sequence[SurveyItem], num_options: int) -> np.ndarray:
    """Baseline: the mean distribution of the group's TRAIN questions with as many options, else uniform."""
    same = [it.distribution for it in train if len(it.options) == num_options]
    if not same:
        return np.full(num_options, 1.0 / num_options)
    return _normalise(np.mean(same, axis=0))


@dataclass(frozen=True)
class Summary:
    """Alignment over groups: mean, the worst group, and the fairness index 1/(1+CoV)."""

    alignment: float
    worst: float
    worst_group: str
    fairness: float
    num_groups: int

    def to_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


def summarize(per_group: Mapping[str, float]) -> Summary:
    """Groups are taken in name order, not in the mapping's: reports arrive in any order, and a
    float sum in another order may differ in its last bit (a run must be a function of its seed).
    """
    if not per_group:
        raise ValueError("no groups to summarize")
    names = sorted(per_group)
    scores = np.array([per_group[n] for n in names], dtype=np.float64)
    mean = float(scores.mean())
    cov = float(scores.std() / mean) if mean > 0 else float("inf")
    worst = int(np.argmin(scores))
    return Summary(
        alignment=mean,
        worst=float(scores[worst]),
        worst_group=names[worst],
        fairness=1.0 / (1.0 + cov),
        num_groups=len(names),
    )


def rounds_to_fraction(history: Sequence[tuple[int, float]], fraction: float) -> int | None:
    """Convergence: the first round whose alignment reaches `fraction` of the run's best."""
    if not history:
        return None
    best = max(v for _, v in history)
    for rnd, value in history:
        if value >= fraction * best:
            return rnd
    return None


# the per-group figures a node reports; each is a mean over the group's test questions
GROUP_METRICS: tuple[str, ...] = ("model", "uniform_context", "uniform_baseline", "prior_baseline")


@dataclass(frozen=True)
class GroupEvaluation:
    group: str
    num_questions: int
    model: float  # alignment with the group's own context
    uniform_context: float  # same context questions, answers replaced by uniform
    uniform_baseline: float
    prior_baseline: float

    @property
    def context_gain(self) -> float:
        return self.model - self.uniform_context

    def metrics(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in GROUP_METRICS}

    @classmethod
    def from_metrics(
        cls, group: str, num_questions: int, metrics: Mapping[str, float]
    ) -> GroupEvaluation:
        missing = [m for m in GROUP_METRICS if m not in metrics]
        if missing:
            raise ValueError(f"evaluation of group {group!r} lacks metrics {missing}")
        values = {m: float(metrics[m]) for m in GROUP_METRICS}
        bad = [m for m, v in values.items() if not (np.isfinite(v) and -1e-9 <= v <= 1 + 1e-9)]
        if bad:
            raise ValueError(f"evaluation of group {group!r}: metrics {bad} are not in [0, 1]")
        if num_questions <= 0:
            raise ValueError(f"evaluation of group {group!r} covers no questions")
        return cls(group=group, num_questions=num_questions, **values)


@dataclass(frozen=True)
class SetReport:
    """PROTOCOL.md figures for one set of groups (training groups' test questions, or held-out)."""

    model: Summary
    context_gain: float
    uniform_baseline: Summary
    prior_baseline: Summary
    per_group: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SetReport:
        return cls(
            model=Summary(**raw["model"]),
            context_gain=float(raw["context_gain"]),
            uniform_baseline=Summary(**raw["uniform_baseline"]),
            prior_baseline=Summary(**raw["prior_baseline"]),
            per_group=dict(raw["per_group"]),
        )


def summarize_groups(evals: Sequence[GroupEvaluation]) -> SetReport:
    if not evals:
        raise ValueError("no group evaluations to summarize")
    by_group = {e.group: e for e in sorted(evals, key=lambda e: e.group)}  # arrival order aside
    model = summarize({g: e.model for g, e in by_group.items()})
    uniform_context = summarize({g: e.uniform_context for g, e in by_group.items()})
    return SetReport(
        model=model,
        context_gain=model.alignment - uniform_context.alignment,
        uniform_baseline=summarize({g: e.uniform_baseline for g, e in by_group.items()}),
        prior_baseline=summarize({g: e.prior_baseline for g, e in by_group.items()}),
        per_group={g: e.model for g, e in by_group.items()},
    )
