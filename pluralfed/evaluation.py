"""Few-shot evaluation per PROTOCOL.md, per group and over a set of groups.

A node evaluates its own group and reports a `GroupEvaluation` (plain numbers); whoever combines
them (the coordinator, or the centralized CLI) calls `summarize_groups`. Raw answers never move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pluralfed.episodes import (
    EmbeddedItem,
    Episode,
    GroupSplit,
    evaluation_context,
    make_batch,
    with_uniform_answers,
)
from pluralfed.errors import InputError
from pluralfed.metrics import Summary, alignment_score, group_prior, summarize, uniform_prediction
from pluralfed.model import GPO
from pluralfed.protocol import EVAL_MAX_CONTEXT

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


@torch.inference_mode()
def predict_targets(
    model: GPO, context: Sequence[EmbeddedItem], targets: Sequence[EmbeddedItem]
) -> list[np.ndarray]:
    """Predicted distribution for every target, all targets in one pass (they never see each other)."""
    was_training = model.training
    model.eval()
    try:
        batch = make_batch([Episode(context=context, targets=targets)])
        pred = model.predict(batch)[0].double().numpy()
    finally:
        model.train(was_training)
    return [pred[start:end] for start, end in batch.question_slices[0][len(context) :]]


def evaluate_group(
    model: GPO, split: GroupSplit, max_context: int = EVAL_MAX_CONTEXT, seed: int = 0
) -> GroupEvaluation:
    """PROTOCOL.md figures for one group. A group without test or train questions is the data's
    fault, not the model's: an InputError, so callers can tell it from a failed prediction."""
    if not split.test:
        raise InputError(f"group {split.name!r} has no test questions")
    if not split.train:
        raise InputError(f"group {split.name!r} has no train questions to use as context")
    context = evaluation_context(split.train, max_context, seed)
    truths = [t.item.distribution for t in split.test]

    def mean_alignment(preds: Sequence[np.ndarray]) -> float:
        return float(np.mean([alignment_score(p, t) for p, t in zip(preds, truths, strict=True)]))

    train_items = [e.item for e in split.train]
    return GroupEvaluation(
        group=split.name,
        num_questions=len(split.test),
        model=mean_alignment(predict_targets(model, context, split.test)),
        uniform_context=mean_alignment(
            predict_targets(model, with_uniform_answers(context), split.test)
        ),
        uniform_baseline=mean_alignment([uniform_prediction(t.item) for t in split.test]),
        prior_baseline=mean_alignment(
            [group_prior(train_items, t.num_options) for t in split.test]
        ),
    )


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
    by_group = {e.group: e for e in evals}
    model = summarize({g: e.model for g, e in by_group.items()})
    uniform_context = summarize({g: e.uniform_context for g, e in by_group.items()})
    return SetReport(
        model=model,
        context_gain=model.alignment - uniform_context.alignment,
        uniform_baseline=summarize({g: e.uniform_baseline for g, e in by_group.items()}),
        prior_baseline=summarize({g: e.prior_baseline for g, e in by_group.items()}),
        per_group={g: e.model for g, e in by_group.items()},
    )
