"""Systems-cost benchmark of the pluralfed federation runtime (no real training).

Every node's "training" adds a fixed random delta to the weights; FedAvg over all nodes; mutual
TLS; coordinator and nodes are separate processes on 127.0.0.1. Scenarios:

    A  8 nodes, 1.2M parameters, 20 rounds     (one node per process)
    B  8 nodes, 25M parameters, 5 rounds       (one node per process)
    C  32 nodes, 1.2M parameters, 10 rounds    (one node per process)
    D  256 nodes, 1.2M parameters, 3 rounds    (32 node threads per process)

plus the floor: raw gRPC mutual-TLS loopback throughput (bench/raw_grpc.py) for one model's bytes
and for all uploads of one round in one client-streaming RPC.

    .venv/bin/python bench/systems.py                      # raw + A B C D
    .venv/bin/python bench/systems.py --scenarios A,C      # a subset (merged into the results)
    .venv/bin/python bench/systems.py --report-only        # re-print, merge bench/flower results
    .venv/bin/python bench/systems.py --flower             # and Flower's A-C in the same run

--flower runs bench/flower/run.py (in the venv bench/flower/setup.sh makes) for each of A, B, C
right after pluralfed's, so both systems are measured in one run on the same machine state; the
report says, per scenario, when each side was measured and whether in the same run.

Merges into bench/results/systems.json and systems.md (the committed results; Flower's side in
systems_flower.json beside them); for a trial run, `--out /tmp/trial` writes /tmp/trial.json,
/tmp/trial.md and /tmp/trial_flower.json instead. A run with --no-raw sets its scenarios against
the raw stream already recorded there; the details say when that was measured. Every process is
started here, bounded by a timeout, and killed by its pid at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import node_ids, pki

HERE = Path(__file__).resolve().parent
PY = sys.executable
RESULTS = HERE / "results"
FLOWER_JSON = RESULTS / "systems_flower.json"
FLOWER_PYTHON = HERE / ".flower-venv" / "bin" / "python"

SCENARIOS: dict[str, dict[str, int]] = {
    "A": {"nodes": 8, "params": 1_200_000, "rounds": 20, "per_proc": 1},
    "B": {"nodes": 8, "params": 25_000_000, "rounds": 5, "per_proc": 1},
    "C": {"nodes": 32, "params": 1_200_000, "rounds": 10, "per_proc": 1},
    "D": {"nodes": 256, "params": 1_200_000, "rounds": 3, "per_proc": 32},
}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Procs:
    """Children started here; each stopped by its own pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()


def wait_file(path: Path, timeout: float, procs: list[subprocess.Popen[bytes]]) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"a process died before {path} appeared")
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def cpu(u: dict[str, Any]) -> float:
    return float(u["utime"] + u["stime"])


# ------------------------------------------------------------------------------------------------
# raw gRPC


def run_raw(work: Path, pkidir: Path, sizes: list[int], timeout: float) -> dict[int, dict]:
    procs = Procs()
    port_file = work / "raw.port"
    port_file.unlink(missing_ok=True)
    try:
        server = procs.start(
            [
                PY,
                str(HERE / "raw_grpc.py"),
                "server",
                "--pki",
                str(pkidir),
                "--port-file",
                str(port_file),
                "--seconds",
                str(timeout),
            ],
            work / "raw-server.log",
        )
        port = wait_file(port_file, 60, [server])
        out = work / "raw.json"
        argv = [PY, str(HERE / "raw_grpc.py"), "client", "--pki", str(pkidir), "--port", port]
        argv += ["--sizes", ",".join(map(str, sizes)), "--repeat", "3", "--out", str(out)]
        client = procs.start(argv, work / "raw-client.log")
        client.wait(timeout)
        if client.returncode != 0:
            raise RuntimeError(
                f"raw client failed: {(work / 'raw-client.log').read_text()[-2000:]}"
            )
        return {r["bytes"]: r for r in json.loads(out.read_text())["results"]}
    finally:
        procs.stop_all()


# ------------------------------------------------------------------------------------------------
# one scenario


def run_scenario(
    name: str,
    cfg: dict[str, int],
    work: Path,
    pkidir: Path,
    timeout: float,
    coord_args: list[str] | None = None,
    rtt_ms: float = 0.0,
) -> dict[str, Any]:
    """Run one scenario: bench_coordinator.py and no-op node processes. With rtt_ms > 0 the
    nodes reach the coordinator through bench/delay_proxy.py (half the round trip each way)."""
    wd = work / name
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    state = wd / "state"
    ids = node_ids(cfg["nodes"])
    procs = Procs()
    load_before = loadavg()
    t_start = time.time()
    try:
        coord = procs.start(
            [
                PY,
                str(HERE / "bench_coordinator.py"),
                "--params",
                str(cfg["params"]),
                "--nodes",
                str(cfg["nodes"]),
                "--rounds",
                str(cfg["rounds"]),
                "--pki",
                str(pkidir),
                "--state-dir",
                str(state),
                "--out",
                str(wd / "coordinator.json"),
                *(coord_args or []),
            ],
            wd / "coordinator.log",
        )
        port = wait_file(state / "coordinator.port", 120, [coord])
        if rtt_ms > 0:
            proxy = procs.start(
                [
                    PY,
                    str(HERE / "delay_proxy.py"),
                    "--target-port",
                    port,
                    "--one-way-ms",
                    str(rtt_ms / 2),
                    "--port-file",
                    str(wd / "proxy.port"),
                ],
                wd / "proxy.log",
            )
            port = wait_file(wd / "proxy.port", 60, [coord, proxy])
        node_procs = []
        per = cfg["per_proc"]
        for k in range(0, len(ids), per):
            group = ids[k : k + per]
            argv = [PY, str(HERE / "noop_node.py"), "--port", port, "--pki", str(pkidir)]
            argv += ["--ids", ",".join(group), "--out", str(wd / f"nodes-{k:04d}.json")]
            argv += ["--timeout", str(timeout)]
            node_procs.append(procs.start(argv, wd / f"nodes-{k:04d}.log"))
        try:
            coord.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"scenario {name} did not finish within {timeout} s") from None
        for p in node_procs:
            p.wait(max(1.0, 60 - 0))
        if coord.returncode != 0:
            raise RuntimeError(f"coordinator exited {coord.returncode}; see {wd}/coordinator.log")
    finally:
        procs.stop_all()
    load_after = loadavg()
    wall = time.time() - t_start
    c = json.loads((wd / "coordinator.json").read_text())
    node_files = sorted(wd.glob("nodes-*.json"))
    nodes = [json.loads(f.read_text()) for f in node_files]
    return summarize(name, cfg, c, nodes, wall, load_before, load_after)


def summarize(
    name: str,
    cfg: dict[str, int],
    c: dict[str, Any],
    nodes: list[dict[str, Any]],
    wall: float,
    load_before: list[float],
    load_after: list[float],
) -> dict[str, Any]:
    hist = c["history"]
    model_bytes = c["model_bytes"]
    n = cfg["nodes"]
    round_start = [r["finished_at"] - r["seconds"] for r in hist]
    cadence = [
        r["finished_at"] - (hist[i - 1]["finished_at"] if i else round_start[0])
        for i, r in enumerate(hist)
    ]
    payload_round = [r["bytes_in"] + r["bytes_out_model"] for r in hist]
    complete = (
        all(r["n_participants"] == n == r["n_selected"] for r in hist)
        and len(hist) == cfg["rounds"]
    )
    errors = [
        f"{nid}: {v['error']}"
        for f in nodes
        for nid, v in f["nodes"].items()
        if v["error"] or not v["done"]
    ]
    # per-round transfer phases, from the nodes' own clocks (same machine)
    per_round: dict[int, list[dict[str, Any]]] = {}
    for f in nodes:
        for v in f["nodes"].values():
            for r in v["rounds"]:
                per_round.setdefault(r["round"], []).append(r)
    up_agg: list[float] = []
    # node CPU per 100 MB moved, from processes that run one node (their CPU is that node's)
    cpu_down: list[float] = []
    cpu_up: list[float] = []
    up_single: list[float] = []
    dl_agg: list[float] = []
    for recs in per_round.values():
        total = sum(r["bytes"] for r in recs)
        up_agg.append(total / (max(r["up_end"] for r in recs) - min(r["up_start"] for r in recs)))
        dl_agg.append(total / (max(r["dl_end"] for r in recs) - min(r["dl_start"] for r in recs)))
        up_single.extend(r["bytes"] / (r["up_end"] - r["up_start"]) for r in recs)
        if cfg["per_proc"] == 1:
            cpu_down.extend(
                r["cpu_download_s"] * 1e8 / r["bytes"] for r in recs if "cpu_download_s" in r
            )
            cpu_up.extend(r["cpu_upload_s"] * 1e8 / r["bytes"] for r in recs if "cpu_upload_s" in r)
    cu = c["usage"]
    node_cpu_run = sum(cpu(f["end"]) - cpu(f["joined"]) for f in nodes)
    node_cpu_total = sum(cpu(f["end"]) for f in nodes)
    # loopback TX bytes from the coordinator's "listening" to "all rounds done" snapshots
    wire = cu["rounds_done"].get("lo_tx", -1) - cu["ready"].get("lo_tx", -1)
    payload_total = sum(payload_round)
    rounds = len(hist)
    # all the CPU the federation spent in its rounds (coordinator + every node process): on a
    # machine of C cores no round can be shorter than its share of it divided by C
    cpu_rounds = cpu(cu["rounds_done"]) - cpu(cu["ready"]) + node_cpu_run
    return {
        "scenario": name,
        **cfg,
        "model_bytes": model_bytes,
        "tensors": c["tensors"],
        "complete": complete and not errors,
        "errors": errors[:10],
        "rounds_done": rounds,
        "round_s_median": median(cadence),
        "round_s_engine_median": median([r["seconds"] for r in hist]),
        "round_s_all": [round(x, 3) for x in cadence],
        "total_s": hist[-1]["finished_at"] - round_start[0] if hist else float("nan"),
        "wall_s_incl_startup": wall,
        "payload_bytes_per_round": median(payload_round),
        "socket_bytes_per_round": wire / rounds if rounds else float("nan"),
        "socket_over_payload": wire / payload_total if payload_total else float("nan"),
        "upload_MBps_aggregate_median": median(up_agg) / 1e6,
        "upload_MBps_single_median": median(up_single) / 1e6,
        "download_MBps_aggregate_median": median(dl_agg) / 1e6,
        "coord_peak_rss_mib": cu["end"]["maxrss_mib"],
        "coord_rss_after_imports_mib": cu["after_imports"]["rss_mib"],
        # baseline: RSS once started up and listening, before any round (model loaded)
        "coord_rss_ready_mib": cu["ready"]["rss_mib"],
        "coord_peak_over_ready_mib": cu["end"]["maxrss_mib"] - cu["ready"]["rss_mib"],
        "bound_4x_model_mib": 4 * model_bytes / 2**20,
        "max_concurrent_uploads": c.get("max_concurrent_uploads", "n/a"),
        "upload_chunk_bytes": c.get("upload_chunk_bytes", 1 << 20),
        "download_chunk_bytes": c.get("download_chunk_bytes", 1 << 20),
        "upload_window_bytes": c.get("upload_window_bytes", 64 << 10),
        "max_concurrent_downloads": c.get("max_concurrent_downloads", "none"),
        "coord_cpu_rounds_s": cpu(cu["rounds_done"]) - cpu(cu["ready"]),
        "coord_cpu_total_s": cpu(cu["end"]),
        "coord_threads_end": cu["rounds_done"]["threads"],
        "max_workers": c["max_workers"],
        "node_procs": len(nodes),
        "nodes_cpu_run_s": node_cpu_run,
        "nodes_cpu_total_s": node_cpu_total,
        "node_cpu_per_node_round_s": node_cpu_run / (n * rounds) if rounds else float("nan"),
        "node_cpu_download_s_per_100MB": median(cpu_down) if cpu_down else float("nan"),
        "node_cpu_upload_s_per_100MB": median(cpu_up) if cpu_up else float("nan"),
        "cpu_s_per_round": cpu_rounds / rounds if rounds else float("nan"),
        "cpu_floor_s": cpu_rounds / rounds / (os.cpu_count() or 1) if rounds else float("nan"),
        "cpu_s_per_GB": cpu_rounds / (payload_total / 1e9) if payload_total else float("nan"),
        "node_proc_peak_rss_mib_max": max(f["end"]["maxrss_mib"] for f in nodes),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


# ------------------------------------------------------------------------------------------------
# report


def attach_raw(s: dict[str, Any], raw: dict[int, dict[str, Any]]) -> None:
    one = raw.get(s["model_bytes"])
    rnd = raw.get(s["model_bytes"] * s["nodes"])
    if rnd and "run_id" in rnd:  # a --no-raw run is set against an earlier raw stream: say so
        same = rnd["run_id"] == s.get("run_id")
        s["raw_measured"] = f"{rnd.get('measured_at', '?')}" + (
            " (same run)" if same else " (an earlier run)"
        )
    if one:
        s["raw_MBps_one_model"] = one["best_MBps"]
        s["upload_single_frac_of_raw"] = s["upload_MBps_single_median"] / one["best_MBps"]
    if rnd:
        s["raw_MBps_round_uploads"] = rnd["best_MBps"]
        s["raw_s_round_uploads"] = rnd["best_s"]
        s["upload_agg_frac_of_raw"] = s["upload_MBps_aggregate_median"] / rnd["best_MBps"]
        # the round moves the model down to every node and every update up: 2 x n x model bytes
        if "cpu_s_per_GB" in rnd and "cpu_s_per_GB" in s:  # raw runs before session 15 lack it
            s["raw_cpu_s_per_GB"] = rnd["cpu_s_per_GB"]
            s["cpu_x_raw"] = s["cpu_s_per_GB"] / rnd["cpu_s_per_GB"]
        raw_round_s = s["payload_bytes_per_round"] / (rnd["best_MBps"] * 1e6)
        s["raw_s_round_bytes"] = raw_round_s
        s["round_x_raw"] = s["round_s_median"] / raw_round_s


def node_cpu_per_100mb(s: dict[str, Any]) -> str:
    down = s.get("node_cpu_download_s_per_100MB", float("nan"))
    up = s.get("node_cpu_upload_s_per_100MB", float("nan"))
    if math.isnan(down) or math.isnan(up):
        return "per 100 MB: n/a, several nodes per process"
    return f"per 100 MB: download {down:.2f} s, upload {up:.2f} s of node CPU"


def fmt(x: Any, nd: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


COLUMNS = [
    ("scenario", "scen", 0),
    ("nodes", "nodes", 0),
    ("params", "params", 0),
    ("rounds_done", "rounds", 0),
    ("complete", "all in", 0),
    ("round_s_median", "round s (med)", 2),
    ("total_s", "total s", 1),
    ("payload_bytes_per_round", "payload MB/round", 1),
    ("socket_bytes_per_round", "socket MB/round", 1),
    ("coord_rss_ready_mib", "coord RSS ready MiB", 0),
    ("coord_peak_rss_mib", "coord peak RSS MiB", 0),
    ("coord_peak_over_ready_mib", "peak - ready MiB", 0),
    ("bound_4x_model_mib", "4 x model MiB", 1),
    ("coord_cpu_rounds_s", "coord CPU s", 1),
    ("nodes_cpu_run_s", "nodes CPU s", 1),
    ("upload_MBps_aggregate_median", "upload MB/s (agg)", 0),
    ("upload_agg_frac_of_raw", "upload / raw", 2),
    ("round_x_raw", "round / raw", 1),
    ("cpu_s_per_round", "CPU s/round (all)", 2),
    ("cpu_floor_s", "CPU floor s", 2),
    ("cpu_x_raw", "CPU/GB / raw", 1),
    ("loadavg_before", "load before", 0),
]


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> str:
    def cell(r: dict[str, Any], key: str, nd: int) -> str:
        v = r.get(key, "")
        if key in ("payload_bytes_per_round", "socket_bytes_per_round") and v != "":
            v = v / 1e6
        if key == "params":
            return f"{v / 1e6:.1f}M"
        if isinstance(v, list):
            return "/".join(f"{x:.1f}" for x in v)
        return fmt(v, nd)

    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(cell(r, k, nd) for k, _, nd in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


FLOWER_KEYS = {
    "round_s_median": "round s",
    "total_s": "total s",
    "coord_peak_rss_mib": "server peak RSS MiB",
    "coord_cpu_total_s": "server CPU s",
    "nodes_cpu_total_s": "nodes CPU s",
}


def flower_ratios(
    results: dict[str, Any], flower_json: Path | None = None
) -> tuple[str, list[dict[str, Any]]]:
    flower_json = flower_json or FLOWER_JSON
    if not flower_json.exists():
        return "", []
    fl = json.loads(flower_json.read_text())
    rows = []
    for name, f in sorted(fl.get("scenarios", {}).items()):
        p = results["scenarios"].get(name)
        if not p or not f.get("complete"):
            note = f.get("error", "incomplete" if f else "missing")
            last = f.get("last_complete")
            if last:  # the failure is this run's record; say what the last complete run measured
                note += (
                    f" (last complete Flower run {last.get('measured_at', '?')}: "
                    f"{last.get('round_s_median', float('nan')):.2f} s per round)"
                )
            rows.append({"scenario": name, "note": note})
            continue
        row = {"scenario": name}
        for key in FLOWER_KEYS:
            row[f"pluralfed_{key}"] = p.get(key)
            row[f"flower_{key}"] = f.get(key)
            if p.get(key) and f.get(key):
                row[f"ratio_{key}"] = p[key] / f[key]
        rows.append(row)
    cols = [("scenario", "scen", 0)]
    for row in rows:
        f, p = fl["scenarios"][row["scenario"]], results["scenarios"].get(row["scenario"], {})
        same = p.get("run_id") is not None and p.get("run_id") == f.get("run_id")
        row["measured"] = f"{p.get('measured_at', '?')} / {f.get('measured_at', '?')}" + (
            " (same run)" if same else " (separate runs)"
        )
    cols.append(("measured", "measured: pluralfed / Flower", 0))
    for key, label in FLOWER_KEYS.items():
        cols += [
            (f"pluralfed_{key}", f"pluralfed {label}", 2),
            (f"flower_{key}", f"Flower {label}", 2),
            (f"ratio_{key}", "pf/Flower", 2),
        ]
    return table(rows, cols), rows


def report(results: dict[str, Any], flower_json: Path | None = None) -> str:
    flower_json = flower_json or FLOWER_JSON
    order = [results["scenarios"][k] for k in sorted(results["scenarios"])]
    for s in order:
        raw: dict[int, dict[str, Any]] = {int(k): v for k, v in results.get("raw", {}).items()}
        attach_raw(s, raw)
    raw_rows = [
        {"bytes": int(k), **v}
        for k, v in sorted(results.get("raw", {}).items(), key=lambda x: int(x[0]))
    ]
    lines = [
        "# pluralfed systems cost (no-op training, mutual TLS, loopback, separate processes)",
        "",
        f"Machine: {os.cpu_count()} cores; load average before/after each run is in the table "
        "(other jobs may be running). Per-round time is the median round-to-round cadence "
        "(round open to aggregated + checkpointed); total = first round open to last round done. "
        "Payload = model bytes down + updates up per round; socket = bytes the node processes "
        "sent over the loopback interface (machine-wide /proc/net/dev; TCP/IP, TLS, HTTP/2, "
        "protobuf, joins, polls, heartbeats included).",
        "",
        table(order, COLUMNS),
        "",
        "Raw gRPC mutual-TLS loopback, one client-streaming RPC of 1 MiB messages (best of 3):",
        "",
        table(
            raw_rows,
            [
                ("bytes", "bytes", 0),
                ("best_s", "seconds", 3),
                ("best_MBps", "MB/s", 0),
                ("client_cpu_s_per_GB", "client CPU s/GB", 2),
                ("server_cpu_s_per_GB", "server CPU s/GB", 2),
            ],
        ),
        "",
        "CPU: `CPU s/round (all)` is what the coordinator and every node process spent per round "
        f"(their CPU from ready to done over the rounds); `CPU floor s` is that over the {os.cpu_count()} "
        "cores, a round time no scheduling can beat with this much work per round; `CPU/GB / "
        "raw` sets the CPU per GB moved against the raw stream's (client + server, the round's "
        "bytes in one stream). Node CPU includes the no-op training (one vector add per round).",
    ]
    fl_table, fl_rows = flower_ratios(results, flower_json)
    results["flower_ratios"] = fl_rows
    if fl_table:
        fl = json.loads(flower_json.read_text())["scenarios"]
        version = next((f["flwr_version"] for f in fl.values() if "flwr_version" in f), "?")
        lines += ["", "pluralfed vs Flower (same workload; ratio < 1: pluralfed is cheaper):", ""]
        lines += [fl_table, ""]
        lines += [
            f"Flower: flwr {version} deployment engine (bench/flower/run.py): SuperLink + one "
            "SuperNode process per node over the gRPC Fleet API (grpc-rere) with server-side TLS "
            "(CA + server certificate, --root-certificates; no client certificates), default "
            "subprocess isolation (the SuperLink starts the ServerApp, each SuperNode its "
            "ClientApp), FedAvg(fraction_train=1, no evaluation). Its server side is SuperLink + "
            "ServerApp (peak RSS summed, CPU summed incl. startup; pluralfed's coord CPU here is "
            "also incl. startup); nodes CPU = SuperNodes + their ClientApp children. In flwr "
            "1.22 the ServerApp's Grid polls for replies every 3 s and an idle SuperNode polls "
            "for messages every 3 s, so a Flower round has a latency floor of several seconds "
            "whatever the model size.",
            "",
            "| scen | Flower loopback MB/round | payload MB/round | Flower load before |",
            "|---|---|---|---|",
        ]
        for name, f in sorted(fl.items()):
            if f.get("complete"):
                lines.append(
                    f"| {name} | {f['loopback_bytes_per_round'] / 1e6:.1f} | "
                    f"{f['payload_bytes_per_round'] / 1e6:.1f} | "
                    f"{'/'.join(str(x) for x in f['loadavg_before'])} |"
                )
        lines += [
            "",
            "(Flower's loopback bytes include its extra local hops, ServerApp<->SuperLink and "
            "SuperNode<->ClientApp; pluralfed's ~1.00x payload is the wire alone.)",
        ]
    extra = []
    for s in order:
        extra.append(
            f"- {s['scenario']}: {s['node_procs']} node processes, coordinator max_workers "
            f"{s['max_workers']}, max_concurrent_uploads {s.get('max_concurrent_uploads', 'n/a')}, "
            f"upload chunks {s.get('upload_chunk_bytes', 1 << 20) // 1024} KiB, "
            f"download chunks {s.get('download_chunk_bytes', 1 << 20) // 1024} KiB, "
            f"upload window {s.get('upload_window_bytes', 64 << 10) // 1024} KiB, "
            f"max_concurrent_downloads {s.get('max_concurrent_downloads', 'none')}, "
            f"coordinator RSS after imports {s['coord_rss_after_imports_mib']:.0f}"
            f" MiB, node CPU per "
            f"node-round {s['node_cpu_per_node_round_s'] * 1000:.0f} ms ({node_cpu_per_100mb(s)}), "
            f"socket/payload "
            f"{s['socket_over_payload']:.3f}, single-upload {s['upload_MBps_single_median']:.0f} "
            f"MB/s ({s.get('upload_single_frac_of_raw', float('nan')):.2f} of raw), per-round "
            f"times {s['round_s_all']}"
            + (f"; raw stream measured {s['raw_measured']}" if "raw_measured" in s else "")
            + (f"; ERRORS: {s['errors']}" if s["errors"] else "")
        )
    lines += ["", "Details:", "", *extra]
    return "\n".join(lines) + "\n"


def run_flower(
    python: Path, scenario: str, work: Path, timeout: float, run_id: str, out_json: Path
) -> None:
    """Flower's side of `scenario` (bench/flower/run.py merges it into `out_json`)."""
    print(f"Flower scenario {scenario} (load {loadavg()})", flush=True)
    cmd = [str(python), str(HERE / "flower" / "run.py"), "--scenarios", scenario]
    cmd += ["--work", str(work), "--timeout", str(timeout), "--run-id", run_id]
    cmd += ["--out", str(out_json)]
    try:
        done = subprocess.run(cmd, timeout=timeout + 300, check=False)
    except subprocess.TimeoutExpired:
        print(f"  Flower scenario {scenario}: no result within {timeout + 300:.0f} s", flush=True)
        return
    if done.returncode != 0:
        print(f"  Flower scenario {scenario} FAILED (exit {done.returncode})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenarios", default="A,B,C,D")
    ap.add_argument("--d-nodes", type=int, default=SCENARIOS["D"]["nodes"])
    ap.add_argument("--d-rounds", type=int, default=SCENARIOS["D"]["rounds"])
    ap.add_argument("--d-per-proc", type=int, default=SCENARIOS["D"]["per_proc"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/pluralfed-sysbench"))
    ap.add_argument("--timeout", type=float, default=900.0, help="per scenario, seconds")
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=None,
        help="the coordinator's bound on updates read at once (default: its own default)",
    )
    ap.add_argument(
        "--upload-chunk-bytes",
        type=int,
        default=None,
        help="the coordinator's largest upload chunk (default: its own default)",
    )
    ap.add_argument(
        "--download-chunk-bytes",
        type=int,
        default=None,
        help="the coordinator's largest tensor part per download message (default: its own)",
    )
    ap.add_argument(
        "--upload-window-bytes",
        type=int,
        default=None,
        help="the coordinator's receive window per upload stream (default: its own)",
    )
    ap.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="the coordinator's RPC threads (default: bench_coordinator.py's 2 x nodes + 32)",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "systems",
        help="results to merge into: OUT.json, OUT.md and OUT_flower.json "
        "(default: the committed bench/results/systems)",
    )
    ap.add_argument(
        "--flower",
        action="store_true",
        help="also run Flower's A-C (bench/flower/run.py), each right after pluralfed's",
    )
    ap.add_argument(
        "--flower-python",
        type=Path,
        default=FLOWER_PYTHON,
        help="the Python of the venv bench/flower/setup.sh made (default: %(default)s)",
    )
    args = ap.parse_args()
    if args.flower and not args.flower_python.exists():
        ap.error(f"--flower: no {args.flower_python}; run bench/flower/setup.sh first")
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    SCENARIOS["D"] = {
        "nodes": args.d_nodes,
        "params": 1_200_000,
        "rounds": args.d_rounds,
        "per_proc": args.d_per_proc,
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out_json = out.with_suffix(".json")
    flower_json = out.parent / f"{out.name}_flower.json"
    results: dict[str, Any] = (
        json.loads(out_json.read_text()) if out_json.exists() else {"scenarios": {}, "raw": {}}
    )
    names = [] if args.report_only else [s for s in args.scenarios.split(",") if s]
    if names and out.resolve() == (RESULTS / "systems").resolve():
        print(
            f"merging into the committed {out_json} and .md (--out elsewhere for a trial run)",
            flush=True,
        )
    if names:
        args.work.mkdir(parents=True, exist_ok=True)
        max_nodes = max(SCENARIOS[s]["nodes"] for s in names)
        pkidir = args.work / "pki"
        pki(pkidir, node_ids(max_nodes))
        if not args.no_raw:
            sizes = sorted(
                {SCENARIOS[s]["params"] * 4 for s in names}
                | {SCENARIOS[s]["params"] * 4 * SCENARIOS[s]["nodes"] for s in names}
            )
            print(f"raw gRPC mTLS throughput for {sizes} bytes (load {loadavg()})", flush=True)
            raw = run_raw(args.work, pkidir, sizes, args.timeout)
            measured_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            results.setdefault("raw", {}).update(
                {
                    str(k): {**v, "measured_at": measured_at, "run_id": run_id}
                    for k, v in raw.items()
                }
            )
        for s in names:
            print(f"scenario {s}: {SCENARIOS[s]} (load {loadavg()})", flush=True)
            try:
                coord_args = [
                    *(
                        []
                        if args.max_concurrent_uploads is None
                        else ["--max-concurrent-uploads", str(args.max_concurrent_uploads)]
                    ),
                    *(
                        []
                        if args.upload_chunk_bytes is None
                        else ["--upload-chunk-bytes", str(args.upload_chunk_bytes)]
                    ),
                    *(
                        []
                        if args.download_chunk_bytes is None
                        else ["--download-chunk-bytes", str(args.download_chunk_bytes)]
                    ),
                    *(
                        []
                        if args.upload_window_bytes is None
                        else ["--upload-window-bytes", str(args.upload_window_bytes)]
                    ),
                    *([] if args.max_workers is None else ["--max-workers", str(args.max_workers)]),
                ]
                results["scenarios"][s] = run_scenario(
                    s, SCENARIOS[s], args.work, pkidir, args.timeout, coord_args
                )
            except Exception as err:
                print(f"scenario {s} FAILED: {err}", flush=True)
                results["scenarios"][s] = {"scenario": s, **SCENARIOS[s], "error": str(err)}
                continue
            r = results["scenarios"][s]
            r["measured_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            r["run_id"] = run_id
            if args.flower and s in ("A", "B", "C"):
                run_flower(
                    args.flower_python, s, args.work / "flower", args.timeout, run_id, flower_json
                )
            print(
                f"  {s}: complete={r['complete']} round {r['round_s_median']:.2f} s, total "
                f"{r['total_s']:.1f} s, coordinator RSS ready {r['coord_rss_ready_mib']:.0f} MiB, "
                f"peak {r['coord_peak_rss_mib']:.0f} MiB (peak - ready "
                f"{r['coord_peak_over_ready_mib']:.0f}, 4 x model {r['bound_4x_model_mib']:.1f}), "
                f"coord CPU {r['coord_cpu_rounds_s']:.1f} s",
                flush=True,
            )
    results["scenarios"] = {k: v for k, v in results["scenarios"].items() if "error" not in v} | {
        k: v for k, v in results["scenarios"].items() if "error" in v
    }
    ok = {k: v for k, v in results["scenarios"].items() if "error" not in v}
    md = report({**results, "scenarios": ok}, flower_json)
    results["machine"] = {"cpus": os.cpu_count(), "loadavg_at_report": loadavg()}
    out_json.write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
