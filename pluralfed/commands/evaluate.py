"""`pluralfed evaluate`: few-shot evaluation of a checkpoint on any groups, per PROTOCOL.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pluralfed.checkpoint import META_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from pluralfed.commands.common import (
    add_encoder_args,
    add_group_list_arg,
    add_runtime_args,
    apply_threads,
    check_output_path,
    evaluate_sets,
    open_encoder,
    parse_group_names,
    positive_int,
    refuse_groups_without_context,
    reports_to_json,
    write_json,
)
from pluralfed.commands.train import add_memory_args, memory_overrides
from pluralfed.data import load_survey
from pluralfed.errors import InputError
from pluralfed.fsutil import same_file
from pluralfed.model import GPOConfig
from pluralfed.prepare import default_groups, embed_groups
from pluralfed.protocol import EVAL_MAX_CONTEXT
from pluralfed.report import make_console, print_reports


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint few-shot on any groups",
        description="For each group: context = its TRAIN questions (at most --max-context, fixed "
        "seed), targets = its TEST questions (PROTOCOL.md split). Prints alignment, worst group, "
        "fairness index and context gain with the uniform and group-prior baselines, and writes "
        "them as JSON.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--data", type=Path, required=True, help="survey data (CSV or JSONL)")
    add_group_list_arg(
        p,
        "--groups",
        "groups to evaluate. Default: the checkpoint's training groups and PROTOCOL.md's "
        "held-out groups, when present in the data",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write the metrics JSON here (replaced if it exists; never --data or a checkpoint file)",
    )
    p.add_argument(
        "--max-context",
        type=positive_int,
        default=EVAL_MAX_CONTEXT,
        help="context questions per group (default: %(default)s)",
    )
    add_memory_args(p.add_argument_group("context memory (default: the checkpoint's)"), None)
    add_encoder_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)


def check_evaluate_out(out: Path, data: Path, checkpoint: Path) -> None:
    """Refuse an --out that names one of this command's own inputs: it is replaced by the
    metrics JSON, and the survey file (or the checkpoint) was lost without a word."""
    check_output_path(out, "--out", folder=False)
    inputs = [("--data", data)]
    inputs += [("--checkpoint", checkpoint / name) for name in (META_FILE, WEIGHTS_FILE)]
    for option, path in inputs:
        if same_file(out, path):
            raise InputError(f"--out {out}: is {option}'s {path}, which it would replace")


def open_checkpoint(folder: Path) -> Checkpoint:
    """`load_checkpoint`, with a hint when --checkpoint names a near miss: the checkpoint's own
    model.json, or a coordinator's state folder (its model is in final/)."""
    if folder.is_file() and folder.name in (META_FILE, WEIGHTS_FILE):
        raise InputError(
            f"--checkpoint {folder}: is a checkpoint's file; give its folder: {folder.parent}"
        )
    if not (folder / META_FILE).exists() and (folder / "final" / META_FILE).is_file():
        raise InputError(
            f"--checkpoint {folder}: holds no checkpoint itself; a federated run's final model "
            f"is in {folder / 'final'}"
        )
    return load_checkpoint(folder)


def training_groups(ckpt: Checkpoint, folder: Path) -> list[str]:
    """The checkpoint's `training_groups` metadata, checked: it comes from a file that may have
    been edited, and an int crashed `evaluate` while a string was read letter by letter."""
    groups = ckpt.metadata.get("training_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise InputError(
            f"{folder / META_FILE}: metadata field 'training_groups' must be a list of group "
            f"names, got {groups!r:.80}; fix the file or pass --groups"
        )
    return groups


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    if args.out is not None:
        check_evaluate_out(args.out, args.data, args.checkpoint)
    ckpt = open_checkpoint(args.checkpoint)
    try:
        ckpt.model.cfg = GPOConfig.from_dict({**ckpt.model.cfg.to_dict(), **memory_overrides(args)})
    except ValueError as err:
        raise InputError(f"--memory-*: {err}") from err
    encoder = open_encoder(args)
    if encoder.identity != ckpt.encoder:
        raise InputError(
            f"{args.checkpoint}: trained with encoder {ckpt.encoder!r}, but --encoder gives "
            f"{encoder.identity!r}"
        )
    data = load_survey(args.data)
    requested = parse_group_names(args.groups)
    if requested is not None:
        sets = {"requested groups": requested}
    else:
        trained = [g for g in training_groups(ckpt, args.checkpoint) if g in data.groups]
        _, held = default_groups(data)
        sets = {"training groups (test questions)": trained, "held-out groups": held}
        if not trained and not held:
            sets = {"all groups": sorted(data.groups)}
    all_groups = [g for groups in sets.values() for g in groups]
    splits = embed_groups(data, all_groups, encoder)
    refuse_groups_without_context(splits, all_groups, "--groups" if requested else str(args.data))
    reports = evaluate_sets(
        ckpt.model,
        {name: {g: splits[g] for g in groups if splits[g].test} for name, groups in sets.items()},
        args.max_context,
        args.seed,
    )
    if not reports:
        raise InputError("none of the chosen groups has test questions")
    print_reports(reports, make_console())
    if args.out:
        write_json(
            args.out,
            {
                "checkpoint": str(args.checkpoint),
                "data": str(args.data),
                "reports": reports_to_json(reports),
            },
        )
    return 0
