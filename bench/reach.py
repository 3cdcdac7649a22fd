#!/usr/bin/env python3
"""How far can a predictor that learns from the training groups go on the held-out groups?

    .venv/bin/python bench/reach.py      # writes bench/results/reach.{json,md}

Why: issue 5 asks for held-out alignment >= 0.80, worst group >= 0.72, FI >= 0.97. Everything a
federated predictor knows comes from the 8 training groups' answers. The same survey question was
often asked in many countries, so most held-out TEST questions were also put to training groups
(PROTOCOL.md's split is by question text, so they are TEST questions there too, never trained on).
These rows are oracles: they look up the training groups' TRUE answers to the held-out group's
own test questions, which no trained model ever sees, and they say how far transferring what the
training groups answered could go even if a model predicted those answers perfectly:

- cross-group mean: the training groups' mean answer to the same question;
- closest training group: the one training group whose answers score best on this group's test
  questions (chosen on the test questions themselves);
- mix fitted on context: a convex mix of the training groups' answers, weights fitted on the
  group's own TRAIN questions (its context, where training groups answered them too);
- mix fitted on test: the same, weights fitted on the test questions themselves (an upper bound
  for any mix of training groups, however it is chosen).

A question that no training group was asked (same text and options) is predicted by the pooled
question kNN of `bench/knn_baseline.py` (T = 0.08), in every row. For the training groups each row
uses the other 7 training groups. Per group: mean 1 - JS over its TEST questions (PROTOCOL.md).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from knn_baseline import QuestionKnn, protocol_command, write_results  # noqa: E402

from pluralfed.episodes import EmbeddedItem, GroupSplit  # noqa: E402
from pluralfed.metrics import Summary, alignment_score, summarize  # noqa: E402

KNN_TEMPERATURE = 0.08  # bench/knn_baseline.py's choice on the training groups' test questions
Key = tuple[str, tuple[str, ...]]


def key(e: EmbeddedItem) -> Key:
    return (e.item.question, e.item.options)


class DonorTable:
    """The donor groups' true answers to a list of questions, padded to the most options, so that
    a mix of them is scored for all questions at once while its weights are fitted."""

    def __init__(
        self, items: Sequence[EmbeddedItem], answers: Sequence[Mapping[Key, np.ndarray]]
    ) -> None:
        width = max((e.num_options for e in items), default=1)
        self.answers = np.zeros((len(items), len(answers), width))
        self.asked = np.zeros((len(items), len(answers)))
        self.truth = np.zeros((len(items), width))
        for q, e in enumerate(items):
            k = e.num_options
            self.truth[q, :k] = e.item.distribution / e.item.distribution.sum()
            for d, a in enumerate(answers):
                if key(e) in a:
                    self.answers[q, d, :k] = a[key(e)]
                    self.asked[q, d] = 1.0
        # asarray: the stubs type .any(axis=...) as a scalar or an array
        self.covered = np.asarray(self.asked.any(axis=1))

    def predictions(self, weights: np.ndarray) -> np.ndarray:
        """Per covered question: the donors that were asked it, mixed by `weights` renormalised."""
        w = self.asked[self.covered] * weights + 1e-12 * self.asked[self.covered]
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("qd,qdk->qk", w, self.answers[self.covered])

    def mean_score(self, weights: np.ndarray) -> float:
        """Mean 1 - JS over the covered questions (the metric of `alignment_score`, vectorised)."""
        p = self.predictions(weights)
        p /= p.sum(axis=1, keepdims=True)
        t = self.truth[self.covered]
        m = 0.5 * (p + t)

        def kl(a: np.ndarray) -> np.ndarray:
            ratio = np.where(a > 0, a / np.where(m > 0, m, 1.0), 1.0)
            return np.sum(a * np.log(ratio), axis=1)

        js = np.maximum(0.5 * kl(p) + 0.5 * kl(t), 0.0)
        return float(np.mean(1.0 - np.sqrt(js)))


def fit_mix(table: DonorTable) -> np.ndarray:
    """Convex weights that maximise the mix's mean score on `table`: Nelder-Mead on softmax
    logits, from the uniform mix and from every single donor, best of all."""
    n = table.asked.shape[1]

    def loss(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return -table.mean_score(w / w.sum())

    inits = [np.zeros(n)] + [np.eye(n)[i] * 5.0 for i in range(n)]
    best = min(
        (minimize(loss, z0, method="Nelder-Mead", options={"maxiter": 4000}) for z0 in inits),
        key=lambda r: float(r.fun),
    )
    w = np.exp(best.x - best.x.max())
    return np.asarray(w / w.sum())


def evaluate(
    target: GroupSplit,
    donor_names: Sequence[str],
    splits: Mapping[str, GroupSplit],
    knn: QuestionKnn,
) -> dict[str, Any]:
    """One group's scores for every row of ROWS, with `donor_names` as the training groups."""
    test_answers = [{key(e): e.item.distribution for e in splits[d].test} for d in donor_names]
    train_answers = [{key(e): e.item.distribution for e in splits[d].train} for d in donor_names]
    n = len(donor_names)
    tests = target.test
    test_table = DonorTable(tests, test_answers)
    context_table = DonorTable(target.train, train_answers)
    knn_predictions = [knn.predict(e, KNN_TEMPERATURE) for e in tests]

    def score(weights: np.ndarray) -> float:
        """Mean 1 - JS over all test questions, the kNN's prediction where no donor was asked."""
        mixed = iter(test_table.predictions(weights))
        preds = [
            next(mixed) if c else p
            for c, p in zip(test_table.covered, knn_predictions, strict=True)
        ]
        return float(
            np.mean(
                [
                    alignment_score(p[: e.num_options], e.item.distribution)
                    for p, e in zip(preds, tests, strict=True)
                ]
            )
        )

    singles = [score(np.eye(n)[i]) for i in range(n)]
    closest = int(np.argmax(singles))
    w_context = fit_mix(context_table) if context_table.covered.any() else np.full(n, 1.0 / n)
    w_test = fit_mix(test_table)
    return {
        "test_questions": len(tests),
        "asked_of_training_groups": int(test_table.covered.sum()),
        "context_questions_used_for_the_fit": int(context_table.covered.sum()),
        "scores": {
            "knn": float(
                np.mean(
                    [
                        alignment_score(p, e.item.distribution)
                        for p, e in zip(knn_predictions, tests, strict=True)
                    ]
                )
            ),
            "mean": score(np.full(n, 1.0 / n)),
            "closest": singles[closest],
            "mix_context": score(w_context),
            "mix_test": score(w_test),
        },
        "closest_group": donor_names[closest],
        "mix_fitted_on_context": {
            d: round(float(w), 3) for d, w in zip(donor_names, w_context, strict=True)
        },
        "mix_fitted_on_test": {
            d: round(float(w), 3) for d, w in zip(donor_names, w_test, strict=True)
        },
    }


ROWS = {
    "knn": "pooled question kNN (not an oracle; bench/knn_baseline.py)",
    "mean": "oracle: the training groups' mean answer to the same question",
    "closest": "oracle: the closest training group (chosen on the test questions)",
    "mix_context": "oracle: a mix of training groups, weights fitted on the group's TRAIN questions",
    "mix_test": "oracle: the best mix of training groups (weights fitted on the test questions)",
}


def summary_table(rows: Mapping[str, Mapping[str, Any]], first_column: str) -> list[str]:
    """Markdown rows label | alignment | worst group (its name) | FI, from `Summary` dicts."""
    lines = [f"| {first_column} | alignment | worst group | FI |", "| --- | --- | --- | --- |"]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['alignment']:.4f} | {r['worst']:.4f} ({r['worst_group']}) "
            f"| {r['fairness']:.4f} |"
        )
    return lines


def reach(
    splits: Mapping[str, GroupSplit], training: Sequence[str], held_out: Sequence[str]
) -> tuple[dict[str, dict[str, Summary]], dict[str, dict[str, Any]]]:
    """Every row of ROWS for every group: ({"held_out"|"training": {row: Summary}}, per group).
    Held-out groups draw on all training groups; a training group on the other ones."""
    per_group: dict[str, dict[str, Any]] = {}
    for g in held_out:
        knn = QuestionKnn([e for d in training for e in splits[d].train])
        per_group[g] = evaluate(splits[g], training, splits, knn)
    for g in training:
        donors = [d for d in training if d != g]
        knn = QuestionKnn([e for d in donors for e in splits[d].train])
        per_group[g] = evaluate(splits[g], donors, splits, knn)
    summaries = {
        name: {row: summarize({g: per_group[g]["scores"][row] for g in groups}) for row in ROWS}
        for name, groups in (("held_out", held_out), ("training", training))
        if groups
    }
    return summaries, per_group


def main() -> int:
    args, training, held_out, splits = protocol_command(__doc__, "reach")
    summaries, per_group = reach(splits, training, held_out)
    result = {
        "summaries": {n: {r: asdict(s) for r, s in rows.items()} for n, rows in summaries.items()},
        "per_group": per_group,
    }
    lines = [
        "# How far transfer from the training groups can go (oracles)",
        "",
        "Command: `.venv/bin/python bench/reach.py` (see its docstring). The oracle rows look up "
        "the training groups' TRUE answers to the predicted group's own TEST questions; a "
        "question no training group was asked is predicted by the pooled question kNN. "
        "Training groups: each against the other 7.",
        "",
    ]
    for name, title in (("held_out", "Held-out groups"), ("training", "Training groups")):
        rows = {label: asdict(summaries[name][row]) for row, label in ROWS.items()}
        lines += [f"## {title}", "", *summary_table(rows, "predictor"), ""]
    lines += [
        "## Per group",
        "",
        "| group | test questions | asked of training groups | kNN | mean | closest | mix (context) | mix (test) | closest group |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, r in per_group.items():
        s = r["scores"]
        lines.append(
            f"| {g} | {r['test_questions']} | {r['asked_of_training_groups']} | {s['knn']:.4f} "
            f"| {s['mean']:.4f} | {s['closest']:.4f} | {s['mix_context']:.4f} "
            f"| {s['mix_test']:.4f} | {r['closest_group']} |"
        )
    write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
