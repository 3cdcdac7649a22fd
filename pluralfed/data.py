"""Survey data in one in-memory form: group -> list of SurveyItem.

Every loader returns a SurveyData; everything downstream (embedding, training, metrics) reads only that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SurveyItem:
    """One group's answers to one question: how the group's answers spread over the options."""

    question: str
    options: tuple[str, ...]
    distribution: np.ndarray  # float64, shape (len(options),), non-negative, sums to 1
    question_id: str | None = None


@dataclass
class SurveyData:
    """group name -> its items, plus what loading skipped (all-zero distributions)."""

    groups: dict[str, list[SurveyItem]]
    skipped_all_zero: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)


def is_test_question(question: str) -> bool:
    """PROTOCOL.md split: a question is a TEST question iff sha256(text) % 5 == 0."""
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 5 == 0


def split_items(items: list[SurveyItem]) -> tuple[list[SurveyItem], list[SurveyItem]]:
    """(train, test) per PROTOCOL.md, order preserved."""
    train = [it for it in items if not is_test_question(it.question)]
    test = [it for it in items if is_test_question(it.question)]
    return train, test
