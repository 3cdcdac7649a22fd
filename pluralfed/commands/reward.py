"""`pluralfed reward`: a trained checkpoint as a reward model (serve it, or score with it)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from pluralfed.commands.common import add_group_list_arg, apply_threads, parse_group_names
from pluralfed.commands.train import add_memory_args, memory_overrides
from pluralfed.data import is_test_question, load_survey
from pluralfed.embeddings import CachedEncoder, TextEncoder, default_cache_dir, make_encoder
from pluralfed.errors import InputError
from pluralfed.reward import (
    DEFAULT_MAX_CALL_S,
    DEFAULT_MAX_WORKERS,
    MAX_CONTEXT_ITEMS,
    REWARD_KINDS,
    RewardModel,
    protocol_context,
    to_rewards,
)

log = logging.getLogger("pluralfed.reward")

SERVE_EPILOG = """\
The allow-list is a TOML file whose [allow_list] table maps client certificate ids (from
`pluralfed certs node --id ID`, issued by the same CA as the server certificate) to client names:

  [allow_list]
  "trainer-1" = "RL trainer"

Clients without a certificate from the CA cannot connect; clients whose id is not listed get
PERMISSION_DENIED. The gRPC health service (service "pluralfed.v1.Reward") needs only the TLS
handshake.
"""

SCORE_EPILOG = """\
examples:
  local, no server:
    pluralfed reward score --checkpoint runs/c100 --data global_opinions.csv --group France \\
        --question "Is the death penalty justified?" --answer Yes --answer No
  through the service, a group the server holds:
    pluralfed reward score --server localhost:50061 --tls-dir certs/nodes/trainer-1 \\
        --group France --question "..." --answer Yes --answer No
  through the service, the group's context sent inline from a local data file:
    pluralfed reward score --server localhost:50061 --tls-dir certs/nodes/trainer-1 \\
        --data global_opinions.csv --group France --question "..." --answer Yes --answer No
"""


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        default="all-MiniLM-L6-v2",
        help="text encoder the checkpoint was trained with: all-MiniLM-L6-v2 (bundled, offline) "
        "or a Hugging Face name or local folder; its identity must match the checkpoint's "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache folder (default: $PLURALFED_CACHE_DIR or ~/.cache/pluralfed)",
    )
    p.add_argument("--no-cache", action="store_true", help="embed afresh, write no cache")


def _add_tls_args(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument(
        "--tls-dir",
        type=Path,
        help=f"folder with the {who}'s ca.pem, cert.pem, key.pem (from `pluralfed certs`)",
    )
    p.add_argument("--tls-ca", type=Path, help="CA certificate (overrides --tls-dir)")
    p.add_argument("--tls-cert", type=Path, help=f"{who} certificate (overrides --tls-dir)")
    p.add_argument("--tls-key", type=Path, help=f"{who} private key (overrides --tls-dir)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reward",
        help="use a checkpoint as a reward model: serve it over gRPC, or score answers",
        description="The trained predictor as a reward model: for a group (its known answers, "
        "or the name of a group whose TRAIN questions are loaded from a data file) and a "
        "question with candidate answers, the group's predicted distribution over the answers "
        "and one reward per answer (default: the log-probability; see pluralfed.reward).",
    )
    sub = p.add_subparsers(dest="reward_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "serve",
        help="serve the reward model over gRPC with mutual TLS (pluralfed.v1.Reward)",
        description="Serve pluralfed.v1.Reward (protos/pluralfed/v1/reward.proto).\n\n"
        "Score takes a group (one the server holds, or inline context items) and up to 64\n"
        "questions with candidate answers, and returns per question the group's predicted\n"
        "distribution and per-answer rewards; Info lists the groups and limits. Mutual TLS and\n"
        "an allow-list of client certificates are required. Stops cleanly on SIGINT/SIGTERM.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    s.add_argument(
        "--listen",
        default="127.0.0.1:50061",
        help="host:port to listen on; port 0 picks a free one (default: %(default)s)",
    )
    _add_tls_args(s, "server")
    s.add_argument(
        "--allow-list",
        type=Path,
        required=True,
        help="TOML file with an [allow_list] table: client certificate id = client name",
    )
    s.add_argument(
        "--tls-crl",
        type=Path,
        help="the CA's revocation list (crl.pem from `pluralfed certs revoke`): client "
        "certificates in it are refused; re-read within a second when the file changes",
    )
    s.add_argument(
        "--groups-data",
        type=Path,
        help="survey data (GlobalOpinionQA CSV or pluralfed JSONL) whose groups the server "
        "holds by name, each with its TRAIN questions (PROTOCOL.md split, at most "
        f"{MAX_CONTEXT_ITEMS}) as context",
    )
    add_group_list_arg(s, "--groups", "only these groups of --groups-data (default: all)")
    s.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        help="calls served at once; 4x as many may wait, more are refused (default: "
        "%(default)s; at least --max-calls-per-client + 5, since up to 4 health checks from "
        "any certificate may hold workers too)",
    )
    s.add_argument(
        "--max-calls-per-client",
        type=int,
        help="calls one client certificate may have in flight; more are refused at once "
        "(default: half of --max-workers less 4, the health checks' share; at least 1)",
    )
    s.add_argument(
        "--max-call-seconds",
        type=float,
        default=DEFAULT_MAX_CALL_S,
        help="refuse a call expected to need more of the model than this, and stop one that "
        "has held it this long (calls take the model in turns; default: %(default)s)",
    )
    s.add_argument(
        "--port-file",
        type=Path,
        help="write the bound port here once serving (useful with --listen HOST:0)",
    )
    add_memory_args(s.add_argument_group("context memory (default: the checkpoint's)"), None)
    _add_encoder_args(s)
    s.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    s.set_defaults(func=run_serve)

    c = sub.add_parser(
        "score",
        help="score candidate answers for a group, locally or through a reward server",
        description="Print the group's predicted distribution over the given answers to one\n"
        "question, and the reward of each answer: locally (--checkpoint, --data) or through a\n"
        "running reward service (--server).",
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--checkpoint", type=Path, help="checkpoint folder (local scoring)")
    add_memory_args(
        c.add_argument_group("context memory, local scoring (default: the checkpoint's)"), None
    )
    c.add_argument(
        "--server", help="host:port of a reward service to score through (instead of locally)"
    )
    c.add_argument(
        "--group",
        required=True,
        help="the group: with --data, a group of that file (its TRAIN questions are the "
        "context); with --server and no --data, a group the server holds",
    )
    c.add_argument(
        "--data",
        type=Path,
        help="survey data with the group's answers (CSV or JSONL); required locally",
    )
    c.add_argument("--question", required=True, help="the question to score answers to")
    c.add_argument(
        "--answer",
        action="append",
        required=True,
        help="a candidate answer (an option of the question); repeat for each, in order",
    )
    c.add_argument(
        "--kind",
        choices=REWARD_KINDS,
        default="logprob",
        help="reward per answer: logprob = ln(max(p, 1e-6)), prob = p (default: %(default)s)",
    )
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_tls_args(c, "client")
    c.add_argument(
        "--server-name",
        help="check the server certificate against this name instead of the host in --server",
    )
    c.add_argument(
        "--timeout", type=float, default=30.0, help="call deadline in seconds (default: 30)"
    )
    _add_encoder_args(c)
    c.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    c.set_defaults(func=run_score)


def _encoder(args: argparse.Namespace) -> TextEncoder:
    encoder: TextEncoder = make_encoder(args.encoder, show_progress=False)
    if not args.no_cache:
        encoder = CachedEncoder(encoder, args.cache_dir or default_cache_dir())
    return encoder


def _tls(args: argparse.Namespace, who: str) -> Any:
    from pluralfed.tls import resolve_tls_files

    try:
        return resolve_tls_files(who, args.tls_dir, args.tls_ca, args.tls_cert, args.tls_key)
    except InputError as err:
        raise InputError(
            f"{who}: mutual TLS needs --tls-dir (with ca.pem, cert.pem, key.pem) or "
            "--tls-ca, --tls-cert and --tls-key"
        ) from err


def run_serve(args: argparse.Namespace) -> int:
    from pluralfed.auth import AllowList, RevocationWatch
    from pluralfed.reward_server import calls_per_client, start_reward_server

    apply_threads(args.threads)
    if args.max_workers < 1:
        raise InputError(f"--max-workers must be at least 1, got {args.max_workers}")
    if args.max_calls_per_client is not None and args.max_calls_per_client < 1:
        raise InputError(
            f"--max-calls-per-client must be at least 1, got {args.max_calls_per_client}"
        )
    if not (math.isfinite(args.max_call_seconds) and args.max_call_seconds > 0):
        raise InputError(f"--max-call-seconds must be positive, got {args.max_call_seconds}")
    calls_per_client(args.max_workers, args.max_calls_per_client)  # said before the model loads
    tls = _tls(args, "reward server")
    allow_list = AllowList.from_toml(args.allow_list)
    revocations = RevocationWatch(args.tls_crl, tls.ca) if args.tls_crl is not None else None
    model = RewardModel.from_checkpoint(
        args.checkpoint, encoder=_encoder(args), memory=memory_overrides(args)
    )
    if args.groups_data is not None:
        added = model.add_groups_from_data(args.groups_data, parse_group_names(args.groups))
        log.info("holding %d groups from %s", len(added), args.groups_data)
    elif args.groups:
        raise InputError("--groups needs --groups-data")
    server, port, _ = start_reward_server(
        model,
        args.listen,
        tls,
        allow_list,
        max_workers=args.max_workers,
        revocations=revocations,
        max_call_s=args.max_call_seconds,
        max_calls_per_client=args.max_calls_per_client,
    )
    if args.port_file is not None:
        args.port_file.write_text(f"{port}\n", encoding="utf-8")
    # the handler only notes the signal, and the main thread looks every 0.2 s: a signal the
    # kernel hands to one of gRPC's threads does not wake a main thread blocked in a wait with
    # no end (it ignored SIGTERM then), and an Event.set() or a log line run by a handler in
    # the middle of the main thread's own use of that lock would deadlock
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    print(f"reward service listening on port {port}", flush=True)
    while not signals:
        time.sleep(0.2)
    log.info("signal %d: stopping", signals[0])
    server.stop(grace=2.0).wait()
    return 0


def _print(args: argparse.Namespace, probs: np.ndarray, rewards: np.ndarray, extra: dict) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "group": args.group,
                    "question": args.question,
                    "kind": args.kind,
                    "answers": [
                        {"answer": a, "probability": float(p), "reward": float(r)}
                        for a, p, r in zip(args.answer, probs, rewards, strict=True)
                    ],
                    **extra,
                },
                indent=2,
            )
        )
        return
    width = max(len("answer"), *(len(a) for a in args.answer))
    print(f"group {args.group!r}: {args.question}")
    print(f"  {'answer':<{width}}  probability  reward ({args.kind})")
    best = int(np.argmax(probs))
    for i, (a, p, r) in enumerate(zip(args.answer, probs, rewards, strict=True)):
        mark = " *" if i == best else ""
        print(f"  {a:<{width}}  {p:11.4f}  {r:8.4f}{mark}")


def run_score(args: argparse.Namespace) -> int:
    questions = [(args.question, list(args.answer))]
    if args.server:
        # grpc turns a NaN or negative deadline into an instant DEADLINE_EXCEEDED: say so instead
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        from pluralfed.reward_server import RewardClient, score_request

        if args.checkpoint is not None:
            raise InputError("give --checkpoint (local) or --server, not both")
        memory = memory_overrides(args)
        if memory:  # silently ignored before (walkthrough review, session 17)
            options = ", ".join("--" + name.replace("_", "-") for name in sorted(memory))
            raise InputError(
                f"{options}: the service scores with its own context-memory settings "
                "(`reward serve` options); these apply to local scoring (--checkpoint)"
            )
        group: Any = args.group
        if args.data is not None:
            data = load_survey(args.data, [args.group])
            group = [it for it in data.groups[args.group] if not is_test_question(it.question)]
            if not group:  # the service would only say its inline context is empty
                raise InputError(f"{args.data}: group {args.group!r} has no TRAIN questions")
            group = protocol_context(group)  # the service takes at most 90 inline items
        client = RewardClient(
            args.server, _tls(args, "reward client"), server_name_override=args.server_name
        )
        try:
            reply = client.stub.Score(
                score_request(group, questions, args.kind), timeout=args.timeout
            )
        except grpc.RpcError as err:
            raise InputError(
                f"reward service {args.server}: {err.code().name}: {err.details()}"
            ) from None
        finally:
            client.close()
        s = reply.scores[0]
        _print(
            args,
            np.asarray(s.probabilities),
            np.asarray(s.rewards),
            {"context_items": reply.context_items, "server": args.server},
        )
        return 0
    if args.checkpoint is None or args.data is None:
        raise InputError("local scoring needs --checkpoint and --data (or use --server)")
    apply_threads(args.threads)
    model = RewardModel.from_checkpoint(
        args.checkpoint, encoder=_encoder(args), memory=memory_overrides(args)
    )
    ctx = model.add_groups_from_data(load_survey(args.data, [args.group]), [args.group])
    if args.group not in ctx:
        raise InputError(f"{args.data}: group {args.group!r} has no TRAIN questions")
    probs = model.score(args.group, args.question, args.answer)
    _print(args, probs, to_rewards(probs, args.kind), {"context_items": len(ctx[args.group])})
    return 0
