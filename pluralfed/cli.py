"""The `pluralfed` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `register(subparsers)`; that function adds a parser
and sets `func` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pluralfed.errors import InputError

# module path of every subcommand, in the order `--help` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "pluralfed.commands.data",
    "pluralfed.commands.train",
    "pluralfed.commands.evaluate",
    "pluralfed.commands.certs",
    "pluralfed.commands.coordinator",
    "pluralfed.commands.node",
    "pluralfed.commands.federate",
    "pluralfed.commands.reward",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pluralfed",
        description="Federated training of a group preference predictor (GPO).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
