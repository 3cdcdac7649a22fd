#!/usr/bin/env python3
"""Averaging the weights over the last steps: does it steady the end of a long run?

    .venv/bin/python bench/weight_averaging.py --seeds 0 1 2   # ~5 min a seed on 2 cores
    # writes bench/results/weight_averaging.{json,md}

Late in the 600-round run of server Adam on the nodes' plain gradient steps, held-out alignment
swings by about 0.01 between evaluations, and the last one counts. This trains the same steps
centrally (server Adam on the averaged gradients is Adam on the batch of all 8 training groups:
`pluralfed train --groups-per-step 8 --epochs 600`, the paper's single network) and evaluates,
at the end and every 100 steps, the final weights beside exponential moving averages of the
weights (decays 0.98, 0.99, 0.995 per step, started at the initial weights) and the plain average
of the last third of the steps. PROTOCOL.md evaluation (training groups' test questions and the
held-out groups), each seed's figures and the mean over seeds.

Every variant is a different set of weights of the same run, so the comparison is paired: the
same episodes, the same evaluation contexts.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pluralfed.cli import build_parser  # noqa: E402
from pluralfed.commands.common import apply_threads, evaluate_sets, open_encoder  # noqa: E402
from pluralfed.commands.train import HELD_OUT_SET, TRAIN_SET, model_config  # noqa: E402
from pluralfed.data import load_survey  # noqa: E402
from pluralfed.model import GPO  # noqa: E402
from pluralfed.prepare import default_groups, embed_groups  # noqa: E402
from pluralfed.protocol import EVAL_MAX_CONTEXT  # noqa: E402
from pluralfed.training import (  # noqa: E402
    LocalTrainer,
    TrainingSettings,
    build_model,
    seed_everything,
    train_centralized,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "globalopinionqa" / "global_opinions.csv"
DECAYS = (0.98, 0.99, 0.995)
FINAL = "final weights"
TAIL = "plain average, last third"
State = dict[str, torch.Tensor]


def ema_name(decay: float) -> str:
    return f"EMA {decay}"


def variants() -> list[str]:
    return [FINAL, *(ema_name(d) for d in DECAYS), TAIL]


def evaluate(model: GPO, weights: State, sets: Any, max_context: int, seed: int) -> dict:
    scored = copy.deepcopy(model)
    scored.load_state_dict(weights)
    scored.eval()
    return {k: v.model.to_dict() for k, v in evaluate_sets(scored, sets, max_context, seed).items()}


def run_seed(data_path: Path, seed: int, steps: int, threads: int) -> dict[str, Any]:
    options = ["--data", str(data_path), "--out", "unused", "--members", "1"]
    options += ["--seed", str(seed), "--threads", str(threads)]
    args = build_parser("train").parse_args(["train", *options])
    apply_threads(threads)
    seed_everything(seed)
    data = load_survey(data_path)
    train_groups, held_out = default_groups(data)
    encoder = open_encoder(args)
    splits = embed_groups(data, [*train_groups, *held_out], encoder)
    sets = {
        TRAIN_SET: {g: splits[g] for g in train_groups if splits[g].test},
        HELD_OUT_SET: {g: splits[g] for g in held_out if splits[g].test},
    }
    model = build_model(model_config(args, encoder.dim), seed)
    trainer = LocalTrainer(model, TrainingSettings(groups_per_step=8), seed=seed)
    emas = {d: {k: v.detach().clone() for k, v in model.state_dict().items()} for d in DECAYS}
    tail: dict[str, torch.Tensor] = {}
    tail_from, tail_n = steps - steps // 3, 0
    curve: list[dict[str, Any]] = []

    def on_step(step: int, _loss: float) -> None:
        nonlocal tail_n
        current = model.state_dict()
        for decay, ema in emas.items():
            for name, value in current.items():
                if value.dtype.is_floating_point:
                    ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
                else:
                    ema[name].copy_(value)
        if step > tail_from:
            tail_n += 1
            for name, value in current.items():
                v = value.detach().double() if value.dtype.is_floating_point else value.detach()
                if name not in tail or not value.dtype.is_floating_point:
                    tail[name] = v.clone()
                else:
                    tail[name] += (v - tail[name]) / tail_n
        if step % 100 == 0 or step == steps:
            row: dict[str, Any] = {
                "step": step,
                FINAL: evaluate(model, current, sets, EVAL_MAX_CONTEXT, seed),
            }
            for decay, ema in emas.items():
                row[ema_name(decay)] = evaluate(model, ema, sets, EVAL_MAX_CONTEXT, seed)
            if tail_n:
                as_model = {k: v.to(current[k].dtype) for k, v in tail.items()}
                row[TAIL] = evaluate(model, as_model, sets, EVAL_MAX_CONTEXT, seed)
            curve.append(row)
            held = row[FINAL][HELD_OUT_SET]["alignment"]
            print(f"seed {seed} step {step}: held-out {held:.4f} (final weights)", flush=True)

    started = time.time()
    train_centralized(trainer, {g: splits[g].train for g in train_groups}, steps, on_step)
    return {"seed": seed, "steps": steps, "seconds": time.time() - started, "curve": curve}


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> set -> mean (and std) of alignment, worst group and FI at the last step."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants():
        out[variant] = {}
        for name in (HELD_OUT_SET, TRAIN_SET):
            last = [r["curve"][-1][variant][name] for r in runs if variant in r["curve"][-1]]
            if not last:
                continue
            alignment = [x["alignment"] for x in last]
            out[variant][name] = {
                "alignment": statistics.mean(alignment),
                "alignment_std": statistics.stdev(alignment) if len(alignment) > 1 else 0.0,
                "worst": statistics.mean(x["worst"] for x in last),
                "fairness": statistics.mean(x["fairness"] for x in last),
            }
    return out


def markdown(runs: list[dict[str, Any]], table: dict[str, Any]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [
        "# Averaging the weights over the last steps (bench/weight_averaging.py)",
        "",
        f"Centralized Adam on batches of all 8 training groups, {runs[0]['steps']} steps (server "
        f"Adam on the nodes' plain gradient steps, trained in one place), the paper's single "
        f"network; seeds {seeds}; mean over seeds at the last step (± std of alignment).",
    ]
    for name in (HELD_OUT_SET, TRAIN_SET):
        lines += ["", f"## {name}", "", "| weights | alignment | worst group | FI |"]
        lines.append("| --- | --- | --- | --- |")
        for variant, sets in table.items():
            if name in sets:
                f = sets[name]
                lines.append(
                    f"| {variant} | {f['alignment']:.4f} ± {f['alignment_std']:.4f} | "
                    f"{f['worst']:.4f} | {f['fairness']:.4f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="global_opinions.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps must be at least 3")
    runs = [run_seed(args.data, s, args.steps, args.threads) for s in args.seeds]
    table = summary(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_averaging.json").write_text(
        json.dumps({"runs": runs, "summary": table}, indent=1) + "\n", encoding="utf-8"
    )
    text = markdown(runs, table)
    (args.out / "weight_averaging.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
