"""From embedded survey items to the padded tensors the model reads.

Training draws random few-shot episodes from one group's TRAIN questions (PROTOCOL.md: context and
target counts uniform in 9..90, capped by what the group has); evaluation uses the group's TRAIN
questions as context (at most 90, fixed seed) and predicts its TEST questions.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pluralfed.data import SurveyItem, is_test_question
from pluralfed.model import EpisodeBatch


@dataclass(frozen=True)
class EmbeddedItem:
    """A survey item with one text embedding per option, (K, E) float32."""

    item: SurveyItem
    embeddings: np.ndarray

    @property
    def num_options(self) -> int:
        return len(self.item.options)


@dataclass(frozen=True)
class Episode:
    context: Sequence[EmbeddedItem]
    targets: Sequence[EmbeddedItem]


@dataclass
class GroupSplit:
    """One group's questions, embedded and split per PROTOCOL.md."""

    name: str
    train: list[EmbeddedItem]
    test: list[EmbeddedItem]


def split_group(
    name: str, items: Sequence[SurveyItem], embeddings: Sequence[np.ndarray]
) -> GroupSplit:
    embedded = [EmbeddedItem(it, emb) for it, emb in zip(items, embeddings, strict=True)]
    return GroupSplit(
        name,
        train=[e for e in embedded if not is_test_question(e.item.question)],
        test=[e for e in embedded if is_test_question(e.item.question)],
    )


def with_uniform_answers(items: Sequence[EmbeddedItem]) -> list[EmbeddedItem]:
    """The same questions with every answer distribution replaced by a uniform one (context gain)."""
    out = []
    for e in items:
        k = e.num_options
        uniform = SurveyItem(
            e.item.question, e.item.options, np.full(k, 1.0 / k), e.item.question_id
        )
        out.append(EmbeddedItem(uniform, e.embeddings))
    return out


def sample_episode(
    items: Sequence[EmbeddedItem],
    rng: np.random.Generator,
    context_range: tuple[int, int],
    target_range: tuple[int, int],
) -> Episode:
    """A random context/target split of one group's questions (disjoint, sizes drawn uniformly)."""
    n = len(items)
    if n < 2:
        raise ValueError(f"a training episode needs at least 2 questions, the group has {n}")
    n_context = min(int(rng.integers(context_range[0], context_range[1] + 1)), n - 1)
    n_target = min(int(rng.integers(target_range[0], target_range[1] + 1)), n - n_context)
    order = rng.permutation(n)
    return Episode(
        context=[items[i] for i in order[:n_context]],
        targets=[items[i] for i in order[n_context : n_context + n_target]],
    )


def check_seed(seed: int) -> int:
    """`seed` as a non-negative int, or a ValueError that says so: numpy's generators refuse
    negative seeds with a message that names neither the seed nor where it came from."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an integer, got {seed!r}") from None
    if value < 0:
        raise ValueError(f"seed must be a non-negative integer, got {value}")
    return value


def evaluation_context(
    train: Sequence[EmbeddedItem], max_context: int, seed: int = 0
) -> list[EmbeddedItem]:
    """PROTOCOL.md: all of the group's TRAIN questions, at most `max_context`, chosen with a fixed seed."""
    if max_context < 1:  # numpy's own error would not say which setting is wrong
        raise ValueError(f"max_context must be at least 1, got {max_context}")
    seed = check_seed(seed)
    if len(train) <= max_context:
        return list(train)
    chosen = np.random.default_rng(seed).choice(len(train), size=max_context, replace=False)
    return [train[i] for i in sorted(chosen)]


def make_batch(episodes: Sequence[Episode]) -> EpisodeBatch:
    """Pack each episode's options into one token row (context questions first), pad rows to
    the longest; every episode must have context and targets."""
    if not episodes:
        raise ValueError("no episodes to batch")
    for i, ep in enumerate(episodes):
        if not ep.context or not ep.targets:
            raise ValueError(f"episode {i} needs at least one context and one target question")
    questions = [list(ep.context) + list(ep.targets) for ep in episodes]
    b = len(episodes)
    t = max(sum(e.num_options for e in qs) for qs in questions)
    dim = questions[0][0].embeddings.shape[1]
    n_questions = sum(len(qs) for qs in questions)
    emb = np.zeros((b, t, dim), dtype=np.float32)
    probs = np.zeros((b, t), dtype=np.float32)
    token_mask = np.zeros((b, t), dtype=bool)
    is_context = np.zeros((b, t), dtype=bool)
    is_target = np.zeros((b, t), dtype=bool)
    segment = np.full((b, t), n_questions, dtype=np.int64)  # padding: the extra last segment
    slices: list[list[tuple[int, int]]] = []
    question_options: list[list[tuple[str, ...]]] = []
    seg = 0
    for bi, (ep, qs) in enumerate(zip(episodes, questions, strict=True)):
        pos = 0
        row: list[tuple[int, int]] = []
        question_options.append([tuple(e.item.options) for e in qs])
        for qi, e in enumerate(qs):
            n = e.num_options
            if e.embeddings.shape != (n, dim):
                raise ValueError(
                    f"embedding of {e.item.question[:40]!r} has shape {e.embeddings.shape}, "
                    f"expected ({n}, {dim})"
                )
            end = pos + n
            emb[bi, pos:end] = e.embeddings
            probs[bi, pos:end] = e.item.distribution
            token_mask[bi, pos:end] = True
            (is_context if qi < len(ep.context) else is_target)[bi, pos:end] = True
            segment[bi, pos:end] = seg
            row.append((pos, end))
            seg += 1
            pos = end
        slices.append(row)
    return EpisodeBatch(
        embeddings=torch.from_numpy(emb),
        probs=torch.from_numpy(probs),
        token_mask=torch.from_numpy(token_mask),
        is_context=torch.from_numpy(is_context),
        is_target=torch.from_numpy(is_target),
        segment=torch.from_numpy(segment),
        num_segments=n_questions + 1,
        question_slices=slices,
        question_options=question_options,
    )


def jitter_questions(batch: EpisodeBatch, std: float, rng: np.random.Generator) -> EpisodeBatch:
    """The batch with one Gaussian vector (per-dimension `std`) added to each question's embeddings.

    Every option of a question moves by the same vector, so what tells its options apart is kept
    while the question itself is blurred: trained on exact embeddings of the same questions
    again and again, the network memorises them, and the noise makes it learn an answer that
    changes smoothly from one question to similar ones (see the README's results for what it
    does to unseen questions).
    """
    if not (np.isfinite(std) and std >= 0):
        raise ValueError(f"embedding noise must be a finite std >= 0, got {std!r}")
    if std == 0:
        return batch
    dim = batch.embeddings.shape[-1]
    shifts = rng.standard_normal((batch.num_segments, dim)).astype(np.float32) * np.float32(std)
    shifts[-1] = 0.0  # the padding segment
    moved = batch.embeddings + torch.from_numpy(shifts)[batch.segment]
    return replace(batch, embeddings=moved)
