"""`pluralfed data`: make, inspect, convert and split survey data files.

`split` is how group nodes are provisioned: each node is handed only its own group's JSON-lines file
(see `pluralfed.data` for the format), never the whole survey.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pluralfed import data as survey
from pluralfed.commands.common import add_group_list_arg, non_negative_int, parse_group_names
from pluralfed.errors import InputError
from pluralfed.protocol import HELD_OUT_GROUPS, TRAINING_GROUPS
from pluralfed.synthetic import generate_synthetic

FORMATS_HELP = (
    "Input formats: .csv = GlobalOpinionQA layout (columns question, selections, options), "
    ".jsonl/.ndjson/.json = JSON lines, one {group, question, options, distribution} per line"
)


def register(subparsers: Any) -> None:
    """Add `data` and its sub-subcommands to the `pluralfed` parser."""
    parser = subparsers.add_parser(
        "data",
        help="make, inspect, convert and split survey data files",
        description="Make, inspect, convert and split survey data files. " + FORMATS_HELP,
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "synth",
        help="write a synthetic survey (JSON lines) with known group structure",
        description="Write a synthetic survey with known group structure, deterministic under "
        "--seed: questions on a few topics, groups with latent stances per topic.",
    )
    p.add_argument("--out", required=True, type=Path, help="output file (.jsonl)")
    p.add_argument("--groups", type=int, default=8, metavar="N", help="number of groups (8)")
    p.add_argument(
        "--questions", type=int, default=200, metavar="N", help="number of questions (200)"
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="random seed, 0 or more; same seed, same file (0)",
    )
    p.add_argument(
        "--drop-rate",
        type=float,
        default=0.1,
        metavar="P",
        help="chance that a group did not answer a question (0.1)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        metavar="T",
        help="how strongly group stances show in the answers; 0: only noise (1.0)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "inspect",
        help="summarise a survey file (groups, questions, train/test split per group)",
        description="Check a survey file and summarise it: groups, questions, skipped all-zero "
        "distributions, duplicates, and per group the PROTOCOL.md train/test question counts. "
        + FORMATS_HELP,
    )
    _add_input_arg(p, "file")
    _add_group_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="convert a survey file to JSON lines (optionally only some groups)",
        description="Read a survey file, check it, and write it as JSON lines (distributions "
        "renormalised, all-zero ones dropped). " + FORMATS_HELP,
    )
    p.add_argument("input", type=Path, help="survey file to read (.csv or .jsonl)")
    p.add_argument("output", type=Path, help="JSON-lines file to write (.jsonl)")
    _add_group_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "split",
        help="write one JSON-lines file per group (one for each group node)",
        description="Write one JSON-lines file per group into --out-dir, named by a safe slug of "
        "the group name, plus groups.json mapping each group name to its file. Hand each group "
        "node only its own file. " + FORMATS_HELP,
    )
    _add_input_arg(p, "input")
    p.add_argument(
        "--out-dir", required=True, type=Path, help="directory for the per-group files (created)"
    )
    _add_group_args(p)
    p.set_defaults(func=cmd_split)


def _add_input_arg(p: argparse.ArgumentParser, dest: str) -> None:
    """The survey file, as a positional argument or as --data (as train, evaluate and federate
    take it, so a command copied from those works here too)."""
    p.add_argument(dest, type=Path, nargs="?", help="survey file to read (.csv or .jsonl)")
    p.add_argument("--data", type=Path, help=f"the same as {dest.upper()}")


def _input_file(args: argparse.Namespace, dest: str) -> Path:
    given: Path | None = getattr(args, dest)
    if given is not None and args.data is not None and given != args.data:
        raise InputError(f"two survey files: {given} and --data {args.data}; give one")
    path = given or args.data
    if path is None:
        raise InputError(f"no survey file: give it as {dest.upper()} or --data FILE")
    return path


def _add_group_args(p: argparse.ArgumentParser) -> None:
    add_group_list_arg(p, "--groups", "only these groups")
    p.add_argument(
        "--protocol-groups",
        action="store_true",
        help="only the 14 PROTOCOL.md groups (8 training + 6 held-out)",
    )


def _wanted_groups(args: argparse.Namespace) -> list[str] | None:
    """The groups asked for by --groups and --protocol-groups (both may be given), or None = all."""
    names: list[str] = []
    if args.protocol_groups:
        names.extend(TRAINING_GROUPS + HELD_OUT_GROUPS)
    if args.groups:
        names.extend(parse_group_names(args.groups) or [])
    return names or None


def _check_jsonl_output(path: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Output must be readable back by `load_survey` and must not overwrite the input."""
    if path.suffix.lower() != ".jsonl":
        raise InputError(f"{path}: output must be a .jsonl file")
    for inp in inputs:
        if path.resolve() == inp.resolve():
            raise InputError(f"{path}: output would overwrite the input")


def cmd_synth(args: argparse.Namespace) -> int:
    _check_jsonl_output(args.out)
    data = generate_synthetic(
        n_groups=args.groups,
        n_questions=args.questions,
        seed=args.seed,
        drop_rate=args.drop_rate,
        temperature=args.temperature,
    )
    n = survey.write_jsonl(data, args.out)
    print(f"wrote {n} distributions ({len(data.groups)} groups) to {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    data = survey.load_survey(_input_file(args, "file"), _wanted_groups(args))
    print(survey.summary(data))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _check_jsonl_output(args.output, (args.input,))
    data = survey.load_survey(args.input, _wanted_groups(args))
    n = survey.write_jsonl(data, args.output)
    extra = f", skipped {data.skipped_all_zero} all-zero" if data.skipped_all_zero else ""
    print(f"wrote {n} distributions ({len(data.groups)} groups{extra}) to {args.output}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    source = _input_file(args, "input")
    data = survey.load_survey(source, _wanted_groups(args))
    paths = survey.write_group_files(data, args.out_dir, inputs=(source,))
    for group, path in paths.items():
        print(f"{group}: {len(data.groups[group])} distributions -> {path}")
    print(f"wrote {len(paths)} group files and {args.out_dir / survey.GROUPS_MANIFEST}")
    return 0
