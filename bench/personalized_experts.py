#!/usr/bin/env python3
"""Personalized experts: does a per-group fine-tune of the federated model, mixed per group, beat it?

    .venv/bin/python bench/personalized_experts.py \\
        --checkpoint bench/results/reproduce/fed-ensemble-of-3--members-3-s0/coordinator/final \\
        --checkpoint ...-s1/coordinator/final --checkpoint ...-s2/coordinator/final
    # writes bench/results/personalized_experts.{json,md}

The federated model predicts much the same distribution for every group (its context gain is ~0).
This measures a way around that which a federation could run after its last round:

* **Experts.** Each training group fine-tunes the final global model on its own TRAIN questions
  for --steps local steps, with the node's own training code (`LocalTrainer`, the PROTOCOL's
  episodes, Adam at the run's learning rate, fresh optimizer state).
* **Own expert** (training groups only): each group predicts its TEST questions with its expert.
* **Expert mix** (any group, held-out ones included): a convex mix of the experts' predicted
  distributions, with weights fitted on the group's own context questions only (the PROTOCOL's
  at most 90 TRAIN questions): every context question is predicted by every expert from the
  other four fifths of the context (5-fold), and the weights (softmax of one number per expert,
  Adam) minimise the mean JS distance of the mix to the group's answers. TEST questions are never
  seen before scoring.

Everything else follows PROTOCOL.md: context = the group's TRAIN questions (at most 90, fixed
seed), per question 1 - JS distance, per group the mean, then mean / worst / FI over groups; with
the context memory off and at --memory-weight. Each checkpoint (one seed of the real federation)
is one sample: figures are mean ± std over them.

This runs in one process, from the real federation's final checkpoints; it is not wired into the
coordinator (see the README: the experts would be per-group models leaving the nodes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pluralfed.checkpoint import load_checkpoint  # noqa: E402
from pluralfed.commands.common import add_encoder_args, open_encoder  # noqa: E402
from pluralfed.data import load_survey  # noqa: E402
from pluralfed.episodes import EmbeddedItem, GroupSplit, evaluation_context  # noqa: E402
from pluralfed.evaluation import predict_targets  # noqa: E402
from pluralfed.metrics import alignment_score, summarize  # noqa: E402
from pluralfed.model import GPO  # noqa: E402
from pluralfed.prepare import default_groups, embed_groups  # noqa: E402
from pluralfed.protocol import EVAL_MAX_CONTEXT, LEARNING_RATE  # noqa: E402
from pluralfed.training import TrainingSettings, fine_tuned_copy  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "globalopinionqa" / "global_opinions.csv"
FOLDS = 5
Prediction = list[np.ndarray]


def with_memory(model: GPO, weight: float) -> GPO:
    out = copy.deepcopy(model)
    out.cfg = dataclasses.replace(out.cfg, memory_weight=weight)
    out.eval()
    return out


def train_experts(
    model: GPO, splits: dict[str, GroupSplit], groups: Sequence[str], steps: int, lr: float
) -> dict[str, GPO]:
    """One fine-tuned copy of `model` per training group, on that group's TRAIN questions."""
    settings = TrainingSettings(learning_rate=lr)
    return {
        g: fine_tuned_copy(model, splits[g].train, steps, settings, seed=1000 + i)
        for i, g in enumerate(groups)
    }


def held_out_fold_predictions(model: GPO, context: Sequence[EmbeddedItem]) -> Prediction:
    """Every context question predicted from the other folds of the context (never from itself)."""
    out: list[np.ndarray | None] = [None] * len(context)
    for fold in range(FOLDS):
        held = [j for j in range(len(context)) if j % FOLDS == fold]
        rest = [c for j, c in enumerate(context) if j % FOLDS != fold]
        if not held or not rest:
            continue
        for j, p in zip(
            held, predict_targets(model, rest, [context[j] for j in held]), strict=True
        ):
            out[j] = p
    return [p for p in out if p is not None]


def fit_mix_weights(
    per_expert: Sequence[Prediction], truths: Sequence[np.ndarray], steps: int = 200
) -> np.ndarray:
    """Convex weights over experts minimising the mean JS distance of the mix to the truths."""
    preds = [torch.tensor(np.stack([e[q] for e in per_expert])) for q in range(len(truths))]
    targets = [torch.tensor(t / t.sum()) for t in truths]
    logits = torch.zeros(len(per_expert), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        w = torch.softmax(logits, 0)
        loss = torch.zeros((), dtype=torch.float64)
        for p, t in zip(preds, targets, strict=True):
            q = w @ p
            m = 0.5 * (q + t)
            js = 0.5 * (t * ((t + 1e-12).log() - m.log())).sum()
            js = js + 0.5 * (q * ((q + 1e-12).log() - m.log())).sum()
            loss = loss + (js.clamp(min=0) + 1e-12).sqrt()
        opt.zero_grad()
        (loss / len(preds)).backward()
        opt.step()
    return torch.softmax(logits, 0).detach().numpy()


def score(preds: Prediction, split: GroupSplit) -> float:
    truths = [t.item.distribution for t in split.test]
    return float(np.mean([alignment_score(p, t) for p, t in zip(preds, truths, strict=True)]))


def evaluate_checkpoint(
    ckpt_dir: Path,
    splits: dict[str, GroupSplit],
    training: list[str],
    held_out: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    base = load_checkpoint(ckpt_dir).model
    started = time.time()
    experts = train_experts(base, splits, training, args.steps, args.learning_rate)
    fine_tune_s = time.time() - started
    result: dict[str, Any] = {"checkpoint": str(ckpt_dir), "fine_tune_seconds": fine_tune_s}
    for weight in (0.0, args.memory_weight):
        model = with_memory(base, weight)
        mixed = {g: with_memory(e, weight) for g, e in experts.items()}
        scores: dict[str, dict[str, float]] = {"global": {}, "own expert": {}, "expert mix": {}}
        weights: dict[str, dict[str, float]] = {}
        for g in training + held_out:
            split = splits[g]
            context = evaluation_context(split.train, EVAL_MAX_CONTEXT)
            per_expert = {e: predict_targets(m, context, split.test) for e, m in mixed.items()}
            w = fit_mix_weights(
                [held_out_fold_predictions(m, context) for m in mixed.values()],
                [c.item.distribution for c in context],
            )
            weights[g] = {e: float(x) for e, x in zip(mixed, w, strict=True)}
            mix = [w @ np.stack([per_expert[e][q] for e in mixed]) for q in range(len(split.test))]
            scores["global"][g] = score(predict_targets(model, context, split.test), split)
            scores["expert mix"][g] = score(mix, split)
            if g in experts:
                scores["own expert"][g] = score(per_expert[g], split)
        result[f"memory {weight}"] = {
            "per_group": scores,
            "mix_weights": weights,
            "training groups": {
                k: dataclasses.asdict(summarize({g: v[g] for g in training}))
                for k, v in scores.items()
            },
            "held-out groups": {
                k: dataclasses.asdict(summarize({g: v[g] for g in held_out}))
                for k, v in scores.items()
                if k != "own expert"
            },
        }
        print(
            f"{ckpt_dir} memory {weight}: "
            + json.dumps(result[f"memory {weight}"]["held-out groups"]["expert mix"]),
            flush=True,
        )
    return result


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(
    results: list[dict[str, Any]],
    args: argparse.Namespace,
    training: list[str],
    held_out: list[str],
) -> str:
    lines = [
        "# Personalized experts",
        "",
        f"{len(results)} checkpoint(s) (one per seed of the real federation); experts fine-tuned "
        f"{args.steps} local steps at lr {args.learning_rate}. Command: "
        "`.venv/bin/python bench/personalized_experts.py --checkpoint ...` (see its docstring).",
        "",
        "| memory | set | predictor | alignment | worst group | FI |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for weight in (0.0, args.memory_weight):
        key = f"memory {weight}"
        for set_name in ("training groups", "held-out groups"):
            for predictor in results[0][key][set_name]:
                rows = [r[key][set_name][predictor] for r in results]
                lines.append(
                    f"| {weight} | {set_name} | {predictor} | "
                    + " | ".join(
                        mean_std([row[m] for row in rows])
                        for m in ("alignment", "worst", "fairness")
                    )
                    + " |"
                )
    lines += ["", "Held-out groups, per group (memory off, mean over checkpoints):", ""]
    lines += ["| group | global | expert mix | largest mix weights |", "| --- | --- | --- | --- |"]
    key = "memory 0.0"
    for g in held_out:
        glob = statistics.mean(r[key]["per_group"]["global"][g] for r in results)
        mix = statistics.mean(r[key]["per_group"]["expert mix"][g] for r in results)
        avg_w = {e: statistics.mean(r[key]["mix_weights"][g][e] for r in results) for e in training}
        top = sorted(avg_w.items(), key=lambda kv: -kv[1])[:3]
        lines.append(
            f"| {g} | {glob:.4f} | {mix:.4f} | " + ", ".join(f"{e} {w:.2f}" for e, w in top) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="a federated run's final checkpoint (repeat per seed)",
    )
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="GlobalOpinionQA CSV (default: %(default)s)"
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=100,
        help="local fine-tuning steps per expert (default: %(default)s)",
    )
    ap.add_argument(
        "--learning-rate", type=float, default=LEARNING_RATE, help="(default: %(default)s)"
    )
    ap.add_argument(
        "--memory-weight",
        type=float,
        default=0.9,
        help="context memory weight for the second pass (default: %(default)s)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "personalized_experts")
    add_encoder_args(ap)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 < args.memory_weight <= 1.0:
        ap.error(f"--memory-weight must be in (0, 1], got {args.memory_weight}")
    for ckpt in args.checkpoint:
        if not ckpt.is_dir():
            ap.error(f"--checkpoint {ckpt}: no such folder")
    torch.set_num_threads(args.threads)
    data = load_survey(args.data)
    training, held_out = default_groups(data)
    if not held_out:
        ap.error(f"{args.data}: the PROTOCOL.md groups are not all in the data")
    splits = embed_groups(data, training + held_out, open_encoder(args))
    torch.manual_seed(0)
    results = [evaluate_checkpoint(c, splits, training, held_out, args) for c in args.checkpoint]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "memory_weight": args.memory_weight,
    }
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "runs": results}, indent=2) + "\n"
    )
    text = markdown(results, args, training, held_out)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
