"""Soak benchmark of the coordinator: what a round costs and what the process holds as a run grows.

Why: a federation runs for weeks, and a cost that grows with the run's length (session 21's soak
review found a checkpoint rewriting the whole history, and memory growing a few KB a round) is
invisible in the systems benchmark's few rounds. This runs thousands of rounds in minutes and
says, per bucket of rounds, what the coordinator spent and held.

The real `pluralfed coordinator` process, with a small GPO model (d_model 16, one layer, one
member: 33 KB of weights, so that rounds are fast), eval_every 10 and rounds it never reaches,
over mutual TLS on 127.0.0.1 (certificates of a throwaway CA). 16 training and 2 evaluate-only
no-op nodes (bench/noop_node.py: the real protocol, no torch) run as threads of 2 processes; a
node whose session is lost joins again. Every --every seconds the coordinator process is sampled
from /proc (RSS, peak RSS, CPU seconds, threads, open fds, the state folder's size), and each
sample is mapped to the rounds done by then (metrics.jsonl's finished_at). After --seconds the
nodes leave and the coordinator gets SIGTERM. Then (--resume-check, on by default) a coordinator
resumes that state folder and another starts on an empty one, both without nodes: the time until
each is ready ("waiting for a quorum" in its log) and its RSS --idle-seconds later.

    .venv/bin/python bench/soak.py --seconds 900        # writes bench/results/soak.{json,md}
    .venv/bin/python bench/soak.py --seconds 60 --nodes 4 --eval-nodes 1 --out /tmp/soak

`bench/soak.py nodes ...` is the node processes' entry; the soak starts them itself. Every process
is started here, with one thread for OpenMP and torch, and stopped by its own pid.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noop_node import NoopNode, heartbeats
from sysbench_common import node_ids, pki, proc_status, write_json
from systems import RESULTS, Procs, loadavg

from coordinator.settings import MAX_COUNT
from pluralfed.localfed import child_env, log_tail, wait_for_port, write_toml
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb

CLI = [sys.executable, "-m", "pluralfed.cli"]
# session 21's soak.toml: 33 KB of weights, so that thousands of rounds run in minutes
SMALL_MODEL = {
    "d_model": 16,
    "mlp_layers": 1,
    "n_layers": 1,
    "n_heads": 2,
    "d_ff": 16,
    "members": 1,
}
EVAL_EVERY = 10
READY_LINE = "waiting for a quorum"  # the engine logs it once the run is made or resumed
# an orphaned coordinator (this script killed) stops by itself once its nodes are gone this long
QUORUM_TIMEOUT_S = 300.0
KEEP_ROUNDS = 5  # a node's own round timings kept, so that the node processes stay flat


def min_updates(training_nodes: int) -> int:
    """As session 21's soak.toml (12 of 16): a round need not wait for its slowest quarter."""
    return max(1, 3 * training_nodes // 4)


# ------------------------------------------------------------------------------------------------
# the node processes


class SoakNode(NoopNode):
    """A no-op node that goes on until stopped: it joins again whenever it has no session (at
    the start, and after the coordinator forgot it, e.g. expired under load), counts what went
    wrong instead of stopping, and keeps only its last rounds' timings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joins = 0
        self.trained = 0
        self.evaluated = 0
        self.errors: Counter[str] = Counter()
        self.last_error = ""

    def train(self, task: pb.Task) -> None:
        super().train(task)
        self.trained += 1
        if not self.rounds[-1]["accepted"]:
            self.errors[f"update rejected: {self.rounds[-1]['reason']}"] += 1
        del self.rounds[:-KEEP_ROUNDS]

    def evaluate(self, task: pb.Task) -> None:
        super().evaluate(task)
        self.evaluated += 1

    def soak(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if not self.session_id:
                    self.join(time.time() + 30)
                    self.joins += 1
                if not self.step():
                    return  # SHUTDOWN: the run ended (it never should here)
            except Exception as err:
                if stop.is_set():
                    return  # our own Leave ended the poll
                code = err.code() if isinstance(err, grpc.Call) else None
                self.errors[code.name if code else type(err).__name__] += 1
                self.last_error = str(err)[:300]
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.session_id = ""  # the coordinator no longer knows the session
                stop.wait(0.5)

    def leave(self) -> None:
        """Leave, as a node stopped on purpose does; also ends the session's open long poll."""
        session, self.session_id = self.session_id, ""
        if session:
            with contextlib.suppress(grpc.RpcError):
                self.stub.Leave(pb.LeaveRequest(session_id=session, reason="soak end"), timeout=10)

    def report(self) -> dict[str, Any]:
        return {
            "role": pb.Role.Name(self.role),
            "joins": self.joins,
            "trained": self.trained,
            "evaluated": self.evaluated,
            "errors": dict(self.errors),
            "last_error": self.last_error,
        }


def run_nodes(args: argparse.Namespace) -> int:
    """A node process: the --ids as threads until SIGTERM (or --seconds, should the soak that
    started it be gone), then each leaves; writes each node's counts to --report."""
    stop = threading.Event()
    # the handler only notes the signal, and this thread looks every 0.2 s: a signal the kernel
    # hands to another thread does not wake a main thread blocked in a long wait, and an
    # Event.set() run by a handler in the middle of that Event's own wait can deadlock
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _frame: signals.append(sig))
    evaluate = set(filter(None, args.eval_only.split(",")))
    nodes = [
        SoakNode(
            nid,
            args.pki / "nodes" / nid,
            args.port,
            seed=int(nid[1:]) + 1,
            scale=1e-3,
            role=pb.ROLE_EVALUATE_ONLY if nid in evaluate else pb.ROLE_TRAIN,
            encoder_id=args.encoder_id,
        )
        for nid in args.ids.split(",")
    ]
    threads = [threading.Thread(target=n.soak, args=(stop,), name=n.node_id) for n in nodes]
    for t in threads:
        t.start()
    threading.Thread(target=heartbeats, args=(nodes, stop), daemon=True).start()
    end = time.monotonic() + args.seconds
    while not signals and time.monotonic() < end:
        time.sleep(0.2)
    stop.set()
    for n in nodes:
        n.leave()
    for t in threads:
        t.join(30)
    for n in nodes:  # one that joined again while the others left
        n.leave()
        n.channel.close()
    write_json(args.report, {n.node_id: n.report() for n in nodes})
    return 0


# ------------------------------------------------------------------------------------------------
# the coordinator


@dataclass
class Sample:
    t: float  # time.time(), as metrics.jsonl's finished_at
    rss_mib: float
    hwm_mib: float
    cpu_s: float
    threads: int
    fds: int
    state_mib: float
    rounds: int = 0  # rounds done at t: filled in from metrics.jsonl at the end


def folder_mib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a temporary file gone meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total / 2**20


def take_sample(pid: int, state_dir: Path) -> Sample | None:
    status = proc_status(pid)
    if status is None:
        return None
    return Sample(
        time.time(),
        status["rss_mib"],
        status["hwm_mib"],
        status["cpu_s"],
        int(status["threads"]),
        int(status["fds"]),
        folder_mib(state_dir),
    )


def write_config(path: Path, pki_dir: Path, train: list[str], evaluate: list[str]) -> None:
    """Session 21's soak.toml, on port 0 and with this run's nodes in the allow-list."""
    write_toml(
        path,
        {
            "listen": "127.0.0.1:0",
            "tls_dir": str(pki_dir / "coordinator"),
            "encoder": "all-MiniLM-L6-v2",
            "rounds": MAX_COUNT,  # never reached: the soak stops the run
            "min_nodes": len(train),
            "min_updates": min_updates(len(train)),
            "round_timeout_s": 60.0,
            "eval_timeout_s": 60.0,
            "eval_every": EVAL_EVERY,
            "session_timeout_s": 30.0,
            "heartbeat_interval_s": 5.0,
            "quorum_timeout_s": QUORUM_TIMEOUT_S,
            "evaluate_only": evaluate,
            "linger_s": 5.0,
            **SMALL_MODEL,
        },
        {"allow_list": {nid: nid for nid in train + evaluate}},
    )


def start_coordinator(
    procs: Procs, config: Path, state_dir: Path, log: Path
) -> subprocess.Popen[bytes]:
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [*CLI, "coordinator", "--config", str(config), "--state-dir", str(state_dir)]
    return procs.start(argv, log)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def check_alive(procs: dict[str, subprocess.Popen[bytes]], work: Path) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with code {proc.returncode} during the soak; the end of its "
                f"log:\n{log_tail(work / f'{name}.log', 5)}"
            )


def idle_start(procs: Procs, config: Path, state_dir: Path, log: Path, idle_s: float) -> dict:
    """A coordinator on `state_dir` with no node: the seconds until it is ready (listening, the
    run made or resumed, waiting for a quorum), and its figures `idle_s` seconds later."""
    started = time.monotonic()
    proc = start_coordinator(procs, config, state_dir, log)
    try:
        while READY_LINE not in log.read_text("utf-8", errors="replace"):
            if proc.poll() is not None or time.monotonic() - started > 300:
                raise RuntimeError(
                    f"the coordinator on {state_dir} did not get ready (exit {proc.poll()}); "
                    f"the end of its log:\n{log_tail(log, 5)}"
                )
            time.sleep(0.05)
        ready_s = time.monotonic() - started
        time.sleep(idle_s)
        status = proc_status(proc.pid)
    finally:
        stop_process(proc)
    if status is None:
        raise RuntimeError(f"the idle coordinator on {state_dir} exited; see {log}")
    return {"ready_s": ready_s, **status}


def round_times(state_dir: Path) -> list[float]:
    """finished_at of every round in metrics.jsonl, in order."""
    rows = (json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines())
    return sorted(r["finished_at"] for r in rows if r.get("kind") == "round")


def completed_rounds(state_dir: Path) -> int:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((state_dir / "state.json").read_text())["completed_rounds"])
    return -1  # being replaced right now


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the coordinator and the nodes, sample for --seconds, stop them; the samples (with
    rounds done), the nodes' counts, and the coordinator's exit code."""
    ids = node_ids(args.nodes + args.eval_nodes)
    train, evaluate = ids[: args.nodes], ids[args.nodes :]
    pki_dir = work / "pki"
    pki(pki_dir, ids)
    config = work / "coordinator.toml"
    write_config(config, pki_dir, train, evaluate)
    state = work / "state"
    procs = Procs()
    try:
        coord = start_coordinator(procs, config, state, work / "coordinator.log")
        port = wait_for_port(state, coord, 300, work / "coordinator.log")
        encoder_id = json.loads((state / "state.json").read_text())["encoder_identity"]
        first = take_sample(coord.pid, state)
        assert first is not None  # it has just written its port
        samples = [first]
        watched = {"coordinator": coord}
        for k in range(args.node_procs):
            name = f"nodes-{k}"
            mine = train[k :: args.node_procs] + evaluate[k :: args.node_procs]
            argv = [sys.executable, __file__, "nodes", "--port", str(port), "--pki", str(pki_dir)]
            argv += ["--ids", ",".join(mine), "--eval-only", ",".join(evaluate)]
            argv += ["--encoder-id", encoder_id, "--report", str(work / f"{name}.json")]
            argv += ["--seconds", str(args.seconds + 300)]  # a bound if this script dies
            watched[name] = procs.start(argv, work / f"{name}.log")
        started = time.time()
        deadline = started + args.seconds
        said = started
        k = 0
        while time.time() < deadline:
            check_alive(watched, work)
            s = take_sample(coord.pid, state)
            if s is not None:
                samples.append(s)
                if s.t - said >= 60:
                    print(
                        f"  {s.t - started:4.0f} s: {completed_rounds(state)} rounds, RSS "
                        f"{s.rss_mib:.1f} MiB, CPU {s.cpu_s:.0f} s (load {loadavg()})",
                        flush=True,
                    )
                    said = s.t
            k += 1
            time.sleep(max(0.0, min(started + k * args.every, deadline) - time.time()))
        check_alive(watched, work)
        last = take_sample(coord.pid, state)
        assert last is not None
        samples.append(last)
        node_codes = {n: stop_process(p) for n, p in watched.items() if n != "coordinator"}
        coordinator_exit = stop_process(coord)
    finally:
        procs.stop_all()
    finished = round_times(state)
    for s in samples:
        s.rounds = bisect_right(finished, s.t)
    nodes: dict[str, Any] = {}
    for name in node_codes:
        with contextlib.suppress(OSError, ValueError):
            nodes.update(json.loads((work / f"{name}.json").read_text()))
    log_path = work / "coordinator.log"
    return {
        "started": started,
        "samples": samples,
        "rounds_recorded": len(finished),
        "coordinator_exit": coordinator_exit,
        "node_exits": node_codes,
        "nodes": nodes,
        "log_lines": len(log_path.read_bytes().splitlines()),
        "log_bytes": log_path.stat().st_size,
        "config": config,
        "state": state,
    }


def resume_check(config: Path, state: Path, work: Path, idle_s: float) -> dict[str, Any]:
    """The soak's state folder resumed, then a fresh run on an empty folder: both idle."""
    procs = Procs()
    try:
        resumed = idle_start(procs, config, state, work / "resumed.log", idle_s)
        fresh = idle_start(procs, config, work / "fresh", work / "fresh.log", idle_s)
    finally:
        procs.stop_all()
    return {"idle_s": idle_s, "resumed": resumed, "fresh": fresh}


# ------------------------------------------------------------------------------------------------
# analysis


def bucket_size(rounds: int, rows: int = 8) -> int:
    """The 1, 2 or 5 times a power of ten nearest (by ratio) to rounds / rows: about `rows`
    buckets (1,619 rounds: 200, not the 500 that rounding up would give, 4 rows)."""
    target = max(1.0, rounds / rows)
    sizes = [m * 10**k for k in range(len(str(rounds)) + 1) for m in (1, 2, 5)]
    return min(sizes, key=lambda size: abs(math.log(size / target)))


def bucket_rows(samples: list[Sample], size: int) -> list[dict[str, Any]]:
    """One row per bucket of `size` rounds, from the bucket before's last sample (at first, the
    last sample before round 1) to this bucket's last one: the coordinator's CPU seconds over
    that span per round done in it, and what it held at its end."""
    start = [s for s in samples if s.rounds == 0][-1:] or samples[:1]
    prev = start[0]
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        if s.rounds > 0:
            buckets.setdefault((s.rounds - 1) // size, []).append(s)
    rows = []
    for k in sorted(buckets):
        inside, end = buckets[k], buckets[k][-1]
        done = end.rounds - prev.rounds
        rows.append(
            {
                "first_round": prev.rounds + 1,
                "last_round": end.rounds,
                "seconds": end.t - prev.t,
                "rounds_per_s": done / (end.t - prev.t),
                "cpu_s_per_round": (end.cpu_s - prev.cpu_s) / done,
                "rss_mib": end.rss_mib,
                "hwm_mib": end.hwm_mib,
                "threads": [min(s.threads for s in inside), max(s.threads for s in inside)],
                "fds": [min(s.fds for s in inside), max(s.fds for s in inside)],
                "state_mib": end.state_mib,
            }
        )
        prev = end
    return rows


def slope_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of y against rounds, per 1,000 rounds; None without two distinct
    round counts."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sxy / sxx


def summarize(run: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    samples: list[Sample] = run["samples"]
    last = samples[-1]
    active = [s for s in samples if s.rounds > 0] or samples
    seconds = last.t - run["started"]
    first_end = rows[0]["last_round"] if rows else 0
    later = [(s.rounds, s.rss_mib) for s in samples if s.rounds >= first_end > 0]
    errors: Counter[str] = Counter()
    for n in run["nodes"].values():
        errors.update(n["errors"])
    return {
        "rounds": last.rounds,
        "rounds_recorded": run["rounds_recorded"],
        "seconds": seconds,
        "rounds_per_s": last.rounds / seconds,
        "cpu_s_per_round_first": rows[0]["cpu_s_per_round"] if rows else None,
        "cpu_s_per_round_last": rows[-1]["cpu_s_per_round"] if rows else None,
        "rss_mib_ready": samples[0].rss_mib,
        "rss_mib_first_bucket": rows[0]["rss_mib"] if rows else None,
        "rss_mib_end": last.rss_mib,
        "hwm_mib_end": last.hwm_mib,
        # after the first bucket: start-up and the first rounds' allocations are not growth
        "rss_growth_mib_per_1000_rounds": slope_per_1000(later) if len(rows) > 1 else None,
        "threads": [min(s.threads for s in active), max(s.threads for s in active)],
        "fds": [min(s.fds for s in active), max(s.fds for s in active)],
        "state_kib_per_round": (last.state_mib - samples[0].state_mib) * 1024 / last.rounds
        if last.rounds
        else None,
        "log_lines_per_round": run["log_lines"] / max(1, run["rounds_recorded"]),
        "log_bytes_per_round": run["log_bytes"] / max(1, run["rounds_recorded"]),
        "coordinator_exit": run["coordinator_exit"],
        "node_exits": run["node_exits"],
        "node_joins": sum(n["joins"] for n in run["nodes"].values()),
        "node_errors": dict(errors),
    }


# ------------------------------------------------------------------------------------------------
# report


def fmt(x: float | None, nd: int) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def span(pair: list[int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}–{pair[1]}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rounds | seconds | rounds/s | coordinator CPU s/round | RSS MiB | peak RSS MiB "
        "| threads | open fds | state folder MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['first_round']:,}–{r['last_round']:,} | {r['seconds']:.0f} "
            f"| {r['rounds_per_s']:.2f} | {r['cpu_s_per_round']:.3f} | {r['rss_mib']:.1f} "
            f"| {r['hwm_mib']:.1f} | {span(r['threads'])} | {span(r['fds'])} "
            f"| {r['state_mib']:.2f} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    c, s, r = results["config"], results["summary"], results.get("resume")
    nodes_per_proc = math.ceil((c["nodes"] + c["eval_nodes"]) / c["node_procs"])
    first, last = s["cpu_s_per_round_first"], s["cpu_s_per_round_last"]
    ratio = f" (×{last / first:.2f})" if first and last else ""
    lines = [
        f"# Coordinator soak ({results['measured_at']})",
        "",
        f"`{results['command']}`: the real `pluralfed coordinator` (GPO d_model 16, one layer, "
        f"one member; eval_every {EVAL_EVERY}, min_nodes {c['nodes']}, min_updates "
        f"{c['min_updates']}) over mutual TLS on 127.0.0.1; {c['nodes']} training and "
        f"{c['eval_nodes']} evaluate-only no-op nodes as threads of {c['node_procs']} "
        f"process(es), up to {nodes_per_proc} each; one OpenMP/torch thread per process. The "
        f"coordinator sampled every {c['every']:g} s, each sample mapped to the rounds done by "
        f"then. Machine: {results['machine']['cpus']} cores, load average before "
        f"{results['machine']['loadavg_before']}, after {results['machine']['loadavg_after']}.",
        "",
        table(results["buckets"]),
        "",
        f"- {s['rounds']:,} rounds in {s['seconds']:.0f} s: {s['rounds_per_s']:.2f} rounds/s.",
        f"- Coordinator CPU per round: {fmt(first, 3)} s in the first bucket, {fmt(last, 3)} s "
        f"in the last{ratio}.",
        f"- RSS: {s['rss_mib_ready']:.1f} MiB when ready, {fmt(s['rss_mib_first_bucket'], 1)} "
        f"after the first bucket, {s['rss_mib_end']:.1f} at the end (peak "
        f"{s['hwm_mib_end']:.1f}); growth after the first bucket "
        f"{fmt(s['rss_growth_mib_per_1000_rounds'], 2)} MiB per 1,000 rounds (least squares "
        "over the samples).",
        f"- Threads {span(s['threads'])}, open fds {span(s['fds'])} while rounds ran; the state "
        f"folder grew {fmt(s['state_kib_per_round'], 2)} KiB per round; the log "
        f"{s['log_lines_per_round']:.1f} lines ({s['log_bytes_per_round']:.0f} bytes) per round.",
        f"- Stop: node processes exited {sorted(set(s['node_exits'].values()))} after leaving, "
        f"the coordinator {s['coordinator_exit']} on SIGTERM; {s['node_joins']} joins for "
        f"{c['nodes'] + c['eval_nodes']} nodes; node errors: {s['node_errors'] or 'none'}.",
    ]
    if r:
        grow = r["resumed"]["rss_mib"] - r["fresh"]["rss_mib"]
        lines.append(
            f"- Resume, no nodes, RSS {r['idle_s']:g} s after ready: the {s['rounds_recorded']:,}"
            f"-round state folder was ready in {r['resumed']['ready_s']:.1f} s with "
            f"{r['resumed']['rss_mib']:.1f} MiB (peak {r['resumed']['hwm_mib']:.1f}), a fresh "
            f"run in {r['fresh']['ready_s']:.1f} s with {r['fresh']['rss_mib']:.1f} MiB (peak "
            f"{r['fresh']['hwm_mib']:.1f}): {grow:+.1f} MiB."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "nodes"])
    ap.add_argument(
        "--seconds", type=float, default=900.0, help="how long the nodes train (nodes: at most)"
    )
    ap.add_argument("--nodes", type=int, default=16, help="training nodes")
    ap.add_argument("--eval-nodes", type=int, default=2, help="evaluate-only nodes")
    ap.add_argument("--node-procs", type=int, default=2, help="processes the nodes run in")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--bucket", type=int, default=0, help="rounds per table row (0: ~8 rows)")
    ap.add_argument(
        "--resume-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then resume the state folder, and start on an empty one, without nodes",
    )
    ap.add_argument(
        "--idle-seconds", type=float, default=20.0, help="resume check: RSS this long after ready"
    )
    ap.add_argument(
        "--work",
        type=Path,
        help="keep certificates, state and logs here (default: a temporary "
        "folder, removed after a run that succeeded)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "soak", help="writes OUT.json, OUT.md")
    node_args = ap.add_argument_group("nodes mode (started by the soak)")
    node_args.add_argument("--port", type=int)
    node_args.add_argument("--pki", type=Path)
    node_args.add_argument("--ids", default="")
    node_args.add_argument("--eval-only", default="")
    node_args.add_argument("--encoder-id", default="")
    node_args.add_argument("--report", type=Path)
    args = ap.parse_args()
    if args.mode == "nodes":
        return run_nodes(args)
    if args.nodes < 1 or args.eval_nodes < 0 or args.seconds <= 0 or args.every <= 0:
        ap.error("--nodes must be at least 1, --eval-nodes at least 0, --seconds and --every > 0")
    if not 1 <= args.node_procs <= args.nodes + args.eval_nodes:
        ap.error("--node-procs must be between 1 and the number of nodes")
    os.environ.update(child_env(1))  # one OpenMP/torch thread in every process started here
    work = Path(args.work or tempfile.mkdtemp(prefix="pluralfed-soak-"))
    for folder in ("state", "fresh"):  # a --work used before: new runs
        shutil.rmtree(work / folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    load_before = loadavg()
    print(f"soak for {args.seconds:g} s in {work} (load {load_before})", flush=True)
    try:
        run = soak(args, work)
        resume = None
        if args.resume_check:
            print(f"resume check ({run['rounds_recorded']} rounds) (load {loadavg()})", flush=True)
            resume = resume_check(run["config"], run["state"], work, args.idle_seconds)
    except BaseException:
        print(f"the soak failed: certificates, state and logs are kept in {work}", flush=True)
        raise
    samples: list[Sample] = run["samples"]
    size = args.bucket or bucket_size(samples[-1].rounds)
    rows = bucket_rows(samples, size)
    results = {
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "config": {
            "seconds": args.seconds,
            "nodes": args.nodes,
            "eval_nodes": args.eval_nodes,
            "node_procs": args.node_procs,
            "every": args.every,
            "bucket_rounds": size,
            "min_updates": min_updates(args.nodes),
            "model": SMALL_MODEL,
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before},
        "buckets": rows,
        "summary": summarize(run, rows),
        "resume": resume,
        "nodes": run["nodes"],
        "samples": [asdict(s) for s in samples],
    }
    results["machine"]["loadavg_after"] = loadavg()
    md = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), results)
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md, flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
