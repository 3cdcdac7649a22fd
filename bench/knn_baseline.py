#!/usr/bin/env python3
"""A question-level nearest-neighbour baseline on the pooled training answers (not federated).

    .venv/bin/python bench/knn_baseline.py      # writes bench/results/knn_baseline.{json,md}

How far does plain similarity between question texts go, with no training at all? A TEST
question of any group is predicted as the average of the answer distributions of the training
groups' TRAIN questions that have as many options, weighted by softmax(cosine / T) between
question vectors (the mean of the question's option embeddings, PROTOCOL's encoder). Options are
matched by position, as the surveys list them. The temperature T is chosen on the training groups'
TEST questions from a grid; held-out groups are scored at that T (the whole grid is printed too).

This needs every training group's answers in one place, which a federation never has: it is a
reference for what the data supports, beside the report's uniform and group-prior baselines, not
a way to run pluralfed. It ignores the group it predicts for (no context).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pluralfed.commands.common import add_encoder_args, open_encoder  # noqa: E402
from pluralfed.data import load_survey  # noqa: E402
from pluralfed.embeddings import TextEncoder  # noqa: E402
from pluralfed.episodes import EmbeddedItem, GroupSplit  # noqa: E402
from pluralfed.metrics import Summary, alignment_score, summarize, uniform_prediction  # noqa: E402
from pluralfed.prepare import default_groups, embed_groups  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "globalopinionqa" / "global_opinions.csv"
TEMPERATURES = (0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2)


def question_vector(item: EmbeddedItem) -> np.ndarray:
    v = item.embeddings.mean(axis=0).astype(np.float64)
    return v / max(float(np.linalg.norm(v)), 1e-12)


class QuestionKnn:
    """Kernel regression over a pool of answered questions, one pool per number of options."""

    def __init__(self, pool: Sequence[EmbeddedItem]) -> None:
        by_k: dict[int, list[EmbeddedItem]] = {}
        for item in pool:
            by_k.setdefault(item.num_options, []).append(item)
        self.keys = {k: np.stack([question_vector(e) for e in v]) for k, v in by_k.items()}
        self.values = {k: np.stack([e.item.distribution for e in v]) for k, v in by_k.items()}

    def predict(self, target: EmbeddedItem, temperature: float) -> np.ndarray:
        k = target.num_options
        if k not in self.keys:
            return uniform_prediction(target.item)
        sims = self.keys[k] @ question_vector(target)
        w = np.exp((sims - sims.max()) / temperature)
        return (w / w.sum()) @ self.values[k]


def protocol_splits(
    data_path: Path, encoder: TextEncoder
) -> tuple[list[str], list[str], dict[str, GroupSplit]]:
    """(training groups, held-out groups, their embedded splits) of PROTOCOL.md. With data that
    lacks those groups: no held-out groups and no splits (nothing embedded)."""
    data = load_survey(data_path)
    training, held_out = default_groups(data)
    if not held_out:
        return training, held_out, {}
    return training, held_out, embed_groups(data, training + held_out, encoder)


def score(
    knn: QuestionKnn, splits: Mapping[str, GroupSplit], groups: Sequence[str], temperature: float
) -> Summary:
    per_group = {
        g: float(
            np.mean(
                [
                    alignment_score(knn.predict(t, temperature), t.item.distribution)
                    for t in splits[g].test
                ]
            )
        )
        for g in groups
    }
    return summarize(per_group)


def row(name: str, s: Summary) -> str:
    return f"| {name} | {s.alignment:.4f} | {s.worst:.4f} ({s.worst_group}) | {s.fairness:.4f} |"


def protocol_command(
    description: str | None, name: str
) -> tuple[argparse.Namespace, list[str], list[str], dict[str, GroupSplit]]:
    """The command line of a reference script over PROTOCOL.md's groups (--data, --out, the
    encoder options): (its arguments, training groups, held-out groups, embedded splits)."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="(default: %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / name)
    add_encoder_args(ap)
    args = ap.parse_args()
    training, held_out, splits = protocol_splits(args.data, open_encoder(args))
    if not held_out:
        ap.error(f"{args.data}: the PROTOCOL.md groups are not all in the data")
    return args, training, held_out, splits


def write_results(out: Path, result: Mapping[str, Any], markdown_lines: Sequence[str]) -> None:
    """`out`.json (the figures) and `out`.md (the table), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(markdown_lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> int:
    args, training, held_out, splits = protocol_command(__doc__, "knn_baseline")
    knn = QuestionKnn([e for g in training for e in splits[g].train])
    grid = {
        t: {
            "training": score(knn, splits, training, t),
            "held_out": score(knn, splits, held_out, t),
        }
        for t in TEMPERATURES
    }
    chosen = max(TEMPERATURES, key=lambda t: grid[t]["training"].alignment)
    result: dict[str, Any] = {
        "chosen_temperature": chosen,
        "chosen_on": "training groups' TEST questions",
        "grid": {str(t): {k: asdict(v) for k, v in s.items()} for t, s in grid.items()},
    }
    lines = [
        "# Question kNN on the pooled training answers (not federated; a reference)",
        "",
        f"Command: `.venv/bin/python bench/knn_baseline.py`. T = {chosen}, chosen on the training "
        "groups' TEST questions. Per group: mean 1 - JS over its TEST questions (PROTOCOL.md).",
        "",
        "| set | alignment | worst group | FI |",
        "| --- | --- | --- | --- |",
        row("held-out groups", grid[chosen]["held_out"]),
        row("training groups' test questions", grid[chosen]["training"]),
        "",
        "| T | held-out alignment | worst | FI | training groups' alignment |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in TEMPERATURES:
        h, tr = grid[t]["held_out"], grid[t]["training"]
        lines.append(
            f"| {t} | {h.alignment:.4f} | {h.worst:.4f} | {h.fairness:.4f} | {tr.alignment:.4f} |"
        )
    write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
