"""A whole federation on one machine, as separate processes over mutual TLS on loopback.

What `pluralfed federate` (and `make demo`) runs: it issues a CA and certificates, gives each
node only its own group's data file, starts the coordinator and one process per node, waits for
the run to finish and returns the coordinator's results. Each process is a real `pluralfed`
service, the same as in a deployment; only the addresses are local.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pluralfed.data import SurveyData, group_slug, select_groups, write_group_files
from pluralfed.errors import STOP_SIGNALS, InputError, signal_exit_code
from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert
from pluralfed.records import describe_record

log = logging.getLogger("pluralfed.localfed")


# coordinator settings the launcher sets itself, and what decides each: `--set` of one of them was
# written into the coordinator's config, and the launcher then watched the wrong folder or port,
# or started nodes the coordinator refused, and reported after 120 s a coordinator that never
# started (inputs review L9)
LAUNCHER_SETTINGS = {
    "listen": "a free loopback port",
    "state_dir": "--out: OUT/coordinator",
    "allow_list": "exactly the nodes it starts",
    "allow_list_file": "exactly the nodes it starts",
    "insecure": "--insecure",
    "tls_dir": "--insecure, or the certificates it issues in OUT/certs",
    "tls_ca": "--insecure, or the certificates it issues in OUT/certs",
    "tls_cert": "--insecure, or the certificates it issues in OUT/certs",
    "tls_key": "--insecure, or the certificates it issues in OUT/certs",
    "encoder": "--encoder, the same for every node",
    "evaluate_only": "--held-out",
}


@dataclass
class LocalFederation:
    """Settings of a local run; `coordinator_settings` are passed on as coordinator TOML keys."""

    out_dir: Path
    training_groups: Sequence[str]
    held_out_groups: Sequence[str] = ()
    coordinator_settings: dict[str, Any] = field(default_factory=dict)
    threads_per_node: int = 1
    encoder: str = "all-MiniLM-L6-v2"
    cache_dir: Path | None = None
    insecure: bool = False
    timeout_s: float = 7200.0
    python: str = sys.executable
    # training nodes fine-tune the final model on their own data after the run and keep it in
    # <out_dir>/personalized/<node id>/ (group nodes' `personalize_steps`); 0 = off
    personalize_steps: int = 0
    # `pluralfed -v` for the coordinator and every node too (debug logging, gRPC core's included)
    verbose: bool = False
    # where each of `coordinator_settings` was given, for messages (`federate`: "--set KEY=VALUE",
    # "--rounds"); one not named here is "coordinator setting KEY"
    setting_sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every node would refuse these at start, once the files were written and the
        # coordinator waited for them
        from group_node.config import MAX_PERSONALIZE_STEPS, MAX_THREADS

        if not 1 <= self.threads_per_node <= MAX_THREADS:
            raise InputError(
                f"threads per node must be 1..{MAX_THREADS}, got {self.threads_per_node}"
            )
        if not 0 <= self.personalize_steps <= MAX_PERSONALIZE_STEPS:
            raise InputError(
                f"personalize steps must be 0..{MAX_PERSONALIZE_STEPS}, got {self.personalize_steps}"
            )
        for key in self.coordinator_settings:
            if key in LAUNCHER_SETTINGS:
                raise InputError(
                    f"coordinator setting {key!r} cannot be changed (--set): a local federation "
                    f"sets it itself, from {LAUNCHER_SETTINGS[key]}"
                )
        check_coordinator_settings(self)

    def source_of(self, key: str) -> str:
        """Where coordinator setting `key` was given, as a message names it."""
        return self.setting_sources.get(key, f"coordinator setting {key}")


def coordinator_settings(run: LocalFederation) -> dict[str, Any]:
    """The coordinator's settings as `prepare` writes them into its config: the launcher's own,
    then `run.coordinator_settings`."""
    return {
        "listen": "127.0.0.1:0",
        "state_dir": str(run.out_dir / "coordinator"),
        "encoder": run.encoder,
        "insecure": run.insecure,
        **({} if run.insecure else {"tls_dir": str(run.out_dir / "certs" / "coordinator")}),
        "min_nodes": len(run.training_groups),
        "min_updates": len(run.training_groups),
        "evaluate_only": list(run.held_out_groups),
        **run.coordinator_settings,
    }


def check_coordinator_settings(run: LocalFederation) -> None:
    """Refuse what the coordinator would refuse at start, before anything is written: a bad
    `--set` was found only once certificates, data and configs were on disk and the coordinator
    had exited. The coordinator's own checks, run as it runs them on its config file (each value
    read by `load_config` from the same text, then its model settings), naming where each bad
    value was given."""
    from coordinator.service import CoordinatorConfig, check_roles, model_config
    from pluralfed.auth import AllowList
    from pluralfed.config import ConfigValueError, load_config, unknown_keys_message
    from pluralfed.model import GPOConfig

    fields = {f.name for f in dataclasses.fields(CoordinatorConfig)}
    unknown = sorted(set(run.coordinator_settings) - fields)
    if unknown:
        where = ", ".join(run.source_of(key) for key in unknown)
        written = {key: key for key in unknown}
        settable = fields - set(LAUNCHER_SETTINGS)  # the others are refused anyway
        raise InputError(f"{where}: {unknown_keys_message(unknown, written, settable)}")
    settings = coordinator_settings(run)
    cfg = load_config(
        CoordinatorConfig,
        None,
        "",
        settings,
        environ={},
        override_sources={key: run.source_of(key) for key in settings},
    )
    try:
        model_config(cfg, GPOConfig.embed_dim)  # as `pluralfed coordinator` checks them at load
    except InputError as err:
        model_keys = {f.name for f in dataclasses.fields(GPOConfig)}
        given = [run.source_of(key) for key in run.coordinator_settings if key in model_keys]
        if not given:
            raise
        raise InputError(f"{', '.join(given)}: {err}") from None
    groups = [*run.training_groups, *run.held_out_groups]
    try:  # the allow-list prepare writes; groups it cannot hold, prepare refuses by their data
        ids = node_ids(groups) if len(set(groups)) == len(groups) else {}
        allow_list = AllowList({nid: g for g, nid in ids.items()}) if ids else None
    except InputError:
        allow_list = None
    if allow_list is not None:
        try:  # as the coordinator checks them at start (min_nodes against the training groups)
            check_roles(cfg, allow_list)
        except ConfigValueError as err:
            given = [key for key in err.keys if key in run.coordinator_settings]
            if not given:
                raise
            raise InputError(f"{run.source_of(given[0])}: {err.message}") from None


def toml_string(text: str) -> str:
    """`text` as a TOML basic string. Not json.dumps: it writes characters beyond U+FFFF as
    surrogate-pair escapes, which TOML refuses, and leaves DEL unescaped, which TOML forbids."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return toml_string(str(value))


def write_toml(path: Path, flat: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in flat.items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [
            f"{toml_string(k)} = {_toml_value(v)}" for k, v in table.items()
        ]
    path.write_text("\n".join(lines) + "\n", "utf-8")


def node_id(group: str) -> str:
    """The node id a group gets when no other group's id collides with it (see `node_ids`)."""
    return "node-" + group_slug(group)[:58]


def node_ids(groups: Iterable[str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """group -> node id, unique even when slugs collide ('Korea, South' and 'Korea South'): as in
    `data.group_file_names`, colliding names (and names whose id is `reserved`, e.g. the
    healthcheck's) get a short hash of the exact name, so no group drops out of the allow-list."""
    names = list(dict.fromkeys(groups))
    taken = set(reserved)
    plain = Counter(node_id(g) for g in names)
    out: dict[str, str] = {}
    for g in names:
        nid = node_id(g)
        if plain[nid] > 1 or nid in taken:
            digest = hashlib.sha256(g.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            nid = f"node-{group_slug(g)[:49]}-{digest}"
        out[g] = nid
    clash = [nid for nid, n in Counter([*out.values(), *taken]).items() if n > 1]
    if clash:  # a hashed id equal to another group's plain one: vanishingly rare, but refuse
        raise InputError(
            f"groups {[g for g in names if out[g] in clash]} get the same node id {clash[0]!r}; "
            "rename one"
        )
    return out


class Stopped(BaseException):
    """SIGTERM or SIGINT told the launcher to stop (see `stop_on_signals`). A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way swallows the stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.signum)


class _SignalState:
    """What `stop_on_signals` saw: the first stop signal, whether `Stopped` was raised for it,
    and how many `_signals_held` blocks are running (a signal waits for the last to end)."""

    received: int | None
    raised: bool
    held: int

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.received, self.raised, self.held = None, False, 0

    def raise_pending(self) -> None:
        if self.received is not None and not self.raised and not self.held:
            self.raised = True
            raise Stopped(self.received)


_signals = _SignalState()


def _on_signal(signum: int, _frame: object) -> None:
    if _signals.received is None:
        _signals.received = signum
    # later signals are ignored: raised in the middle of the cleanup, they would cut it short
    _signals.raise_pending()


# how long a local federation's processes have to exit once it is stopped
STOP_GRACE_S = 5.0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `Stopped` in the main thread, once, so that
    the `finally` of `run_local` stops every process it started. Python's default SIGTERM
    action ends the process without running it: the coordinator and every node were left
    running, orphans still writing into the run's folder. (Outside the main thread, where no
    handler can be set, nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signals.reset()
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signals.reset()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A stop signal in the block is raised at its end: starting a child (it is not yet in
    `Processes.children`, so nothing would stop it) or stopping them all (not to be cut short)."""
    _signals.held += 1
    try:
        yield
    finally:
        _signals.held -= 1
    _signals.raise_pending()


class Processes:
    """The child processes of a run, their logs, and a way to stop them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(out)
        # the log is appended to by every attempt of a run: this line marks where this one's
        # part begins, so that `log_tail` quotes only it (and a reader of the file sees it)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        out.write(f"{ATTEMPT_MARKER}{name} started {stamp} ---\n".encode())
        out.flush()
        with _signals_held():
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            self.children[name] = proc
        return proc

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every child still running, then SIGKILL to those still there after
        `grace_s` (the coordinator's state survives a kill: it writes it atomically)."""
        with _signals_held():
            for proc in self.children.values():
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.time() + grace_s
            for name, proc in self.children.items():
                try:
                    proc.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s: killed", name, grace_s)
                    proc.kill()
                    proc.wait()
            for f in self._logs:
                f.close()


def federation_data(run: LocalFederation, data: SurveyData) -> SurveyData:
    """The groups of `run` from `data`; an unknown or twice-listed group is refused (callers
    check this before writing anything)."""
    groups = [*run.training_groups, *run.held_out_groups]
    if len(set(groups)) != len(groups):
        raise InputError("a group is listed twice (training and held-out must not overlap)")
    return select_groups(data, groups)


def prepare(run: LocalFederation, data: SurveyData) -> dict[str, Any]:
    """Certificates, per-node data files and config files; returns what `start` needs."""
    out = run.out_dir
    groups = [*run.training_groups, *run.held_out_groups]
    subset = federation_data(run, data)
    ids = node_ids(groups)
    certs = out / "certs"
    if not (certs / "ca" / "ca.pem").exists():
        create_ca(certs / "ca")
        issue_server_cert(
            certs / "ca", certs / "coordinator", "coordinator", ["localhost", "127.0.0.1"]
        )
    for g in groups:
        if not (certs / "nodes" / ids[g] / "cert.pem").exists():
            issue_node_cert(certs / "ca", certs / "nodes" / ids[g], ids[g])
    files = write_group_files(subset, out / "data", inputs=[data.source] if data.source else [])
    state_dir = out / "coordinator"
    coord_cfg = out / "coordinator.toml"
    write_toml(coord_cfg, coordinator_settings(run), {"allow_list": {ids[g]: g for g in groups}})
    node_cfgs = {}
    for g in groups:
        path = out / "nodes" / f"{ids[g]}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_toml(
            path,
            {
                "group": g,
                "role": "train" if g in run.training_groups else "evaluate-only",
                # a node seeds its episode sampling from its own config (federation.proto's
                # Hyperparameters.seed), so the run's seed must be written here to reach it
                "seed": int(run.coordinator_settings.get("seed", 0)),
                "data": str(files[g]),
                "encoder": run.encoder,
                "threads": run.threads_per_node,
                "insecure": run.insecure,
                "tls_server_name": "localhost",
                **({} if run.insecure else {"tls_dir": str(certs / "nodes" / ids[g])}),
                **({"cache_dir": str(run.cache_dir)} if run.cache_dir else {}),
                **(
                    {
                        "personalize_steps": run.personalize_steps,
                        "personalized_dir": str(out / "personalized" / ids[g]),
                    }
                    if run.personalize_steps and g in run.training_groups
                    else {}
                ),
            },
            {},
        )
        node_cfgs[g] = path
    return {
        "coordinator_config": coord_cfg,
        "node_configs": node_cfgs,
        "node_ids": ids,
        "state_dir": state_dir,
    }


# the settings variables of `pluralfed coordinator` and `pluralfed node`: they would override the
# configs a local federation writes (a PLURALFED_COORDINATOR_STATE_DIR left exported for a real
# coordinator moved the demo's state folder, and the launcher waited for it in vain)
SETTINGS_ENV_PREFIXES = ("PLURALFED_COORDINATOR_", "PLURALFED_NODE_")


def settings_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The settings variables in `environ` (default: this process's) that children do not get."""
    env = os.environ if environ is None else environ
    return sorted(k for k in env if k.startswith(SETTINGS_ENV_PREFIXES))


def child_env(threads: int) -> dict[str, str]:
    """The environment of a child process: this one's without the settings variables (the
    launcher's configs say everything; `federate --set` changes them), with its thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_ENV_PREFIXES)}
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        PYTHONUNBUFFERED="1",
    )
    return env


# the start of the line `Processes.start` writes into a child's log before starting it
ATTEMPT_MARKER = "--- pluralfed federate: "


def log_tail(path: Path, lines: int = 3, width: int = 400) -> str:
    """The last non-blank lines of a child's log, indented, to quote in an error: the reason a
    process stopped is nearly always there, and it saves opening the file. Only the lines after
    the last `ATTEMPT_MARKER`: the log also holds earlier attempts' errors, no longer true."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError:
        return f"  (cannot read {path})"
    marker = text.rfind("\n" + ATTEMPT_MARKER)
    if marker >= 0 or text.startswith(ATTEMPT_MARKER):
        text = text[marker + 1 :].partition("\n")[2]
    tail = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    if not tail:
        return f"  ({path} is empty)"
    return "\n".join("  " + (t if len(t) <= width else t[:width] + " ...") for t in tail)


def _exited(what: str, code: int, log_path: Path | None) -> InputError:
    if log_path is None:
        return InputError(f"{what} exited with code {code}")
    return InputError(
        f"{what} exited with code {code}; the end of {log_path}:\n{log_tail(log_path)}"
    )


def wait_for_port(
    state_dir: Path,
    coordinator: subprocess.Popen[bytes],
    timeout_s: float,
    log_path: Path | None = None,
) -> int:
    """The port the coordinator listens on; InputError quoting `log_path` if it exits first."""
    port_file = state_dir / "coordinator.port"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if port_file.exists():
            text = port_file.read_text().strip()
            if text:
                return int(text)
        if coordinator.poll() is not None:
            raise _exited("the coordinator", coordinator.returncode, log_path)
        time.sleep(0.1)
    raise InputError(
        f"the coordinator did not start listening in {timeout_s:.0f} s"
        + (f"; the end of {log_path}:\n{log_tail(log_path)}" if log_path else "")
    )


# once too few training nodes are left, how long the coordinator may still take to exit by itself
# (a node whose personalization fails exits 1 after a finished run, just before the coordinator)
NODES_FAILED_GRACE_S = 5.0


class Progress:
    """Logs each round and evaluation as the coordinator records them (its metrics.jsonl):
    without it a local federation ran for minutes without a word. Rows already there when it
    starts (a resumed run's) are not repeated."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "metrics.jsonl"
        self._stamp: int | None = None
        self._seen: set[tuple[str, int, str]] = set()
        self.poll(quiet=True)

    def poll(self, *, quiet: bool = False) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp == self._stamp:
                return
            rows = [json.loads(line) for line in self.path.read_text("utf-8").splitlines()]
        except (OSError, ValueError):  # not written yet, or being replaced: the next poll
            return
        self._stamp = stamp
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                continue
            # an evaluation of a finished run made again replaces the old row of its round
            key = (str(row.get("kind")), row["round"], str(row.get("seconds")))
            if key in self._seen:
                continue
            self._seen.add(key)
            if not quiet:
                log.info("%s", describe_record(row))


def wait_for_coordinator(
    procs: Processes,
    training: Sequence[str],
    state_dir: Path,
    timeout_s: float,
    started: float,
    quorum: int | None = None,
    progress: Progress | None = None,
) -> int:
    """The coordinator's exit code. Without a quorum of training nodes (`quorum`, the
    coordinator's min_nodes; default: all of them) the coordinator would wait until the timeout,
    so once so many have exited with an error that the rest are fewer than the quorum (and no
    results were written since `started`, a time.time()) this stops, quoting the first failed
    one's log."""
    coordinator = procs.children["coordinator"]
    needed = len(training) if quorum is None else quorum
    deadline = time.monotonic() + timeout_s
    failed_since: float | None = None
    reported: list[str] = []
    while True:
        code = coordinator.poll()
        if code is not None:
            return code
        now = time.monotonic()
        codes = {n: procs.children[n].poll() for n in training}
        for name, node_code in codes.items():
            if node_code and name not in reported:
                reported.append(name)
                log.warning(
                    "node %s exited with code %d:\n%s",
                    name,
                    node_code,
                    log_tail(procs.log_dir / f"{name}.log", 1),
                )
        failed = [n for n in reported if codes[n]]
        if (
            failed
            and len(training) - len(failed) < needed
            and not _results_since(state_dir, started)
        ):
            failed_since = failed_since or now
            if now - failed_since >= NODES_FAILED_GRACE_S:
                name = failed[0]
                what = (
                    "every training node stopped before the run finished"
                    if len(failed) == len(training)
                    else f"{len(failed)} of {len(training)} training nodes stopped, and the "
                    f"other {len(training) - len(failed)} are fewer than the coordinator's "
                    f"quorum of {needed} (min_nodes): the run cannot finish"
                )
                raise _exited(
                    f"{what}: node {name}", codes[name] or 0, procs.log_dir / f"{name}.log"
                )
        if now >= deadline:
            coord_log = procs.log_dir / "coordinator.log"
            raise InputError(
                f"the federation did not finish in {timeout_s:.0f} s (--timeout); the end of "
                f"{coord_log}:\n{log_tail(coord_log)}"
            )
        if progress is not None:
            progress.poll()
        time.sleep(0.2)


def _results_since(state_dir: Path, started: float) -> bool:
    """Did the coordinator write results.json (the run finished) after `started`?"""
    try:
        return (state_dir / "results.json").stat().st_mtime >= started
    except OSError:
        return False


def run_local(run: LocalFederation, data: SurveyData) -> dict[str, Any]:
    """Run the federation to its end; returns the coordinator's results.json."""
    started = time.time()
    run.out_dir.mkdir(parents=True, exist_ok=True)
    files = prepare(run, data)
    ids: dict[str, str] = files["node_ids"]
    state_dir: Path = files["state_dir"]
    if (state_dir / "state.json").exists():  # coordinator/state.py's STATE_FILE
        log.warning(
            "%s holds an earlier run: the coordinator resumes it (a run already finished is "
            "only evaluated again); for a fresh run use another --out or empty this one",
            state_dir,
        )
    (state_dir / "coordinator.port").unlink(missing_ok=True)
    logs = run.out_dir / "logs"
    logs.mkdir(exist_ok=True)
    procs = Processes(logs)
    cli = [run.python, "-m", "pluralfed.cli", *(["-v"] if run.verbose else [])]
    try:
        coordinator = procs.start(
            "coordinator",
            [*cli, "coordinator", "--config", str(files["coordinator_config"])],
            child_env(1),
        )
        port = wait_for_port(state_dir, coordinator, 120, logs / "coordinator.log")
        for g, cfg in files["node_configs"].items():
            procs.start(
                ids[g],
                [*cli, "node", "run", "--config", str(cfg), "--coordinator", f"127.0.0.1:{port}"],
                child_env(run.threads_per_node),
            )
        training = [ids[g] for g in run.training_groups]
        quorum = run.coordinator_settings.get("min_nodes", len(training))
        code = wait_for_coordinator(
            procs,
            training,
            state_dir,
            run.timeout_s,
            started,
            quorum=quorum if isinstance(quorum, int) else None,
            progress=Progress(state_dir),
        )
        if code != 0:
            raise _exited("the coordinator", code, logs / "coordinator.log")
        # nodes that personalize fine-tune after the coordinator is gone: give them time
        grace_s = 30.0 + (run.timeout_s if run.personalize_steps else 0.0)
        for name, proc in procs.children.items():
            if name != "coordinator":
                try:
                    node_code = proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("node %s did not exit after the run", name)
                    continue
                if node_code != 0:
                    log.warning(
                        "node %s exited with code %d; see %s", name, node_code, logs / f"{name}.log"
                    )
    except Stopped as stop:
        log.warning(
            "%s: stopping the coordinator and the nodes (%d processes)", stop, len(procs.children)
        )
        procs.stop_all(STOP_GRACE_S)
        raise
    finally:
        procs.stop_all()
    results: dict[str, Any] = json.loads((state_dir / "results.json").read_text("utf-8"))
    return results
