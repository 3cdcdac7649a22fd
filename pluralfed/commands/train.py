"""`pluralfed train`: centralized training (the paper's baseline) with PROTOCOL.md evaluation."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pluralfed.checkpoint import META_FILE, WEIGHTS_FILE, save_checkpoint
from pluralfed.commands.common import (
    add_data_args,
    add_encoder_args,
    add_runtime_args,
    apply_threads,
    check_output_path,
    evaluate_sets,
    non_negative_int,
    open_encoder,
    parse_group_names,
    parse_range,
    peak_rss_mib,
    positive_int,
    refuse_groups_without_context,
    reports_to_json,
    write_json,
)
from pluralfed.data import load_survey
from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes
from pluralfed.model import DEFAULT_MEMBERS, GPOConfig
from pluralfed.prepare import default_groups, embed_groups
from pluralfed.protocol import CENTRALIZED_EPOCHS, EVAL_EVERY, EVAL_MAX_CONTEXT, LEARNING_RATE
from pluralfed.report import make_console, print_reports
from pluralfed.training import (
    LocalTrainer,
    TrainingSettings,
    build_model,
    seed_everything,
    train_centralized,
)

TRAIN_SET, HELD_OUT_SET = "training groups (test questions)", "held-out groups"

METRICS_FILE, HISTORY_FILE = "metrics.json", "history.jsonl"
# everything `train` writes into --out: a folder holding only these is an earlier run's output
TRAIN_OUTPUTS = frozenset({WEIGHTS_FILE, META_FILE, METRICS_FILE, HISTORY_FILE})
# coordinator/state.py's STATE_FILE: the folder is a federated run's state
COORDINATOR_STATE_FILE = "state.json"


def check_train_out(out: Path, *, force: bool) -> None:
    """Refuse, before any work, an --out whose contents this run would destroy: a coordinator's
    state folder lost its round history (history.jsonl) and could no longer resume, and a
    federated or earlier final model was replaced without a word. Only a new or empty folder,
    or (with --force) an earlier `train` run's own output, is written."""
    check_output_path(out, "--out", folder=True)
    if not out.is_dir():
        return
    try:
        names = {entry.name for entry in out.iterdir()}
    except OSError as err:
        raise InputError(f"--out {out}: cannot list the folder: {err}") from err
    if (out.parent / COORDINATOR_STATE_FILE).exists():
        raise InputError(
            f"--out {out}: is in a coordinator's state folder ({out.parent} holds "
            f"{COORDINATOR_STATE_FILE}): it holds the federated run's model, which the coordinator "
            "itself writes; choose another folder"
        )
    if COORDINATOR_STATE_FILE in names:
        raise InputError(
            f"--out {out}: is a coordinator's state folder (it holds {COORDINATOR_STATE_FILE}); "
            "training into it would replace the federated run's history.jsonl and it could no "
            "longer resume: choose another folder"
        )
    foreign = sorted(n for n in names - TRAIN_OUTPUTS if not n.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise InputError(
            f"--out {out}: the folder holds files that are not a `train` run's output ({shown}): "
            "choose a new or empty folder"
        )
    ours = sorted(names & TRAIN_OUTPUTS)
    if ours and not force:
        raise InputError(
            f"--out {out}: holds a checkpoint or metrics already ({', '.join(ours)}); pass "
            "--force to replace them, or choose a new or empty folder"
        )


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = GPOConfig()
    g = p.add_argument_group("model (defaults: the paper's reference settings, but --members)")
    g.add_argument("--d-model", type=int, default=d.d_model, help="width (default: %(default)s)")
    g.add_argument("--mlp-layers", type=int, default=d.mlp_layers, help="input MLP layers")
    # --n-layers / --n-heads: the coordinator's names for the same settings (n_layers, n_heads)
    g.add_argument("--layers", "--n-layers", type=int, default=d.n_layers, help="encoder layers")
    g.add_argument("--heads", "--n-heads", type=int, default=d.n_heads, help="attention heads")
    g.add_argument("--d-ff", type=int, default=d.d_ff, help="feed-forward width")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout")
    g.add_argument(
        "--members",
        type=int,
        default=DEFAULT_MEMBERS,
        help="independently initialised copies of the network whose predictions are averaged "
        "(a deep ensemble; default: %(default)s; 1 = the paper's single network)",
    )
    add_memory_args(g, d)


def add_memory_args(g: Any, d: GPOConfig | None) -> None:
    """Context-memory options (pluralfed/model.py); with d=None they default to the checkpoint's."""
    keep = "the checkpoint's"
    g.add_argument(
        "--memory-weight",
        type=float,
        default=None if d is None else d.memory_weight,
        help="mix of the group's own answers to same-option context questions into a "
        f"prediction, 0..1; 0 = the paper's model alone (default: {keep if d is None else '%(default)s'})",
    )
    g.add_argument(
        "--memory-shrinkage",
        type=float,
        default=None if d is None else d.memory_shrinkage,
        help="matching context questions at which the mix is half of --memory-weight",
    )
    g.add_argument(
        "--memory-temperature",
        type=float,
        default=None if d is None else d.memory_temperature,
        help="softmax temperature over the cosine similarity of context questions",
    )


def memory_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The context-memory options given on the command line, as GPOConfig fields."""
    names = ("memory_weight", "memory_shrinkage", "memory_temperature")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_config(args: argparse.Namespace, embed_dim: int) -> GPOConfig:
    try:
        return GPOConfig(
            embed_dim=embed_dim,
            d_model=args.d_model,
            mlp_layers=args.mlp_layers,
            n_layers=args.layers,
            n_heads=args.heads,
            d_ff=args.d_ff,
            dropout=args.dropout,
            members=args.members,
            **memory_overrides(args),
        )
    except ValueError as err:
        raise InputError(str(err)) from err


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="centralized training on pooled data (the baseline federated training is compared to)",
        description="Train the GPO predictor on the pooled TRAIN questions of the training groups "
        "(PROTOCOL.md: each epoch is one step per group, groups shuffled), evaluate few-shot every "
        "--eval-every epochs on the training groups' TEST questions and on held-out groups, and "
        "write a checkpoint (safetensors + JSON) and metrics.",
    )
    add_data_args(p)
    add_encoder_args(p)
    add_runtime_args(p)
    add_model_args(p)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder for the checkpoint, metrics.json and history.jsonl: a new or empty "
        "folder, or with --force one that holds an earlier `train` run's checkpoint (replaced "
        "only when this run has finished). A folder holding anything else (a coordinator's "
        "state folder, survey data) is refused",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the checkpoint and metrics already in --out (default: refuse)",
    )
    p.add_argument(
        "--epochs", type=int, default=CENTRALIZED_EPOCHS, help="epochs (default: %(default)s)"
    )
    p.add_argument(
        "--groups-per-step",
        type=int,
        default=1,
        help="groups batched into one optimizer step (default: %(default)s, a group at a time; "
        "the paper's code batches all 8 training groups into one step per epoch: 8)",
    )
    p.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam learning rate")
    p.add_argument("--context-range", default="9,90", help="context questions per episode, lo,hi")
    p.add_argument(
        "--embedding-noise",
        type=float,
        default=0.0,
        help="std of the random shift added to each question's embeddings in training, one shift "
        "for all its options (0 = none, the paper's; 0..1)",
    )
    p.add_argument("--target-range", default="9,90", help="target questions per episode, lo,hi")
    p.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=EVAL_EVERY,
        help="evaluate every N epochs, 0 or more (0: only at end)",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=EVAL_MAX_CONTEXT,
        help="context questions at evaluation (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    apply_threads(args.threads)
    seed_everything(args.seed)
    if args.epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {args.epochs}")
    try:
        settings = TrainingSettings(
            learning_rate=args.lr,
            context_range=parse_range(args.context_range, "--context-range"),
            target_range=parse_range(args.target_range, "--target-range"),
            groups_per_step=args.groups_per_step,
            embedding_noise=args.embedding_noise,
        )
    except ValueError as err:
        raise InputError(f"training settings: {err}") from err
    check_train_out(args.out, force=args.force)
    console = make_console(stderr=True)
    data = load_survey(args.data)
    train_default, held_default = default_groups(data)
    train_groups = parse_group_names(args.groups) or train_default
    held_out = parse_group_names(args.held_out, "--held-out") or (
        held_default if args.groups is None else []
    )
    overlap = set(train_groups) & set(held_out)
    if overlap:
        raise InputError(f"groups both trained on and held out: {sorted(overlap)}")
    encoder = open_encoder(args)
    console.print(f"embedding {len(train_groups) + len(held_out)} groups with {encoder.identity}")
    splits = embed_groups(data, [*train_groups, *held_out], encoder)
    for g in train_groups:
        if len(splits[g].train) < 2:
            raise InputError(f"group {g!r} has {len(splits[g].train)} train questions, needs 2+")
    refuse_groups_without_context(splits, held_out, "--held-out")
    eval_sets = {
        TRAIN_SET: {g: splits[g] for g in train_groups if splits[g].test},
        HELD_OUT_SET: {g: splits[g] for g in held_out if splits[g].test},
    }

    model = build_model(model_config(args, encoder.dim), args.seed)
    trainer = LocalTrainer(model, settings, seed=args.seed)
    # kept until training has finished: a run that fails leaves what --out held untouched
    history: list[str] = []
    train_started = time.perf_counter()

    def on_epoch(epoch: int, loss: float) -> None:
        if (args.eval_every and epoch % args.eval_every == 0) or epoch == args.epochs:
            reports = evaluate_sets(model, eval_sets, args.max_context, args.seed)
            row = {
                "epoch": epoch,
                "steps": trainer.steps_done,
                "loss": loss,
                "seconds": time.perf_counter() - train_started,
                **{
                    name: {**rep.model.to_dict(), "context_gain": rep.context_gain}
                    for name, rep in reports.items()
                },
            }
            history.append(json.dumps(row) + "\n")
            figures = "  ".join(
                f"{name.split(' ')[0]} {rep.model.alignment:.4f}" for name, rep in reports.items()
            )
            console.print(f"epoch {epoch:4d}  loss {loss:8.4f}  alignment: {figures}")

    train_centralized(trainer, {g: splits[g].train for g in train_groups}, args.epochs, on_epoch)
    train_seconds = time.perf_counter() - train_started
    reports = evaluate_sets(model, eval_sets, args.max_context, args.seed)
    result = {
        "mode": "centralized",
        "data": str(args.data),
        "training_groups": train_groups,
        "held_out_groups": held_out,
        "epochs": args.epochs,
        "optimizer_steps": trainer.steps_done,
        "seed": args.seed,
        "encoder": encoder.identity,
        "parameters": model.num_parameters(),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
        "reports": reports_to_json(reports),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / HISTORY_FILE, "".join(history).encode("utf-8"))
    save_checkpoint(
        args.out, model, encoder.identity, {k: v for k, v in result.items() if k != "reports"}
    )
    write_json(args.out / METRICS_FILE, result)
    print_reports(reports, make_console())
    console.print(
        f"trained {trainer.steps_done} steps in {train_seconds:.1f} s "
        f"(wall {result['wall_seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB); "
        f"checkpoint and metrics in {args.out}"
    )
    return 0
