"""`pluralfed coordinator`: run the federation's coordinator service."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from coordinator.service import (
    CoordinatorConfig,
    check_roles,
    dump_config,
    model_config,
    run_coordinator,
)
from pluralfed.auth import AllowList
from pluralfed.config import (
    ConfigValueError,
    add_config_args,
    load_config,
    overrides_from_args,
    read_config_file,
)
from pluralfed.errors import InputError
from pluralfed.model import GPOConfig
from pluralfed.report import make_console

ENV_PREFIX = "PLURALFED_COORDINATOR_"

HELP = {
    "listen": "address to listen on, host:port",
    "state_dir": "folder for the run's checkpoints, metrics.jsonl and results.json; a restarted "
    "coordinator resumes from it",
    "allow_list_file": "TOML file with an [allow_list] table mapping node certificate ids to "
    "group names (default: the [allow_list] table of --config)",
    "tls_dir": "folder with ca.pem, cert.pem, key.pem (from `pluralfed certs`)",
    "tls_ca": "CA certificate (overrides tls_dir)",
    "tls_cert": "coordinator certificate (overrides tls_dir)",
    "tls_key": "coordinator key (overrides tls_dir)",
    "tls_crl": "the CA's revocation list (crl.pem from `pluralfed certs revoke`): node "
    "certificates in it are refused; re-read within a second when the file changes",
    "insecure": "plain text, no TLS and no authentication: for debugging only",
    "encoder": "text encoder every node must use (its identity is checked at join)",
    "rounds": "training rounds",
    "min_nodes": "training nodes needed before a round starts (quorum)",
    "min_updates": "accepted updates needed for a round to count; fewer and the round is retried",
    "round_timeout_s": "deadline of a training round, seconds",
    "eval_timeout_s": "deadline of an evaluation round, seconds",
    "eval_every": "federated evaluation every N rounds (and after the last)",
    "eval_at_start": "also evaluate the initial model",
    "local_steps": "optimizer steps each node takes per round",
    "learning_rate": "nodes' local learning rate (Adam's, or the SGD step's)",
    "embedding_noise": "std of the random shift nodes add to each question's embeddings in "
    "training, one shift for all its options (0 = none; 0..1)",
    "context_range": "context questions per training episode, low,high",
    "target_range": "target questions per training episode, low,high",
    "max_context": "context questions at evaluation",
    "weighting": "FedAvg weights: examples (number of training questions) or uniform",
    "fairness_q": "q-FedAvg: weigh each update also by (1 - its node's alignment before "
    "training) ** q, toward the groups the model serves worst (0 = plain FedAvg; 0..10)",
    "server_optimizer": "fedavg, fedadagrad, fedadam, fedyogi, or adam (torch's Adam on the "
    "averaged deltas, bias-corrected; with local_optimizer = sgd, learning_rate = 1 and 1 local "
    "step it is centralized Adam on the groups' mean gradient)",
    "local_optimizer": "the nodes' optimizer: adam (the paper's) or sgd (plain gradient steps)",
    "server_lr": "server learning rate (default: the optimizer's own)",
    "norm_bound": "refuse updates that move the model further than this (L2)",
    "seed": (
        "seed of the initial model and of the evaluation's choice of context questions; the "
        "nodes are told it, but each seeds its episode sampling from its own `seed` setting"
    ),
    "session_timeout_s": "a node silent this long no longer counts towards the quorum",
    "heartbeat_interval_s": "how often nodes send heartbeats",
    "quorum_timeout_s": "give up if no quorum after this long (default: wait forever)",
    "evaluate_only": "the held-out groups, which may only evaluate; every other group may only "
    'train (a TOML array, or a JSON array like \'["China", "Japan"]\'; default: each node says)',
    "d_model": "model width",
    "mlp_layers": "input MLP layers",
    "n_layers": "transformer encoder layers",
    "n_heads": "attention heads",
    "d_ff": "feed-forward width",
    "dropout": "dropout",
    "members": "independently initialised copies of the network, predictions averaged (1 = off)",
    "memory_weight": "context memory at prediction: mix of the group's own answers, 0..1 (0 = off)",
    "memory_shrinkage": "matching context questions at which the memory mix is half its weight",
    "memory_temperature": "softmax temperature over question similarity in the context memory",
    "max_workers": "RPC worker threads (each waiting node holds one during its long poll; "
    "default: 2 x allow-listed nodes + 32, at least 64)",
    "max_concurrent_uploads": "updates read at once; the others wait their turn, which bounds "
    "the coordinator's memory whatever the number of nodes (0 = no bound)",
    "max_concurrent_downloads": "model downloads sent at once; the others wait their turn, "
    "which bounds the coordinator's memory whatever the number of nodes (0 = no bound)",
    "upload_chunk_bytes": "largest chunk of an upload, told to nodes when they join; gRPC keeps "
    "about one chunk of read buffer per connected node (4096..1048576)",
    "download_chunk_bytes": "largest tensor part in one download message; smaller parts lower "
    "what gRPC holds for the downloads being sent, at some speed (4096..1048576)",
    "upload_window_bytes": "gRPC receive window per upload stream: an upload moves about "
    "max(this, one chunk) per network round trip, and each node may have the coordinator "
    "buffer about this much; raise it for nodes far away (65536..16777216)",
    "linger_s": "seconds to keep serving after the last round so nodes hear the end",
}


EPILOG = """exit codes:
  0    the run is complete: every round and the final evaluation (also a finished run
       started again)
  1    stopped before the end without a signal: no quorum within quorum_timeout_s, or a
       round gave no usable model 3 times in a row (e.g. updates that overflow)
  2    refused input: a setting, the allow-list, a TLS file, a busy port, a state folder of
       another run or in use by another coordinator
  3    the state folder could not be written (a full disk); state.json keeps the last
       checkpoint
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM (docker stop, systemd): 128 + the signal
Starting it again on the same state folder resumes the run after 1, 3, 130 and 143."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run the coordinator: rounds, FedAvg, federated evaluation",
        description=textwrap.fill(
            "Runs the federation: waits for a quorum of training nodes, sends each round's "
            "global model, folds the nodes' updates into a weighted average as they stream in, "
            "checkpoints after every round, and every few rounds asks every node (the "
            "evaluate-only ones too) to evaluate the model on its own test questions. Nodes always "
            "connect to it; it never connects to them. Settings come from --config (TOML), then "
            f"{ENV_PREFIX}<NAME> environment variables, then these options.",
            88,
        ),  # filled here: RawDescriptionHelpFormatter keeps the epilog's table as written
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML config file (with an [allow_list] table)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the settings, the allow-list (node id -> group) included, and exit",
    )
    add_config_args(p, CoordinatorConfig, HELP)
    p.set_defaults(func=run)


def load(args: argparse.Namespace) -> tuple[CoordinatorConfig, AllowList]:
    """The settings and the allow-list. The config file is read once, for both: a config given
    as a pipe (`--config <(...)`) would be empty, or wait for a new writer, when read again."""
    document = None if args.config is None else read_config_file(args.config)
    cfg = load_config(
        CoordinatorConfig,
        args.config,
        ENV_PREFIX,
        overrides_from_args(args, CoordinatorConfig),
        skip_tables=("allow_list",),
        document=document,
    )
    # the model settings, checked now rather than after the text encoder has loaded (the real
    # check, with the encoder's width, follows in run_coordinator)
    model_config(cfg, GPOConfig.embed_dim)
    if cfg.allow_list_file is not None:
        if document is not None and "allow_list" in document:
            # the file's list would replace the table without a word: with two lists, which
            # one the operator meant is not for the coordinator to guess
            raise InputError(
                f"{args.config}: has an [allow_list] table and allow_list_file names "
                f"{cfg.allow_list_file}: give one allow-list, not both"
            )
        return cfg, AllowList.from_toml(cfg.allow_list_file)
    if document is None:
        raise InputError(
            "no allow-list: give --allow-list-file or an [allow_list] table in --config"
        )
    return cfg, AllowList.from_document(document, args.config)


def run(args: argparse.Namespace) -> int:
    cfg, allow_list = load(args)
    console = make_console(stderr=True)
    if args.print_config:
        print(dump_config(cfg, allow_list))
        try:  # what starting would refuse, said here too
            check_roles(cfg, allow_list)
        except ConfigValueError as err:
            print(f"pluralfed coordinator: warning: {err}", file=sys.stderr)
        return 0
    return run_coordinator(cfg, allow_list, console)
