"""`pluralfed federate`: a complete local federation (coordinator + one process per group)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pluralfed.commands.common import (
    add_group_list_arg,
    check_output_path,
    non_negative_int,
    parse_group_names,
    positive_int,
)
from pluralfed.commands.coordinator import HELP as COORDINATOR_HELP
from pluralfed.data import load_survey, write_jsonl
from pluralfed.errors import InputError
from pluralfed.localfed import (
    LocalFederation,
    Stopped,
    federation_data,
    run_local,
    settings_variables,
    stop_on_signals,
)
from pluralfed.metrics import SetReport
from pluralfed.prepare import default_groups
from pluralfed.report import make_console, print_reports
from pluralfed.synthetic import generate_synthetic


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "federate",
        help="run a whole federation locally: coordinator and nodes as separate processes",
        description="Issues a CA and certificates, gives every node only its own group's data, "
        "starts the coordinator and one node process per group (mutual TLS on loopback), runs "
        "all rounds and prints the PROTOCOL.md figures. Without --data it runs on synthetic "
        "demo data. Everything lands in --out: certs/, data/, logs/, coordinator/ (metrics.jsonl, "
        "results.json, final/ checkpoint). SIGTERM or SIGINT stops the coordinator and every "
        "node, and exits 143 or 130; the same command resumes the run.",
    )
    p.add_argument("--data", type=Path, help="survey data (CSV or JSONL); default: synthetic demo")
    add_group_list_arg(p, "--groups", "training groups; default as `train`")
    add_group_list_arg(p, "--held-out", "evaluate-only groups; default as `train`")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/federation"),
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=100,
        help=COORDINATOR_HELP["rounds"] + " (default: %(default)s)",
    )
    p.add_argument(
        "--local-steps",
        type=int,
        default=6,
        help=COORDINATOR_HELP["local_steps"] + " (default: %(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help=COORDINATOR_HELP["eval_every"] + " (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the run: the initial model, every node's episode sampling and the "
        "evaluation's choice of context questions (default: %(default)s)",
    )
    p.add_argument(
        "--threads-per-node",
        type=positive_int,
        default=1,
        help="torch threads per node, 1 or more (default: %(default)s)",
    )
    p.add_argument(
        "--encoder", default="all-MiniLM-L6-v2", help="text encoder (default: %(default)s)"
    )
    p.add_argument("--cache-dir", type=Path, help="embedding cache shared by the nodes")
    p.add_argument("--insecure", action="store_true", help="plain text instead of mutual TLS")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other coordinator setting (see `pluralfed coordinator --help`), e.g. "
        "--set server_optimizer=fedadam",
    )
    p.add_argument(
        "--personalize-steps",
        type=int,
        default=0,
        help="after the run, each training node fine-tunes the final model this many steps on "
        "its own data and keeps it in OUT/personalized/<node>/ (default: 0, off)",
    )
    p.add_argument(
        "--synthetic-groups",
        type=int,
        default=10,
        help="groups in the demo data (default: %(default)s)",
    )
    p.add_argument(
        "--synthetic-questions",
        type=int,
        default=200,
        help="questions in the demo (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=7200,
        help="give up after this many seconds (default: %(default)s)",
    )
    p.set_defaults(func=run)


# settings `federate` has its own option for: a --set of one would override it without a word
OWN_OPTIONS = ("rounds", "local_steps", "eval_every", "seed")


def _parse_sets(pairs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(setting -> value, setting -> "--set KEY=VALUE" as given, for messages). A setting given
    twice, or one with its own option, is refused: which value won was not said."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set takes KEY=VALUE, got {pair!r}")
        name = key.strip().replace("-", "_")
        if name in OWN_OPTIONS:
            option = f"--{name.replace('_', '-')}"
            raise InputError(
                f"--set {pair}: use {option} {value.strip()} ({name} has its own option)"
            )
        if name in values:
            raise InputError(
                f"--set {pair}: {name} is already set by {sources[name]}; give it once"
            )
        values[name] = value.strip()
        sources[name] = f"--set {pair}"
    return values, sources


def run(args: argparse.Namespace) -> int:
    """`_federate`, stopped by SIGTERM or SIGINT with every process it started (no orphans
    left running), exiting 143 or 130 so a supervisor can tell a stop from a finished run."""
    try:
        with stop_on_signals():
            return _federate(args)
    except Stopped as stop:
        print(
            f"pluralfed federate: {stop}: the coordinator and the nodes were stopped; the same "
            f"command (--out {args.out}) resumes the run",
            file=sys.stderr,
        )
        return stop.exit_code


def _federate(args: argparse.Namespace) -> int:
    console = make_console(stderr=True)
    if args.personalize_steps < 0:
        raise InputError(f"--personalize-steps must be 0 or more, got {args.personalize_steps}")
    check_output_path(args.out, "--out", folder=True)
    if args.data is None:
        data = generate_synthetic(
            n_groups=args.synthetic_groups, n_questions=args.synthetic_questions, seed=args.seed
        )
        names = sorted(data.groups)
        n_held = max(1, len(names) // 4)
        train_default, held_default = names[:-n_held], names[-n_held:]
    else:
        data = load_survey(args.data)
        train_default, held_default = default_groups(data)
    groups = parse_group_names(args.groups) or train_default
    held = parse_group_names(args.held_out, "--held-out") or (
        held_default if args.groups is None else []
    )
    set_values, set_sources = _parse_sets(args.set)
    settings: dict[str, Any] = {
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "eval_every": args.eval_every,
        "seed": args.seed,
        **set_values,
    }
    sources = {key: f"--{key.replace('_', '-')}" for key in settings}
    # LocalFederation checks every setting as the coordinator will, so a bad one is refused
    # here, before anything is written (it was refused once the demo data, certificates and
    # configs were on disk and the coordinator had started and exited)
    run_cfg = LocalFederation(
        out_dir=args.out,
        training_groups=groups,
        held_out_groups=held,
        coordinator_settings=settings,
        threads_per_node=args.threads_per_node,
        encoder=args.encoder,
        cache_dir=args.cache_dir,
        insecure=args.insecure,
        timeout_s=args.timeout,
        personalize_steps=args.personalize_steps,
        verbose=args.verbose,
        setting_sources={**sources, **set_sources},
    )
    federation_data(run_cfg, data)  # an unknown group: refused before anything is written
    ignored = settings_variables()
    if ignored:
        console.print(
            f"[yellow]note:[/] a local federation ignores {', '.join(ignored)} (its own configs "
            "say every setting; use --set KEY=VALUE)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        write_jsonl(data, args.out / "demo-data.jsonl")
        console.print(
            f"synthetic demo data: {len(data.groups)} groups, written to "
            f"{args.out / 'demo-data.jsonl'}"
        )
    console.print(
        f"starting a local federation: {len(groups)} training nodes, {len(held)} evaluate-only "
        f"nodes, {args.rounds} rounds; logs in {args.out / 'logs'}"
    )
    results = run_local(run_cfg, data)
    console.print(
        f"done: {results['rounds']} rounds in {results['wall_seconds']:.0f} s; "
        f"results in {args.out / 'coordinator' / 'results.json'}"
    )
    final = results.get("final_evaluation")
    if final:
        print_reports(
            {n: SetReport.from_dict(r) for n, r in final["reports"].items()}, make_console()
        )
    return 0
