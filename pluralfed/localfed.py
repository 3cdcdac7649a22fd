"""A whole federation on one machine, as separate processes over mutual TLS on loopback.

What `pluralfed federate` (and `make demo`) runs: it issues a CA and certificates, gives each
node only its own group's data file, starts the coordinator and one process per node, waits for
the run to finish and returns the coordinator's results. Each process is a real `pluralfed`
service, the same as in a deployment; only the addresses are local.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pluralfed.data import SurveyData, group_slug, select_groups, write_group_files
from pluralfed.errors import InputError
from pluralfed.tls import create_ca, issue_node_cert, issue_server_cert

log = logging.getLogger("pluralfed.localfed")


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, flat: dict[str, Any], tables: dict[str, dict[str, Any]]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in flat.items() if v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [
            f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()
        ]
    path.write_text("\n".join(lines) + "\n", "utf-8")


def node_id(group: str) -> str:
    return "node-" + group_slug(group)[:58]


class Processes:
    """The child processes of a run, their logs, and a way to stop them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(out)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.children[name] = proc
        return proc

    def stop_all(self, grace_s: float = 10.0) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + grace_s
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()


def prepare(run: LocalFederation, data: SurveyData) -> dict[str, Any]:
    """Certificates, per-node data files and config files; returns what `start` needs."""
    out = run.out_dir
    groups = [*run.training_groups, *run.held_out_groups]
    if len(set(groups)) != len(groups):
        raise InputError("a group is listed twice (training and held-out must not overlap)")
    subset = select_groups(data, groups)
    certs = out / "certs"
    if not (certs / "ca" / "ca.pem").exists():
        create_ca(certs / "ca")
        issue_server_cert(
            certs / "ca", certs / "coordinator", "coordinator", ["localhost", "127.0.0.1"]
        )
    for g in groups:
        if not (certs / "nodes" / node_id(g) / "cert.pem").exists():
            issue_node_cert(certs / "ca", certs / "nodes" / node_id(g), node_id(g))
    files = write_group_files(subset, out / "data")
    state_dir = out / "coordinator"
    coord_cfg = out / "coordinator.toml"
    settings = {
        "listen": "127.0.0.1:0",
        "state_dir": str(state_dir),
        "encoder": run.encoder,
        "insecure": run.insecure,
        **({} if run.insecure else {"tls_dir": str(certs / "coordinator")}),
        "min_nodes": len(run.training_groups),
        "min_updates": len(run.training_groups),
        **run.coordinator_settings,
    }
    write_toml(coord_cfg, settings, {"allow_list": {node_id(g): g for g in groups}})
    node_cfgs = {}
    for g in groups:
        path = out / "nodes" / f"{node_id(g)}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_toml(
            path,
            {
                "group": g,
                "role": "train" if g in run.training_groups else "evaluate-only",
                "data": str(files[g]),
                "encoder": run.encoder,
                "threads": run.threads_per_node,
                "insecure": run.insecure,
                "tls_server_name": "localhost",
                **({} if run.insecure else {"tls_dir": str(certs / "nodes" / node_id(g))}),
                **({"cache_dir": str(run.cache_dir)} if run.cache_dir else {}),
                **(
                    {
                        "personalize_steps": run.personalize_steps,
                        "personalized_dir": str(out / "personalized" / node_id(g)),
                    }
                    if run.personalize_steps and g in run.training_groups
                    else {}
                ),
            },
            {},
        )
        node_cfgs[g] = path
    return {"coordinator_config": coord_cfg, "node_configs": node_cfgs, "state_dir": state_dir}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        PYTHONUNBUFFERED="1",
    )
    return env


def wait_for_port(state_dir: Path, coordinator: subprocess.Popen[bytes], timeout_s: float) -> int:
    port_file = state_dir / "coordinator.port"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if port_file.exists():
            text = port_file.read_text().strip()
            if text:
                return int(text)
        if coordinator.poll() is not None:
            raise RuntimeError(
                f"the coordinator exited with code {coordinator.returncode} at start"
            )
        time.sleep(0.1)
    raise RuntimeError("the coordinator did not start listening in time")


def run_local(run: LocalFederation, data: SurveyData) -> dict[str, Any]:
    """Run the federation to its end; returns the coordinator's results.json."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    files = prepare(run, data)
    state_dir: Path = files["state_dir"]
    if (state_dir / "state.json").exists():  # coordinator/state.py's STATE_FILE
        log.warning(
            "%s holds an earlier run: the coordinator resumes it (a run already finished only "
            "ends again); for a fresh run use another --out or empty this one",
            state_dir,
        )
    (state_dir / "coordinator.port").unlink(missing_ok=True)
    logs = run.out_dir / "logs"
    logs.mkdir(exist_ok=True)
    procs = Processes(logs)
    cli = [run.python, "-m", "pluralfed.cli"]
    try:
        coordinator = procs.start(
            "coordinator",
            [*cli, "coordinator", "--config", str(files["coordinator_config"])],
            child_env(1),
        )
        port = wait_for_port(state_dir, coordinator, 120)
        for g, cfg in files["node_configs"].items():
            procs.start(
                node_id(g),
                [*cli, "node", "run", "--config", str(cfg), "--coordinator", f"127.0.0.1:{port}"],
                child_env(run.threads_per_node),
            )
        try:
            code = coordinator.wait(run.timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the federation did not finish in {run.timeout_s:.0f} s") from None
        if code != 0:
            raise RuntimeError(
                f"the coordinator exited with code {code}; see {logs / 'coordinator.log'}"
            )
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
    finally:
        procs.stop_all()
    results: dict[str, Any] = json.loads((state_dir / "results.json").read_text("utf-8"))
    return results
