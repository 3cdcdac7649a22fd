"""Few-shot evaluation per PROTOCOL.md, per group and over a set of groups.

A node evaluates its own group and reports a `GroupEvaluation` (plain numbers); whoever combines
them (the coordinator, or the centralized CLI) calls `summarize_groups`. Raw answers never move.
Those result types live in the torch-free `pluralfed.metrics`, so the coordinator's round engine
and transport need no torch (only its process start builds the initial model).
"""

from __future__ import annotations

from collections.abc import Sequence

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
from pluralfed.metrics import (  # re-exported: the evaluation's results live with the metrics
    GROUP_METRICS,
    GroupEvaluation,
    SetReport,
    alignment_score,
    group_prior,
    summarize_groups,
    uniform_prediction,
)
from pluralfed.model import GPO
from pluralfed.protocol import EVAL_MAX_CONTEXT


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


__all__ = [
    "GROUP_METRICS",
    "GroupEvaluation",
    "SetReport",
    "evaluate_group",
    "predict_targets",
    "summarize_groups",
]
