"""A group node's settings (`NodeConfig`), checked when made: from its config file, environment
and options alike (`pluralfed.config.load_config`)."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pluralfed.config import MAX_THREADS, ConfigValueError
from pluralfed.errors import InputError
from pluralfed.protocol import MAX_GROUP_NAME
from pluralfed.tls import (
    TlsFiles,
    resolve_tls_files,
)

MAX_PERSONALIZE_STEPS = 100_000
# Sane ranges of the node's timings (seconds). The coordinator caps a poll at 60 s anyway; a
# poll or backoff beyond an hour is a typo, and gRPC refuses deadlines far in the future.
MIN_POLL_WAIT_S, MAX_POLL_WAIT_S = 0.1, 3600.0
MIN_BACKOFF_S, MAX_BACKOFF_S = 0.01, 3600.0
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _refuse(key: str, message: str, *, related: tuple[str, ...] = ()) -> ConfigValueError:
    """A node config error naming `key`, so that `load_config` can say where it was set (file,
    environment variable or option)."""
    return ConfigValueError(key, message, "node config", related=related)


def _check_seconds(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(name, f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise _refuse(name, f"{name} must be {low:g}..{high:g} seconds, got {value!r}")


def check_address(address: str) -> None:
    """Raise InputError unless `address` is host:port or [IPv6]:port, port 1..65535: the
    coordinator address goes to gRPC as a target, which would take anything and fail later."""
    host, colon, port = address.rpartition(":")
    problem = ""
    if not colon:
        problem = "no :port"
    elif not host:
        problem = "no host"
    elif host.startswith("["):
        try:
            if not host.endswith("]"):
                raise ValueError
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            problem = f"{host!r} is not an IPv6 address in brackets"
    elif len(host) > 253 or not _HOSTNAME.fullmatch(host):
        problem = f"{host!r} is not a host name or IPv4 address (IPv6 goes in brackets)"
    if not problem and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        problem = f"port {port!r} is not a number in 1..65535"
    if problem:
        raise _refuse(
            "coordinator",
            f"coordinator must be host:port or [IPv6]:port, got {address!r}: {problem}",
        )


@dataclass
class NodeConfig:
    """Everything a node needs; see `pluralfed node run --help` and docs for each field."""

    coordinator: str = "localhost:7443"
    group: str = ""
    role: str = "train"  # or "evaluate-only"
    data: Path | None = None
    tls_dir: Path | None = None  # folder with ca.pem, cert.pem, key.pem
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None  # expected name in the coordinator's cert, if not the host
    # the CA's revocation list (crl.pem): before every Join the node refuses a coordinator whose
    # certificate is in it (a stolen coordinator key, revoked)
    tls_crl: Path | None = None
    insecure: bool = False
    encoder: str = "all-MiniLM-L6-v2"
    cache_dir: Path | None = None
    threads: int = 1
    seed: int = 0
    poll_wait_s: float = 30.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 15.0
    give_up_after_s: float | None = None  # stop retrying after this long unreachable
    # Audit copy of exactly what the node sends: before each upload, the update's tensors go to
    # <dir>/round-<round>-<task id>.safetensors (one file per TRAIN task, so one per round unless
    # a round is retried), with metadata group, round, task_id, base_model_version, num_examples
    # and digest (the BLAKE3 digest, hex, that the upload's trailer carries). No upload without
    # its copy.
    save_updates_dir: Path | None = None
    # Personalization, node-local: after a finished run, download the final model, fine-tune a
    # copy on this group's own TRAIN questions for this many steps (the run's learning rate and
    # episode sizes, fresh Adam state) and save it as a checkpoint in personalized_dir. Nothing
    # of it is sent anywhere. 0 = off.
    personalize_steps: int = 0
    personalized_dir: Path | None = None

    def data_file(self) -> Path:
        """The group's data file, which running needs (checking the connection does not)."""
        if self.data is None:
            raise InputError(
                "node config: data is required to run (a CSV or JSONL file with the group; "
                "data in the config file, PLURALFED_NODE_DATA or --data)"
            )
        return self.data

    def __post_init__(self) -> None:
        if not self.group.strip():
            raise _refuse("group", "group is required (the group whose data this node holds)")
        if self.role not in ("train", "evaluate-only"):
            raise _refuse("role", f"role must be train or evaluate-only, got {self.role!r}")
        if not self.group.isprintable():
            raise _refuse("group", f"group {self.group!r} holds control characters")
        if len(self.group) > MAX_GROUP_NAME:  # a coordinator would refuse it at Join
            raise _refuse(
                "group",
                f"group is {len(self.group)} characters, more than the {MAX_GROUP_NAME} a group "
                f"name may have ({self.group[:40]!r}...)",
            )
        if self.group != self.group.strip():  # the data and the allow-list name it exactly
            raise _refuse(
                "group",
                f"group {self.group!r} has leading or trailing whitespace; "
                f"remove it ({self.group.strip()!r})",
            )
        if not 1 <= self.threads <= MAX_THREADS:
            raise _refuse("threads", f"threads must be 1..{MAX_THREADS}, got {self.threads}")
        if not 0 <= self.personalize_steps <= MAX_PERSONALIZE_STEPS:
            raise _refuse(
                "personalize_steps",
                f"personalize_steps must be 0..{MAX_PERSONALIZE_STEPS}, got {self.personalize_steps}",
            )
        if self.personalize_steps and self.personalized_dir is None:
            raise _refuse(
                "personalized_dir",
                "personalize_steps is set, so personalized_dir is required (the folder where "
                "the personalized checkpoint is written)",
                related=("personalize_steps",),
            )
        check_address(self.coordinator)
        if self.insecure and self.tls_crl is not None:
            raise _refuse(
                "tls_crl", "tls_crl needs TLS; it cannot go with insecure", related=("insecure",)
            )
        _check_seconds("poll_wait_s", self.poll_wait_s, MIN_POLL_WAIT_S, MAX_POLL_WAIT_S)
        _check_seconds("backoff_initial_s", self.backoff_initial_s, MIN_BACKOFF_S, MAX_BACKOFF_S)
        _check_seconds("backoff_max_s", self.backoff_max_s, MIN_BACKOFF_S, MAX_BACKOFF_S)
        if self.backoff_max_s < self.backoff_initial_s:
            raise _refuse(
                "backoff_max_s",
                f"backoff_max_s ({self.backoff_max_s:g}) must be at least backoff_initial_s "
                f"({self.backoff_initial_s:g})",
                related=("backoff_initial_s",),
            )
        limit = self.give_up_after_s
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not (math.isfinite(limit) and limit > 0)
        ):
            raise _refuse(
                "give_up_after_s",
                "give_up_after_s must be a finite number of seconds > 0 (leave it unset to retry "
                f"forever), got {limit!r}",
            )

    def tls_files(self) -> TlsFiles | None:
        if self.insecure:
            return None
        return resolve_tls_files("node", self.tls_dir, self.tls_ca, self.tls_cert, self.tls_key)
