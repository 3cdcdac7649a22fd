"""The systems benchmark's scenarios A-C on Flower's deployment engine, for comparison.

Run with the Flower venv made by bench/flower/setup.sh (flwr 1.22.0: gRPC Fleet API):

    bench/.flower-venv/bin/python bench/flower/run.py [--scenarios A,B,C] [--work /tmp/flower-bench]

Per scenario: a SuperLink (TLS with a CA and server certificate made here; `--ssl-ca-certfile
--ssl-certfile --ssl-keyfile`), N SuperNodes (`--root-certificates ca.pem`, each its own process,
default subprocess isolation: the SuperNode starts the ClientApp), and `flwr run` of a generated
Flower App: a ServerApp with FedAvg (fraction_train=1, min nodes = N, no evaluation) and a
ClientApp that adds a fixed random delta (drawn once per node, cached in a file) to the arrays.
The same workload as bench/systems.py. Flower's TLS is server-authenticated only (its SuperNode
authentication is a separate key mechanism, not used here); pluralfed's is mutual.

Merges into bench/results/systems_flower.json (or --out); `bench/systems.py --report-only` prints the ratios.
`bench/systems.py --flower` runs this itself, each Flower scenario right after pluralfed's, so
that both are measured in one run on the same machine state.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
BIN = Path(sys.executable).parent

SCENARIOS: dict[str, dict[str, int]] = {
    "A": {"nodes": 8, "params": 1_200_000, "rounds": 20},
    "B": {"nodes": 8, "params": 25_000_000, "rounds": 5},
    "C": {"nodes": 32, "params": 1_200_000, "rounds": 10},
}

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "noopbench"
version = "1.0.0"
dependencies = ["flwr", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "pluralfedbench"

[tool.flwr.app.components]
serverapp = "noopbench.server_app:app"
clientapp = "noopbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
num-params = {params}
num-nodes = {nodes}
out-file = "{out}"
delta-dir = "{delta_dir}"

[tool.flwr.federations]
default = "bench"

[tool.flwr.federations.bench]
address = "127.0.0.1:{control_port}"
root-certificates = "{ca}"
"""

COMMON = '''\
import resource
import time
from pathlib import Path

import numpy as np

MATRIX = 512


def synthetic_model(params, seed=0):
    """The same synthetic model as bench/sysbench_common.py: 512x512 float32 matrices + rest."""
    rng = np.random.default_rng(seed)
    per = MATRIX * MATRIX
    out = [
        (rng.standard_normal((MATRIX, MATRIX)) * 0.02).astype(np.float32)
        for _ in range(params // per)
    ]
    if params % per:
        out.append(np.zeros(params % per, np.float32))
    return out


def loopback_bytes():
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return -1


def usage():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"time": time.time(), "cpu": ru.ru_utime + ru.ru_stime,
            "maxrss_mib": ru.ru_maxrss / 1024, "lo_tx": loopback_bytes()}
'''

SERVER_APP = """\
import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from noopbench.common import synthetic_model, usage

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.rounds = []
        self.marks = {}

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 1:
            self.marks["first_round"] = usage()
        self._t0 = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        ok = sum(1 for r in replies if r.has_content())
        self.rounds.append({"round": server_round, "start": self._t0, "end": time.time(),
                            "replies": len(replies), "ok": ok})
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n = int(cfg["num-nodes"])
    start = usage()
    arrays = ArrayRecord(synthetic_model(int(cfg["num-params"])))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                           min_evaluate_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-server-rounds"]),
                   timeout=900)
    end = usage()
    out = Path(cfg["out-file"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rounds": strategy.rounds, "start": start, "end": end,
                               "first_round": strategy.marks.get("first_round")}))
    tmp.replace(out)
"""

CLIENT_APP = '''\
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
_DELTA = {}


def delta_for(node, arrays, scale, folder):
    """Drawn once per node (kept in memory and in a file: the ClientApp may be a new process for
    every message), so "training" is one add per round, as in the pluralfed no-op node."""
    if node in _DELTA:
        return _DELTA[node]
    path = Path(folder) / f"delta-{node}-{sum(a.size for a in arrays)}.npz"
    if path.exists():
        with np.load(path) as z:
            d = [z[f"a{i}"] for i in range(len(arrays))]
    else:
        rng = np.random.default_rng(node + 1)
        d = [(rng.standard_normal(a.shape, np.float32) * scale).astype(a.dtype) for a in arrays]
        np.savez(path, **{f"a{i}": x for i, x in enumerate(d)})
    _DELTA[node] = d
    return d


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    node = int(context.node_config["bench-node"])
    delta = delta_for(node, arrays, 1e-3, context.run_config["delta-dir"])
    new = [a + d for a, d in zip(arrays, delta)]
    content = RecordDict({"arrays": ArrayRecord(new),
                          "metrics": MetricRecord({"num-examples": 100})})
    return Message(content=content, reply_to=msg)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(d: Path) -> dict[str, Path]:
    """CA + server certificate for 127.0.0.1/localhost (EC P-256), with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    if all(p.exists() for p in paths.values()):
        return paths
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("flower bench CA"))
        .issuer_name(name("flower bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("superlink"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def proc_stat(pid: int) -> dict[str, float]:
    """CPU seconds of a process and of its reaped children, and its peak RSS (VmHWM)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        hwm = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        return {}
    ut, st, cut, cst = (int(fields[i]) / tick for i in (11, 12, 13, 14))
    return {"cpu_self": ut + st, "cpu_children": cut + cst, "hwm_mib": hwm}


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out.extend(descendants(int(k)))
    return out


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        # the SuperLink's ServerApp and the SuperNodes' ClientApps are their children: by pid too
        pids = [d for p in self.procs if p.poll() is None for d in descendants(p.pid)]
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()


def run_scenario(name: str, cfg: dict[str, int], work: Path, timeout: float) -> dict[str, Any]:
    wd = work / name
    shutil.rmtree(wd, ignore_errors=True)
    (wd / "app" / "noopbench").mkdir(parents=True)
    (wd / "delta").mkdir()
    certs = make_certs(work / "certs")
    ports = {k: free_port() for k in ("fleet", "serverappio", "control")}
    out = wd / "serverapp.json"
    (wd / "app" / "pyproject.toml").write_text(
        PYPROJECT.format(
            rounds=cfg["rounds"],
            params=cfg["params"],
            nodes=cfg["nodes"],
            out=out,
            delta_dir=wd / "delta",
            control_port=ports["control"],
            ca=certs["ca"],
        )
    )
    pkg = wd / "app" / "noopbench"
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text(COMMON)
    (pkg / "server_app.py").write_text(SERVER_APP)
    (pkg / "client_app.py").write_text(CLIENT_APP)
    env = {
        **os.environ,
        "FLWR_HOME": str(wd / "flwr-home"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    procs = Procs()
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    try:
        link = procs.start(
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(certs["ca"]),
                "--ssl-certfile",
                str(certs["cert"]),
                "--ssl-keyfile",
                str(certs["key"]),
                "--fleet-api-address",
                f"127.0.0.1:{ports['fleet']}",
                "--serverappio-api-address",
                f"127.0.0.1:{ports['serverappio']}",
                "--control-api-address",
                f"127.0.0.1:{ports['control']}",
            ],
            wd / "superlink.log",
            env,
        )
        nodes = []
        for i in range(cfg["nodes"]):
            nodes.append(
                procs.start(
                    [
                        str(BIN / "flower-supernode"),
                        "--root-certificates",
                        str(certs["ca"]),
                        "--superlink",
                        f"127.0.0.1:{ports['fleet']}",
                        "--clientappio-api-address",
                        f"127.0.0.1:{free_port()}",
                        "--node-config",
                        f"bench-node={i}",
                        # its own app folder, as on its own machine: SuperNodes sharing one
                        # FLWR_HOME race installing the same app (JSON read half-written)
                        "--flwr-dir",
                        str(wd / "flwr-nodes" / f"{i:03d}"),
                    ],
                    wd / f"supernode-{i:03d}.log",
                    # and its own FLWR_HOME: flwr 1.22's SuperNode keeps its FAB store under
                    # FLWR_HOME whatever --flwr-dir says, and one node reading a FAB's META file
                    # while another writes it failed C's first round (2 of 32 ClientApps)
                    {**env, "FLWR_HOME": str(wd / "flwr-nodes" / f"{i:03d}")},
                )
            )
        time.sleep(3)
        submit = subprocess.run(
            [str(BIN / "flwr"), "run", str(wd / "app"), "bench"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        (wd / "flwr-run.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed: {(submit.stdout + submit.stderr)[-3000:]}")
        deadline = time.time() + timeout
        while not out.exists():
            if time.time() > deadline:
                raise TimeoutError(f"scenario {name}: no result within {timeout} s")
            if link.poll() is not None:
                raise RuntimeError(f"SuperLink exited {link.returncode}")
            time.sleep(0.5)
        time.sleep(2)  # let the ServerApp process exit and be reaped by the SuperLink
        link_stat = proc_stat(link.pid)
        node_stats = [proc_stat(p.pid) for p in nodes]
    finally:
        procs.stop_all()
    wall = time.time() - t0
    load_after = [round(x, 2) for x in os.getloadavg()]
    s = json.loads(out.read_text())
    rounds = s["rounds"]
    cadence = [r["end"] - (rounds[i - 1]["end"] if i else r["start"]) for i, r in enumerate(rounds)]
    model_bytes = cfg["params"] * 4
    n = cfg["nodes"]
    lo = s["end"]["lo_tx"] - s["first_round"]["lo_tx"] if s.get("first_round") else -1
    complete = len(rounds) == cfg["rounds"] and all(r["ok"] == n for r in rounds)
    return {
        "scenario": name,
        **cfg,
        "flwr_version": _flwr_version(),
        "complete": complete,
        "rounds_done": len(rounds),
        "round_s_median": statistics.median(cadence),
        "round_s_all": [round(x, 3) for x in cadence],
        "total_s": rounds[-1]["end"] - rounds[0]["start"],
        "wall_s_incl_startup": wall,
        "payload_bytes_per_round": 2 * n * model_bytes,
        "loopback_bytes_per_round": lo / len(rounds) if rounds else float("nan"),
        # "coordinator" = SuperLink + its ServerApp subprocess (peaks summed: both live together)
        "superlink_peak_rss_mib": link_stat.get("hwm_mib"),
        "serverapp_peak_rss_mib": s["end"]["maxrss_mib"],
        "coord_peak_rss_mib": (link_stat.get("hwm_mib") or 0) + s["end"]["maxrss_mib"],
        "serverapp_cpu_rounds_s": s["end"]["cpu"] - s["first_round"]["cpu"],
        "superlink_cpu_total_s": link_stat.get("cpu_self"),
        # SuperLink + ServerApp CPU over the whole run, startup included (as coord_cpu_total_s
        # of bench/systems.py)
        "coord_cpu_total_s": (link_stat.get("cpu_self") or 0) + s["end"]["cpu"],
        "nodes_cpu_total_s": sum(
            st.get("cpu_self", 0) + st.get("cpu_children", 0) for st in node_stats
        ),
        "supernode_peak_rss_mib_max": max((st.get("hwm_mib", 0) for st in node_stats), default=0),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def with_last_complete(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """`new` as the scenario's record; a failed or incomplete run also keeps the last complete
    one under `last_complete`, so a failure is recorded without losing the earlier figures."""
    if new.get("complete") or old is None:
        return new
    last = old if old.get("complete") else old.get("last_complete")
    return {**new, "last_complete": last} if last else new


def _flwr_version() -> str:
    import flwr

    return str(flwr.__version__)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenarios", default="A,B,C")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flower-bench"))
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument(
        "--run-id",
        default=None,
        help="the bench/systems.py run this belongs to (set by `bench/systems.py --flower`)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "systems_flower.json",
        help="results to merge into (default: %(default)s; bench/systems.py --flower passes its own)",
    )
    args = ap.parse_args()
    out_json: Path = args.out
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_json.read_text()) if out_json.exists() else {"scenarios": {}}
    for name in [s for s in args.scenarios.split(",") if s]:
        print(f"Flower scenario {name}: {SCENARIOS[name]} (load {os.getloadavg()})", flush=True)
        measured_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        try:
            r = run_scenario(name, SCENARIOS[name], args.work, args.timeout)
        except Exception as err:
            print(f"  FAILED: {err}", flush=True)
            r = {"scenario": name, "complete": False, "error": str(err)}
        r["measured_at"] = measured_at
        r["run_id"] = args.run_id
        results["scenarios"][name] = with_last_complete(r, results["scenarios"].get(name))
        if "error" in r:
            out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
            continue
        print(
            f"  {name}: complete={r['complete']} round {r['round_s_median']:.2f} s, total "
            f"{r['total_s']:.1f} s, SuperLink+ServerApp peak RSS {r['coord_peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
    out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
