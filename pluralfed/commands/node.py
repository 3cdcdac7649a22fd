"""`pluralfed node`: run a group node, or check its connection to the coordinator."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import grpc
import torch

from group_node.client import NodeClient, connection_hint
from group_node.config import NodeConfig
from group_node.node import GroupNode
from group_node.worker import GroupWorker
from pluralfed.config import add_config_args, load_config, overrides_from_args
from pluralfed.data import SurveyData, load_survey
from pluralfed.embeddings import CachedEncoder, TextEncoder, default_cache_dir, make_encoder
from pluralfed.errors import STOP_SIGNALS, InputError
from pluralfed.fsutil import owner_hint
from pluralfed.tls import (
    ServerCheckFailed,
    describe_presented_certificate,
    load_revocation_list,
    presented_certificate,
)

ENV_PREFIX = "PLURALFED_NODE_"
MAX_NOTES_LOGGED = 3  # the loader's notes a node logs at start; `data inspect` shows more

log = logging.getLogger("pluralfed.node")

HELP = {
    "coordinator": "coordinator address, host:port (outbound; the only connection a node makes)",
    "group": "the group whose data this node holds (must match its certificate's allow-list entry)",
    "role": "train, or evaluate-only (a held-out group: evaluates, never trains)",
    "data": "the group's survey data: a GlobalOpinionQA CSV or a pluralfed JSONL file",
    "tls_dir": "folder with ca.pem, cert.pem, key.pem from the federation operator",
    "tls_ca": "CA certificate (overrides tls_dir)",
    "tls_cert": "this node's certificate (overrides tls_dir)",
    "tls_key": "this node's private key (overrides tls_dir)",
    "tls_server_name": "name to expect in the coordinator's certificate when it differs from the "
    "host in --coordinator (e.g. connecting by IP)",
    "tls_crl": "the CA's revocation list (crl.pem): refuse a coordinator whose certificate is "
    "in it, checked before every join",
    "insecure": "plain text, no TLS: for debugging only",
    "encoder": "text encoder (must be the federation's)",
    "cache_dir": "embedding cache folder (default: $PLURALFED_CACHE_DIR or ~/.cache/pluralfed)",
    "threads": "torch CPU threads",
    "seed": "seed of this node's episode sampling",
    "poll_wait_s": "how long one task poll waits at the coordinator",
    "backoff_initial_s": "first reconnect delay; doubles up to backoff_max_s",
    "backoff_max_s": "longest reconnect delay",
    "give_up_after_s": "exit if the coordinator stays unreachable this long (default: never)",
    "save_updates_dir": "keep an audit copy of exactly what this node sent, one safetensors "
    "file per round (default: none)",
    "personalize_steps": "after the run: fine-tune the final model this many steps on this "
    "group's own data and save it in personalized_dir, never sent (default: 0, off)",
    "personalized_dir": "where the personalized checkpoint goes (required with personalize_steps)",
}

# the settings `node check` does not use (it neither reads data nor trains nor polls, and does
# not retry: its one Join ends the check): accepted, so `node run`'s command line works with
# `check`, but not listed in `node check --help`. The backoff settings are not here: the check's
# client, like the node's, gives them to gRPC as its reconnect back-off (`NodeClient`).
RUN_ONLY = (
    "data",
    "cache_dir",
    "threads",
    "seed",
    "poll_wait_s",
    "give_up_after_s",
    "save_updates_dir",
    "personalize_steps",
    "personalized_dir",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "node",
        help="run a group node (or check its connection)",
        description="A group node holds one group's private survey data. It embeds the data "
        "locally, connects out to the coordinator over mutual TLS, and for each task trains "
        "from the global model or evaluates it. Only model weights and aggregate metrics leave "
        f"the node. Settings: --config (TOML), then {ENV_PREFIX}<NAME> environment variables, "
        "then options.",
    )
    sub = p.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    run_p = sub.add_parser(
        "run",
        help="join the federation and work until it finishes",
        description="Embed this group's data locally, join the coordinator over mutual TLS and "
        "train or evaluate on every task until the run ends (the coordinator's SHUTDOWN). A "
        "lost connection is retried with back-off; only model weights and aggregate metrics "
        "leave the node. Exit codes: 0 the run finished; 1 the coordinator stayed unreachable "
        "(give_up_after_s), personalization failed or an unexpected error (logged, after "
        "leaving); 2 a setup problem (config, data, no writable temporary folder, "
        "certificate expired or not yet valid, refused by the coordinator, another process "
        "running with this node's certificate); 143 stopped by "
        "SIGTERM, 130 by SIGINT (Ctrl-C), after leaving the federation.",
    )
    check_p = sub.add_parser(
        "check",
        help="TLS handshake and join, without data or training: is this node set up right?",
        description="Connect to the coordinator with this node's certificate and ask it whether "
        "it would admit this node as its group (a check-only join: no session is opened, so a "
        "node already running with this certificate keeps its own), without reading data or "
        "training; on failure say what the error means (address, certificates, allow-list, "
        "role, revocation). Exit 0 when the node is set up right. The settings only `node "
        "run` uses (--data, --threads, ...) are accepted but not used, so a run's config or "
        "command line checks as it is.",
    )
    for q, unused in ((run_p, ()), (check_p, RUN_ONLY)):
        q.add_argument("--config", type=Path, help="TOML config file")
        add_config_args(q, NodeConfig, HELP, hidden=unused)
    run_p.set_defaults(func=run)
    check_p.set_defaults(func=check)


def load(args: argparse.Namespace) -> NodeConfig:
    return load_config(NodeConfig, args.config, ENV_PREFIX, overrides_from_args(args, NodeConfig))


def open_encoder(cfg: NodeConfig) -> TextEncoder:
    return CachedEncoder(make_encoder(cfg.encoder), cfg.cache_dir or default_cache_dir())


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    cfg.data_file()  # required to run
    files = cfg.tls_files()
    if files is not None:  # a bad certificate is found before the data is embedded, not after
        files.channel_credentials()
        if cfg.tls_crl is not None:  # and a bad revocation list (read again at every join)
            load_revocation_list(cfg.tls_crl, files.ca)
    torch.set_num_threads(cfg.threads)
    check_temporary_folder()
    check_output_folders(cfg)
    data = load_survey(cfg.data_file(), groups=[cfg.group])
    log_data_notes(cfg.group, cfg.data_file(), data)
    worker = GroupWorker(cfg.group, data, open_encoder(cfg), seed=cfg.seed)
    node = GroupNode(cfg, worker)
    stop_on_signals(node)
    return node.run()


def check_temporary_folder() -> None:
    """Training needs a writable temporary folder (torch writes its caches there): in a container
    run with --read-only there is none, and the node failed only in its first round, after
    joining (Docker review, session 20)."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError as err:
        raise InputError(
            f"no writable temporary folder ({err}): with `docker run --read-only` add "
            "`--tmpfs /tmp`, or set TMPDIR to a writable folder"
        ) from None


def check_output_folders(cfg: NodeConfig) -> None:
    """The folders the node writes into, made and probed before it loads data or joins: a
    save_updates_dir that could not be written failed every round after training (the update
    thrown away, the round retried at once, both logs flooded), and a personalized_dir only
    after the whole run, the final model not kept."""
    folders = [("save_updates_dir", cfg.save_updates_dir)]
    if cfg.personalize_steps:  # personalized_dir is used only then
        folders.append(("personalized_dir", cfg.personalized_dir))
    for setting, folder in folders:
        if folder is not None:
            check_writable_folder(folder, setting)


def check_writable_folder(folder: Path, setting: str) -> None:
    """Make `folder` if missing and write a probe file in it; InputError naming `setting`."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{setting} {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(
            f"{setting} {folder}: cannot write there ({err.strerror or err}); {owner_hint(folder)}"
        ) from None


def log_data_notes(group: str, path: Path, data: SurveyData) -> None:
    """What loading the group's data skipped or noted (all-zero distributions, repeated
    questions): a partner's file with such rows ran without a word, only `pluralfed data
    inspect` said so."""
    if data.skipped_all_zero:
        log.warning(
            "%s: data %s: skipped %d all-zero distribution(s)", group, path, data.skipped_all_zero
        )
    notes = data.notes
    if notes:
        more = len(notes) - MAX_NOTES_LOGGED
        log.warning(
            "%s: data %s: %d note(s) from loading: %s%s",
            group,
            path,
            len(notes),
            "; ".join(notes[:MAX_NOTES_LOGGED]),
            f"; and {more} more (`pluralfed data inspect {path}` lists them)" if more > 0 else "",
        )


def stop_on_signals(node: GroupNode) -> None:
    """SIGINT/SIGTERM stop `node` at once (`GroupNode.stop`: its run returns 130/143). A second
    signal takes the default action, so a stop that hangs can still be forced."""

    def on_signal(signum: int, _frame: object) -> None:
        # stop() cancels gRPC calls and takes locks the interrupted main thread may hold: not
        # in the handler itself
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        threading.Thread(target=node.stop, args=(signum,), name="stop", daemon=True).start()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def check(args: argparse.Namespace) -> int:
    """Handshake + check-only join with the real identity; report what works and what does
    not. Check-only: a running node with this certificate keeps its session (before, the check
    joined and left, replacing it, and that node's round's work was thrown away)."""
    cfg = load(args)
    encoder = make_encoder(cfg.encoder)
    client = NodeClient(cfg)
    print(f"connecting to {cfg.coordinator} as {cfg.group!r} ...")
    try:
        reply = client.join(
            num_examples=1 if cfg.role == "train" else 0,
            encoder_id=encoder.identity,
            timeout=15,
            check_only=True,
        )
        print(
            f"ok: the coordinator would admit this node (run {reply.run_id}, protocol "
            f"{reply.protocol_version}, coordinator {reply.software_version}); mutual TLS, "
            "allow-list and role accepted it"
        )
        if reply.session_id:  # a coordinator older than check_only opened a session
            try:
                client.leave("connection check")
                left = "left again now"
            except grpc.RpcError as err:  # the check passed: its answer stands
                left = f"which could not be left ({err.code().name}; it expires unused)"
            print(
                "  note: this coordinator does not know check-only joins: it opened a session, "
                f"{left}; a node running with this certificate lost its session to it (it joins "
                "again)"
            )
        return 0
    except grpc.RpcError as err:
        code = err.code()
        details = err.details() or ""
        print(f"FAILED: {code.name}: {details}", file=sys.stderr)
        print(f"  meaning: {failure_meaning(client, cfg, code, details)}", file=sys.stderr)
        if code == grpc.StatusCode.UNAVAILABLE:
            print_presented_certificate(cfg)
        return 1
    except ServerCheckFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        print(
            "  meaning: with tls_crl the node checks the coordinator's certificate in a TLS "
            "handshake of its own (through gRPC's proxy, if any) and does not join unchecked",
            file=sys.stderr,
        )
        return 1
    finally:
        client.close()


def print_presented_certificate(cfg: NodeConfig) -> None:
    """What the coordinator's certificate says, fetched without verifying it, next to what
    this node expects: gRPC says only that it does not verify (another CA or other names)."""
    files = cfg.tls_files()
    if files is None:
        return
    host = cfg.coordinator.rpartition(":")[0].strip("[]")
    dialed = cfg.tls_server_name or host
    try:
        cert = presented_certificate(cfg.coordinator, files, server_name=dialed, timeout_s=10)
    except (OSError, ValueError):
        return  # no TLS server there at all: the meaning above says so
    print("  the coordinator's certificate (not verified, for diagnosis):", file=sys.stderr)
    for line in describe_presented_certificate(cert, files.ca, dialed):
        print(f"    {line}", file=sys.stderr)


GENERIC_MEANINGS = {
    grpc.StatusCode.UNAVAILABLE: "no TLS connection: wrong address or port, firewall, "
    "the coordinator is down, or the certificates do not match (CA, expiry, server name)",
    grpc.StatusCode.PERMISSION_DENIED: "the coordinator does not allow this certificate "
    "for this group: check the allow-list and --group",
    grpc.StatusCode.UNAUTHENTICATED: "the certificate carries no node identity",
    grpc.StatusCode.FAILED_PRECONDITION: "protocol or encoder mismatch with the coordinator",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time: network path or coordinator load",
}


def failure_meaning(
    client: NodeClient, cfg: NodeConfig, code: grpc.StatusCode, details: str
) -> str:
    """What a failed check means: the exact cause when gRPC's details or this node's own
    certificates name it, else what the status code may mean (several causes)."""
    if code == grpc.StatusCode.UNAVAILABLE:
        problem = client.certificate_problem()
        if problem is not None:
            return problem
    if code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details:
        return "the CA revoked this node's certificate: ask the operator for a new one"
    return connection_hint(details, cfg) or GENERIC_MEANINGS.get(code, "see the coordinator log")
