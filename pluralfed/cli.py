"""The `pluralfed` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `register(subparsers)`; that function adds a parser
and sets `func` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import MutableMapping

from pluralfed.errors import InputError

# every subcommand: its module and one line of help, in the order `--help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "data": (
        "pluralfed.commands.data",
        "make, inspect, convert and split survey data files",
    ),
    "train": (
        "pluralfed.commands.train",
        "centralized training on pooled data (the baseline federated training is compared to)",
    ),
    "evaluate": (
        "pluralfed.commands.evaluate",
        "evaluate a checkpoint few-shot on any groups",
    ),
    "certs": (
        "pluralfed.commands.certs",
        "create and inspect TLS certificates (CA, coordinator, nodes)",
    ),
    "coordinator": (
        "pluralfed.commands.coordinator",
        "run the coordinator: rounds, FedAvg, federated evaluation",
    ),
    "node": (
        "pluralfed.commands.node",
        "run a group node (or check its connection)",
    ),
    "federate": (
        "pluralfed.commands.federate",
        "run a whole federation locally: coordinator and nodes as separate processes",
    ),
    "reward": (
        "pluralfed.commands.reward",
        "use a checkpoint as a reward model: serve it over gRPC, or score answers",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand's options, or only `command`'s (the others get their
    line of help): a command imports what it needs, so `certs` or `--help` load no torch."""
    parser = argparse.ArgumentParser(
        prog="pluralfed",
        description="Federated training of a group preference predictor (GPO).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--verb` would be -v for argparse but not for `quiet_grpc_core`
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, gRPC's own log included"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand `argv` names (its first word that is one), or None."""
    return next((word for word in argv if word in COMMANDS), None)


# gRPC core logs a line for every failed TLS handshake, unthrottled (INFO), and for every
# ClientHello naming a server the certificate does not (ERROR, before any certificate is
# asked for): any peer that can reach the coordinator's or reward service's port could grow its
# log without limit, which pluralfed's own refusal log (once per caller and reason, then once a
# minute) exists to prevent. So gRPC core stays quiet unless asked: `pluralfed -v`, or
# GRPC_VERBOSITY set by the operator. (What its log said of a failed bind, `bind_port` finds out
# itself.)
GRPC_CORE_VERBOSITY = "NONE"


def quiet_grpc_core(argv: list[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set GRPC_VERBOSITY for this process and its children unless the operator chose one or
    asked for debug logging. gRPC reads it once, when imported: so before any command runs."""
    command = chosen_command(argv)
    before = argv[: argv.index(command)] if command else argv
    if any(word == "--verbose" or _short_flags_with_v(word) for word in before):
        return
    environ.setdefault("GRPC_VERBOSITY", GRPC_CORE_VERBOSITY)


def _short_flags_with_v(word: str) -> bool:
    """`-v`, or short flags written together that include it (`-vv`, `-hv`)."""
    return word.startswith("-") and not word.startswith("--") and "v" in word[1:]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "grpc" not in sys.modules:  # imported already (in-process callers): too late to matter
        quiet_grpc_core(argv)
    parser = build_parser(chosen_command(argv) or "")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"pluralfed {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
