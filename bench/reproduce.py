"""Reproduction report: the PROTOCOL.md experiment, federated vs centralized, over several seeds.

    .venv/bin/python bench/reproduce.py --data ../shared/data/globalopinionqa/global_opinions.csv \
        --seeds 0 1 2 --out bench/results/reproduce

For each seed it runs
  - federated: a real local federation (coordinator + 8 training nodes + 6 evaluate-only nodes,
    separate processes, mutual TLS), 100 rounds x 6 local steps, evaluation every 10 rounds;
  - centralized (paper): the paper's code, 100 epochs of one step on a batch of all 8 groups
    (100 optimizer steps; PROTOCOL's "100 epochs of one step per group batch");
  - centralized, 800 steps: 100 epochs of one step per group, a group at a time (800 steps);
  - centralized (equal steps, optional --equal-steps): as many optimizer steps as the federation
    took in total (100 x 6 x 8 = 4,800), evaluated at the same fractions of training;
  - centralized (optional --equal-batched-steps): as many steps as the federation's model took in
    sequence, 100 rounds x 6, each on a batch of all 8 groups (600 steps).
Then it evaluates every final checkpoint again with the context memory on (--memory-weight,
pluralfed/model.py; inference only, the same trained weights), as "<run> + context memory".
Runs already in runs.json are kept unless run again (so variants can be added one by one),
and writes report.json, report.md and plots (alignment vs round, fairness vs round, per-group
heatmap). Rounds of centralized training are its epochs scaled to the same share of the run.
The report ends with reference rows on the same questions, none federated: the pooled
question kNN and the oracles of bench/reach.py (computed afresh from the data, ~30 s).
Every figure is measured here; nothing is copied from the paper except the claims it tests.

The runs use the paper's single network (members=1) unless --set members=N: the product's
default ensemble is a variant here, added with
    --label "ensemble of 3 (members=3)" --set members=3
(its centralized runs train the same ensemble and get rows of their own).

With --personalize-steps N the training nodes fine-tune the final model on their own data after
the run (group nodes' `personalize_steps`, kept on the node); each group's own personalized
checkpoint is then scored on its own test questions, with and without the context memory, as
"<run>, each training group's own model" rows of the training groups' table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pluralfed.checkpoint import META_FILE  # noqa: E402
from pluralfed.commands.common import open_encoder  # noqa: E402
from pluralfed.metrics import summarize as summarize_alignment  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from knn_baseline import protocol_splits  # noqa: E402
from reach import ROWS as REFERENCE_ROWS  # noqa: E402
from reach import reach, summary_table  # noqa: E402

SETS = ("training groups (test questions)", "held-out groups")
SHORT = {SETS[0]: "training", SETS[1]: "held-out"}
CLAIMS = {
    "convergence": "federated training converges faster (paper: 46% fewer rounds to 95%)",
    "alignment": "federated training aligns better (paper: +4%)",
    "fairness": "fairness stays about the same (paper: similar FI)",
}


def run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def federated(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    started = time.time()
    cmd = [sys.executable, "-m", "pluralfed.cli", "federate", "--data", str(args.data)]
    cmd += ["--out", str(out), "--rounds", str(args.rounds), "--eval-every", "10"]
    cmd += ["--seed", str(seed), "--local-steps", str(args.local_steps)]
    if args.personalize_steps:
        cmd += ["--personalize-steps", str(args.personalize_steps)]
    for kv in with_paper_model(args.set):
        cmd += ["--set", kv]
    run(cmd, out.parent / f"{out.name}.log")
    results = json.loads((out / "coordinator" / "results.json").read_text())
    curve = [
        {"round": e["round"], **{s: e["reports"][s] for s in SETS if s in e["reports"]}}
        for e in results["evaluations"]
    ]
    rounds = [json.loads(line) for line in (out / "coordinator" / "metrics.jsonl").open()]
    train_rounds = [r for r in rounds if r.get("kind") == "round"]
    return {
        "curve": curve,
        "wall_seconds": time.time() - started,
        "bytes_per_round": statistics.median(
            r["bytes_in"] + r["bytes_out_model"] for r in train_rounds
        ),
        "final": curve[-1],
        "checkpoint": str(out / "coordinator" / "final"),
        **({"personalized": str(out / "personalized")} if args.personalize_steps else {}),
    }


# coordinator settings that are the model's or its training's, and the `pluralfed train` option
# of each: a variant's centralized runs train the same model the same way as its federated ones
MODEL_OPTIONS = {
    "members": "--members",
    "embedding_noise": "--embedding-noise",
    "dropout": "--dropout",
    "d_model": "--d-model",
    "mlp_layers": "--mlp-layers",
    "n_layers": "--layers",
    "n_heads": "--heads",
    "d_ff": "--d-ff",
}


def with_paper_model(settings: list[str]) -> list[str]:
    """--set settings, with the paper's single network unless they choose `members` (the
    product's default is an ensemble; this report reproduces the paper first)."""
    if any(kv.partition("=")[0].strip() == "members" for kv in settings):
        return settings
    return ["members=1", *settings]


def model_options(settings: list[str]) -> list[str]:
    """The `pluralfed train` options for the model settings among --set KEY=VALUE."""
    out = []
    for kv in settings:
        key, _, value = kv.partition("=")
        if key.strip() in MODEL_OPTIONS:
            out += [MODEL_OPTIONS[key.strip()], value.strip()]
    return out


# The centralized baselines: the paper's code takes one optimizer step per epoch on a batch of all
# 8 training groups (100 steps in all); one step per group, a group at a time, takes 800 steps.
PAPER_CENTRAL = "centralized (paper: 100 steps, all 8 groups per step)"
PER_GROUP_CENTRAL = "centralized (800 steps, one group per step)"
EQUAL_CENTRAL = "centralized (equal steps)"
EQUAL_BATCHED_CENTRAL = "centralized (600 steps, all 8 groups per step)"
# labels of earlier reports, read from runs.json under their current names
RENAMED = {"centralized (paper, 100 epochs)": PER_GROUP_CENTRAL}
STRONGER = " (800-step baseline)"  # claims judged against PER_GROUP_CENTRAL
CENTRAL_KINDS = {"paper": 8, "per-group": 1}  # --centralized -> groups per optimizer step


def current_label(label: str) -> str:
    for old, new in RENAMED.items():
        if label.startswith(old):
            return new + label[len(old) :]
    return label


def centralized(
    args: argparse.Namespace, seed: int, out: Path, epochs: int, groups_per_step: int = 1
) -> dict[str, Any]:
    started = time.time()
    every = max(1, epochs // (args.rounds // 10))
    cmd = [sys.executable, "-m", "pluralfed.cli", "train", "--data", str(args.data)]
    cmd += ["--out", str(out), "--epochs", str(epochs), "--eval-every", str(every)]
    # --force: a variant run again replaces its earlier seed's checkpoint (train refuses otherwise)
    cmd += ["--groups-per-step", str(groups_per_step), "--force"]
    cmd += [
        "--seed",
        str(seed),
        "--threads",
        str(args.threads),
        *model_options(with_paper_model(args.set)),
    ]
    run(cmd, out.parent / f"{out.name}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").open()]
    scale = args.rounds / epochs  # epoch -> the equivalent share of the federated run's rounds
    curve = [
        {
            "round": round(h["epoch"] * scale),
            **{
                s: {
                    "model": {k: v for k, v in h[s].items() if k != "context_gain"},
                    "context_gain": h[s]["context_gain"],
                }
                for s in SETS
                if s in h
            },
        }
        for h in history
    ]
    final = {"round": args.rounds, **metrics["reports"]}
    return {
        "curve": curve,
        "wall_seconds": time.time() - started,
        "peak_rss_mib": metrics["peak_rss_mib"],
        "final": final,
        "checkpoint": str(out),
    }


MEMORY = " + context memory"


def checkpoint_dir(run_: dict[str, Any]) -> Path:
    ckpt = Path(run_["checkpoint"])
    return ckpt if ckpt.is_absolute() else REPO / ckpt


def with_memory(args: argparse.Namespace, run_: dict[str, Any]) -> dict[str, Any]:
    """The final checkpoint of a run evaluated again with the context memory on (cached).

    No wall time: it is an evaluation, not a training run (and a cached one takes none)."""
    ckpt = checkpoint_dir(run_)
    target = ckpt / f"memory-eval-w{args.memory_weight}.json"
    if not target.exists():
        cmd = [sys.executable, "-m", "pluralfed.cli", "evaluate", "--checkpoint", str(ckpt)]
        cmd += ["--data", str(args.data), "--memory-weight", str(args.memory_weight)]
        cmd += ["--threads", str(args.threads), "--out", str(target)]
        run(cmd, ckpt / f"memory-eval-w{args.memory_weight}.log")
    reports = json.loads(target.read_text())["reports"]
    final = {"round": run_["final"]["round"], **{s: reports[s] for s in SETS if s in reports}}
    return {"curve": [], "final": final}


OWN_MODEL = ", each training group's own model"


def personalized_dir(run_: dict[str, Any]) -> Path:
    folder = Path(run_["personalized"])
    return folder if folder.is_absolute() else REPO / folder


def own_models(args: argparse.Namespace, run_: dict[str, Any], memory: float) -> dict[str, Any]:
    """The training groups' test questions, each group scored with its own node's personalized
    checkpoint (`pluralfed evaluate --groups G`, cached beside the checkpoint).

    No wall time, as for the memory rows: an evaluation, and a cached one takes none."""
    folder = personalized_dir(run_)
    per_group: dict[str, float] = {}
    gains: list[float] = []
    for ckpt in sorted(p for p in folder.iterdir() if p.is_dir()):
        group = json.loads((ckpt / META_FILE).read_text())["metadata"]["group"]
        target = ckpt / f"own-eval-w{memory}.json"
        if not target.exists():
            cmd = [sys.executable, "-m", "pluralfed.cli", "evaluate", "--checkpoint", str(ckpt)]
            cmd += ["--data", str(args.data), "--groups", group, "--memory-weight", str(memory)]
            cmd += ["--threads", str(args.threads), "--out", str(target)]
            run(cmd, ckpt / f"own-eval-w{memory}.log")
        [report] = json.loads(target.read_text())["reports"].values()
        per_group[group] = report["model"]["alignment"]
        gains.append(report["context_gain"])
    model = asdict(summarize_alignment(per_group))
    final = {
        "round": run_["final"]["round"],
        SETS[0]: {
            "model": model,
            "context_gain": statistics.mean(gains),
            "per_group": dict(sorted(per_group.items())),
        },
    }
    return {"curve": [], "final": final}


def rounds_to(curve: list[dict[str, Any]], s: str, fraction: float) -> int | None:
    points = [(c["round"], c[s]["model"]["alignment"]) for c in curve if s in c]
    if not points:
        return None
    best = max(v for _, v in points)
    return next(r for r, v in points if v >= fraction * best)


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for mode, seeds in runs.items():
        row: dict[str, Any] = {}
        for s in SETS:
            finals = [r["final"][s] for r in seeds if s in r["final"]]
            if not finals:
                continue
            row[s] = {
                "alignment": [f["model"]["alignment"] for f in finals],
                "worst": [f["model"]["worst"] for f in finals],
                "fairness": [f["model"]["fairness"] for f in finals],
                "context_gain": [f["context_gain"] for f in finals],
                "rounds_to_95": [rounds_to(r["curve"], s, 0.95) for r in seeds],
                "rounds_to_99": [rounds_to(r["curve"], s, 0.99) for r in seeds],
            }
            if "uniform_baseline" in finals[0]:
                row[s]["uniform"] = [f["uniform_baseline"]["alignment"] for f in finals]
                row[s]["prior"] = [f["prior_baseline"]["alignment"] for f in finals]
        if all("wall_seconds" in r for r in seeds):  # training runs (evaluations have none)
            row["wall_seconds"] = [r["wall_seconds"] for r in seeds]
        table[mode] = row
    return table


def verdicts(table: dict[str, Any]) -> dict[str, str]:
    """The paper's three claims, judged on held-out groups against its own centralized baseline
    (100 steps), and against the stronger 800-step one where it was run."""
    fed = table.get("federated")
    if not fed:
        return {}
    out = {}
    for baseline, suffix in ((PAPER_CENTRAL, ""), (PER_GROUP_CENTRAL, STRONGER)):
        cen = table.get(baseline)
        if cen:
            for key, text in claim_verdicts(fed, cen).items():
                out[key + suffix] = text
    return out


def claim_verdicts(fed: dict[str, Any], cen: dict[str, Any]) -> dict[str, str]:
    s = SETS[1]
    out = {}
    f95 = statistics.mean(v for v in fed[s]["rounds_to_95"] if v is not None)
    c95 = statistics.mean(v for v in cen[s]["rounds_to_95"] if v is not None)
    out["convergence"] = (
        f"{'holds' if f95 < c95 else 'does not hold'} here: held-out rounds to 95% of best "
        f"{f95:.0f} federated vs {c95:.0f} centralized ({(c95 - f95) / c95 * 100:+.0f}% fewer)"
    )
    fa, ca = statistics.mean(fed[s]["alignment"]), statistics.mean(cen[s]["alignment"])
    out["alignment"] = (
        f"{'holds' if fa > ca else 'does not hold'} here: held-out alignment {fa:.4f} federated "
        f"vs {ca:.4f} centralized ({(fa - ca) / ca * 100:+.1f}%)"
    )
    ff, cf = statistics.mean(fed[s]["fairness"]), statistics.mean(cen[s]["fairness"])
    out["fairness"] = (
        f"{'holds' if abs(ff - cf) <= 0.02 else 'does not hold'} here: held-out FI {ff:.4f} "
        f"federated vs {cf:.4f} centralized"
    )
    return out


def _curve(seeds: list[dict[str, Any]], s: str, metric: str) -> tuple[list[int], Any, Any]:
    """Rounds, mean and std over seeds of one metric (rounds every seed has)."""
    per_seed = [{c["round"]: c[s]["model"][metric] for c in r["curve"] if s in c} for r in seeds]
    rounds = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    values = np.array([[p[x] for x in rounds] for p in per_seed], dtype=float)
    if not rounds:
        return [], values, values
    return rounds, values.mean(0), values.std(0)


def plots(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """Curves (mean over seeds, ± std shaded; centralized dashed) and a per-group heatmap.

    One distinct colour per run kind and the legend beside the axes, so that a dozen variants
    stay readable; the per-group results are a table of numbers in colour, not dozens of bars.
    """
    made = []
    cmap = plt.get_cmap("tab20")  # a qualitative map: cmap(i) is its i-th colour
    palette = [cmap(i) for i in range(cmap.N)]
    curved = {k: v for k, v in runs.items() if any(r["curve"] for r in v)}
    for metric, label in (("alignment", "alignment"), ("fairness", "fairness index")):
        fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True)
        for ax, s in zip(axes, SETS, strict=True):
            for m, (mode, seeds) in enumerate(curved.items()):
                xs, mean, std = _curve(seeds, s, metric)
                if not xs:
                    continue
                colour = palette[m % len(palette)]
                style = "--" if mode.startswith("centralized") else "-"
                ax.plot(xs, mean, style, color=colour, marker="o", ms=3, label=mode)
                if len(seeds) > 1:
                    ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.12)
            ax.set_title(f"{SHORT[s]} groups (mean over seeds, ± std shaded)")
            ax.set_xlabel("round (centralized, dashed: equivalent share of training)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(label)
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        name = f"{metric}_vs_round.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)

    groups: dict[str, list[str]] = {s: [] for s in SETS}
    for s in SETS:
        for rows in runs.values():
            for g in rows[0]["final"].get(s, {}).get("per_group", {}):
                if g not in groups[s]:
                    groups[s].append(g)
    columns = [(s, g) for s in SETS for g in groups[s]]
    # rows with per-group figures (every row a report makes now; older stored rows may lack them)
    kinds = [k for k in runs if any(runs[k][0]["final"].get(s, {}).get("per_group") for s in SETS)]
    table = np.full((len(kinds), len(columns)), np.nan)
    for i, kind in enumerate(kinds):
        for j, (s, g) in enumerate(columns):
            per = [
                r["final"][s]["per_group"][g]
                for r in runs[kind]
                if g in r["final"].get(s, {}).get("per_group", {})
            ]
            if per:
                table[i, j] = statistics.mean(per)
    fig, ax = plt.subplots(figsize=(4 + 0.75 * len(columns), 1.5 + 0.32 * len(kinds)))
    image = ax.imshow(table, cmap="viridis", aspect="auto")
    for i in range(len(kinds)):
        for j in range(len(columns)):
            if np.isfinite(table[i, j]):
                light = table[i, j] < np.nanmean(table)
                ax.text(
                    j,
                    i,
                    f"{table[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if light else "black",
                )
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(
        [g.replace(" (Current national sample)", "") for _, g in columns],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(kinds, fontsize=7)
    if groups[SETS[0]] and groups[SETS[1]]:  # a line between training and held-out groups
        ax.axvline(len(groups[SETS[0]]) - 0.5, color="white", lw=2)
    ax.set_title(
        "alignment at the end, per group (mean over seeds): training groups' test questions "
        "| held-out groups",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(out / "per_group.png", dpi=120)
    plt.close(fig)
    made.append("per_group.png")
    return made


def rounds_text(values: list[int]) -> str:
    """Rounds are evaluated every 10: the seeds' values themselves say more than a mean."""
    return " / ".join(str(v) for v in values) if values else "n/a"


def references(data_path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Reference rows on the same questions, none of them federated: the pooled question kNN and
    the oracles of `bench/reach.py` (what transfer from the training groups could reach if their
    answers to the test questions were known). Empty if the data lacks PROTOCOL.md's groups."""
    encoder_args = argparse.Namespace(encoder="all-MiniLM-L6-v2", cache_dir=None, no_cache=False)
    training, held_out, splits = protocol_splits(data_path, open_encoder(encoder_args))
    if not held_out:
        return {}
    summaries, _ = reach(splits, training, held_out)
    names = {"held_out": SETS[1], "training": SETS[0]}
    return {
        names[n]: {REFERENCE_ROWS[r]: asdict(summary) for r, summary in rows.items()}
        for n, rows in summaries.items()
    }


def markdown(
    table: dict[str, Any],
    claims: dict[str, str],
    n_seeds: int,
    reference_rows: dict[str, dict[str, dict[str, Any]]],
    made: tuple[str, ...] | list[str] = (),
) -> str:
    lines = [
        "# Reproduction report (PROTOCOL.md; mean ± std over the seeds in column n)",
        "",
        "Rows ending in '+ context memory' are the same final checkpoints evaluated with the",
        "context memory on (pluralfed/model.py; no training, so no rounds). Rows with 'each",
        "training group's own model' score every training group with its own node's",
        "personalized checkpoint (--personalize-steps; kept on the node, never sent).",
        "",
        *[f"![{name}]({name})" for name in made],
        "",
    ]
    for s in SETS:
        lines += [
            f"## {s}",
            "",
            "| run | n | alignment | worst group | FI | context gain | rounds to 95% | rounds to 99% | uniform | group prior |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, row in table.items():
            if s not in row:
                continue
            r = row[s]
            r95 = [v for v in r["rounds_to_95"] if v is not None]
            r99 = [v for v in r["rounds_to_99"] if v is not None]
            lines.append(
                f"| {mode} | {len(r['alignment'])} | {mean_std(r['alignment'])} | "
                f"{mean_std(r['worst'])} | {mean_std(r['fairness'])} | "
                f"{mean_std(r['context_gain'])} | {rounds_text(r95)} | {rounds_text(r99)} | "
                f"{mean_std(r.get('uniform', []))} | {mean_std(r.get('prior', []))} |"
            )
        lines.append("")
    if reference_rows:
        lines += [
            "## References on the same questions (not federated; bench/knn_baseline.py, bench/reach.py)",
            "",
            "Oracles look up the training groups' TRUE answers to the predicted group's own test",
            "questions; for a training group, the other 7 training groups stand in.",
            "",
        ]
        for s, rows in reference_rows.items():
            lines += [f"### {s}", "", *summary_table(rows, "reference"), ""]
    lines += ["## Wall time (s)", ""]
    for mode, row in table.items():
        # training runs only: memory and own-model rows are evaluations
        if "wall_seconds" in row and not mode.endswith(MEMORY) and OWN_MODEL not in mode:
            lines.append(f"- {mode}: {mean_std(row['wall_seconds'])}")
    lines += ["", "## The paper's claims, here", ""]
    lines += [f"Against the paper's own baseline, {PAPER_CENTRAL}:", ""]
    for key, text in CLAIMS.items():
        lines.append(f"- {text}: {claims.get(key, 'not measured')}")
    if any(k.endswith(STRONGER) for k in claims):
        lines += ["", f"Against the stronger {PER_GROUP_CENTRAL}:", ""]
        for key, text in CLAIMS.items():
            lines.append(f"- {text}: {claims.get(key + STRONGER, 'not measured')}")
    return "\n".join(lines) + "\n"


def fed_dir_prefix(label: str) -> str:
    """Run folder prefix of a federated variant: fed for the default, fed-<label> otherwise."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    return "fed" if label == "federated" else f"fed-{slug}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="global_opinions.csv")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reproduce")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads for centralized runs")
    p.add_argument(
        "--equal-steps",
        action="store_true",
        help="also centralized with the federation's optimizer steps",
    )
    p.add_argument(
        "--equal-batched-steps",
        action="store_true",
        help="also centralized with rounds x local steps steps, each on all 8 groups",
    )
    p.add_argument("--skip-federated", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="coordinator setting for the federated runs, KEY=VALUE",
    )
    p.add_argument(
        "--label", default="federated", help="name of the federated variant in the report"
    )
    p.add_argument("--skip-centralized", action="store_true")
    p.add_argument(
        "--centralized",
        nargs="+",
        choices=sorted(CENTRAL_KINDS),
        default=sorted(CENTRAL_KINDS),
        help="which centralized baselines to run: paper (100 steps of all 8 groups, the paper's "
        "code) and/or per-group (800 steps, one group each)",
    )
    p.add_argument(
        "--memory-weight",
        type=float,
        default=0.9,
        help="context-memory weight for the '+ context memory' rows; 0: no such rows",
    )
    p.add_argument(
        "--personalize-steps",
        type=int,
        default=0,
        help="training nodes personalize the final model this many steps; adds own-model rows",
    )
    p.add_argument("--fresh", action="store_true", help="forget the runs already in runs.json")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from runs.json")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "runs.json"
    runs: dict[str, list[dict[str, Any]]] = {}
    stored_memory: dict[str, list[dict[str, Any]]] = {}
    if saved.exists() and not args.fresh:
        for stored, seeds in json.loads(saved.read_text()).items():
            label = current_label(stored)
            (stored_memory if label.endswith(MEMORY) else runs)[label] = seeds
    if args.report_only:
        args.seeds = list(range(max(len(v) for v in runs.values())))
    rerun: set[str] = set()
    if not args.report_only and not args.skip_federated and runs.get(args.label):
        print(
            f"note: {saved} holds {len(runs[args.label])} seed(s) of {args.label!r}; this run "
            "replaces them when its first seed ends (another --label or --out keeps them)",
            flush=True,
        )

    def record(label: str, result: dict[str, Any]) -> None:
        if label not in rerun:  # a variant run again replaces its earlier seeds
            if runs.get(label):
                print(
                    f"replacing the {len(runs[label])} earlier seed(s) of {label!r} in {saved} "
                    "(another --label or --out keeps them)",
                    flush=True,
                )
            runs[label] = []
            rerun.add(label)
        runs[label].append(result)

    # a variant's centralized runs are rows (and folders) of their own
    variant = "" if args.label == "federated" else f", {args.label}"
    central_prefix = "central" + fed_dir_prefix(args.label)[3:]
    for seed in [] if args.report_only else args.seeds:
        if not args.skip_federated:
            record(
                args.label,
                federated(args, seed, args.out / f"{fed_dir_prefix(args.label)}-s{seed}"),
            )
        if not args.skip_centralized and "paper" in args.centralized:
            record(
                f"{PAPER_CENTRAL}{variant}",
                centralized(
                    args,
                    seed,
                    args.out / f"{central_prefix}-paper-s{seed}",
                    epochs=100,
                    groups_per_step=CENTRAL_KINDS["paper"],
                ),
            )
        if not args.skip_centralized and "per-group" in args.centralized:
            record(
                f"{PER_GROUP_CENTRAL}{variant}",
                centralized(args, seed, args.out / f"{central_prefix}-s{seed}", epochs=100),
            )
        if args.equal_steps:
            epochs = args.rounds * args.local_steps  # 8 groups x epochs steps = rounds x steps x 8
            record(
                f"{EQUAL_CENTRAL}{variant}",
                centralized(args, seed, args.out / f"{central_prefix}-eq-s{seed}", epochs=epochs),
            )
        if args.equal_batched_steps:
            record(
                f"{EQUAL_BATCHED_CENTRAL}{variant}",
                centralized(
                    args,
                    seed,
                    args.out / f"{central_prefix}-eqb-s{seed}",
                    epochs=args.rounds * args.local_steps,
                    groups_per_step=CENTRAL_KINDS["paper"],
                ),
            )
        saved.write_text(json.dumps(runs, indent=1))
    if args.memory_weight > 0:
        for label in list(runs):
            with_ckpt = [r for r in runs[label] if "checkpoint" in r]
            on_disk = all(checkpoint_dir(r).is_dir() for r in with_ckpt)
            if with_ckpt and (on_disk or label in rerun):
                runs[label + MEMORY] = [with_memory(args, r) for r in with_ckpt]
            elif label + MEMORY in stored_memory:  # run folders gone (a fresh clone): keep figures
                runs[label + MEMORY] = stored_memory[label + MEMORY]
        saved.write_text(json.dumps(runs, indent=1))
    for label in [k for k in runs if not k.endswith(MEMORY) and OWN_MODEL not in k]:
        # rows of runs not made now stay as stored (loaded above, with the memory rows)
        personalized = [r for r in runs[label] if "personalized" in r]
        on_disk = all(personalized_dir(r).is_dir() for r in personalized)
        if personalized and (on_disk or label in rerun):
            runs[label + OWN_MODEL] = [own_models(args, r, 0.0) for r in personalized]
            if args.memory_weight > 0:
                runs[label + OWN_MODEL + MEMORY] = [
                    own_models(args, r, args.memory_weight) for r in personalized
                ]
    saved.write_text(json.dumps(runs, indent=1))
    table = summarize(runs)
    claims = verdicts(table)
    made = plots(runs, args.out)
    reference_rows = references(args.data)
    report = {
        "seeds": args.seeds,
        "table": table,
        "claims": claims,
        "plots": made,
        "references": reference_rows,
    }
    # figures for the README and issue notes: rounds as integers
    for row in table.values():
        for s in SETS:
            for key in ("rounds_to_95", "rounds_to_99"):
                if s in row:
                    row[s][key] = [int(v) if v is not None else None for v in row[s][key]]
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown(table, claims, len(args.seeds), reference_rows, made)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
