"""Options and steps that several subcommands share (data, encoder, threads, output)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluralfed.config import MAX_THREADS
from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # torch and the encoder load only when a command needs them (not for --help)
    from pluralfed.embeddings import TextEncoder
    from pluralfed.episodes import GroupSplit
    from pluralfed.metrics import SetReport
    from pluralfed.model import GPO


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def non_negative_int(text: str) -> int:
    """An argparse type for counts and seeds that may be 0 but not negative (numpy refuses a
    negative seed only deep inside a run, with an error that names no option)."""
    value = _int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for sizes that must be at least 1, refused before any model or data is
    loaded rather than after."""
    value = _int_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# How every command's --groups (and --held-out) reads group names; the help texts end with it.
GROUP_LIST_SYNTAX = (
    "Names as separate arguments (--groups Japan 'New Zealand') or as one argument separated by "
    "';' or ',' (--groups 'Japan;New Zealand', --groups Japan,France): one argument is split on "
    "';' if it has one, else on ','; several are one name each. A name with a comma: give it "
    "among several arguments or in a ';' list ('Korea, South;'). Spaces around a name are ignored"
)


def add_group_list_arg(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, help_text: str
) -> None:
    """`flag` taking group names in either form `parse_group_names` reads: every command the same
    (`data split` took separate arguments, the others one ';'- or ','-separated string)."""
    p.add_argument(flag, nargs="+", metavar="NAME", help=f"{help_text}. {GROUP_LIST_SYNTAX}")


def parse_group_names(values: Sequence[str] | None, option: str = "--groups") -> list[str] | None:
    """The group names `values` (the arguments given to `option`) stand for, see
    GROUP_LIST_SYNTAX; None if the option was not given. Duplicates are dropped, order is kept.

    Several arguments are taken whole, so a name with ',' or ';' in it (data files allow any
    name) can always be given; one argument keeps the old string form (';' first, since a name
    may hold ',')."""
    if values is None:
        return None
    if isinstance(values, str):  # one string, as the option took before: the same as one argument
        values = [values]
    if len(values) == 1:
        text = values[0]
        parts = text.split(";" if ";" in text else ",")
    else:
        parts = list(values)
    names = list(dict.fromkeys(name.strip() for name in parts if name.strip()))
    if not names:
        raise InputError(f"{option}: no group names in {' '.join(map(repr, values))}")
    return names


def group_list_args(names: Sequence[str]) -> list[str]:
    """Arguments that `parse_group_names` reads back as exactly `names`, for scripts that write
    a command line: one per name, except that a single name must not be split."""
    if len(names) != 1:
        return list(names)
    [name] = names
    if ";" in name:  # split on ';' even alone: as two arguments it is taken whole
        return [name, name]
    return [f"{name};"] if "," in name else [name]


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        type=Path,
        required=required,
        help="survey data: a GlobalOpinionQA global_opinions.csv or a pluralfed JSONL file",
    )
    add_group_list_arg(
        p,
        "--groups",
        "groups to train on. Default: PROTOCOL.md's 8 training groups when the data has them, "
        "else every group in the file",
    )
    add_group_list_arg(
        p,
        "--held-out",
        "groups never trained on, evaluated few-shot. Default: PROTOCOL.md's 6 held-out "
        "groups when the data has them and --groups is not given, else none",
    )


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        default="all-MiniLM-L6-v2",
        help="text encoder: all-MiniLM-L6-v2 (bundled, offline) or any Hugging Face encoder "
        "name or local path (default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache folder (default: $PLURALFED_CACHE_DIR or ~/.cache/pluralfed)",
    )
    p.add_argument("--no-cache", action="store_true", help="embed everything afresh, cache nothing")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="random seed, 0 or more (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; use 1 per process when running many)",
    )


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:  # torch's own error for 10**20 is a traceback
            raise InputError(f"--threads must be 1..{MAX_THREADS}, got {threads}")
        import torch

        torch.set_num_threads(threads)


def open_encoder(args: argparse.Namespace) -> TextEncoder:
    from pluralfed.embeddings import CachedEncoder, default_cache_dir, make_encoder

    encoder: TextEncoder = make_encoder(args.encoder)
    if not args.no_cache:
        encoder = CachedEncoder(encoder, args.cache_dir or default_cache_dir())
    return encoder


def refuse_groups_without_context(
    splits: Mapping[str, GroupSplit], groups: Sequence[str], what: str
) -> None:
    """Refuse, before any training, groups that have test questions but no train questions: they
    cannot be evaluated few-shot (no context), and finding out only at evaluation loses the run."""
    bad = [g for g in groups if splits[g].test and not splits[g].train]
    if bad:
        raise InputError(
            f"{what}: group(s) {', '.join(repr(g) for g in bad)} have test questions but no train "
            "questions (PROTOCOL.md split) to use as context, so they cannot be evaluated; "
            "leave them out"
        )


def check_output_path(path: Path, option: str, *, folder: bool) -> None:
    """Refuse an output path that cannot be written (a file where a folder must be, or the
    reverse) before any work is done, rather than with a traceback after it."""
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise InputError(f"{option} {path}: is a folder, expected a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is not a folder")
            break


def evaluate_sets(
    model: GPO, sets: Mapping[str, Mapping[str, GroupSplit]], max_context: int, seed: int
) -> dict[str, SetReport]:
    """Evaluate every non-empty set of groups: {set name: report}."""
    from pluralfed.evaluation import evaluate_group, summarize_groups

    return {
        name: summarize_groups(
            [evaluate_group(model, s, max_context, seed) for s in groups.values()]
        )
        for name, groups in sets.items()
        if groups
    }


def reports_to_json(reports: Mapping[str, SetReport]) -> dict[str, Any]:
    return {name: rep.to_dict() for name, rep in reports.items()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def write_json(path: Path, obj: Any) -> None:
    """Atomically, so a run's metrics are never left half written by a crash or a full disk: a
    symlink is followed (its target replaced, not the link), and a device or pipe such as
    /dev/stdout, which cannot be replaced, is written through."""
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not target.is_file():
        with open(target, "wb") as out:
            out.write(data)
    else:
        atomic_write_bytes(target, data)


def parse_range(text: str, what: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = text.split(",")
        lo, hi = int(lo_s), int(hi_s)
    except ValueError as err:
        raise InputError(f"{what} must look like 9,90, got {text!r}") from err
    if not 1 <= lo <= hi:
        raise InputError(f"{what} must satisfy 1 <= low <= high, got {text!r}")
    return lo, hi
