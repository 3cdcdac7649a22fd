#!/usr/bin/env python3
"""Throughput of the reward model: answers scored per second through the Python API (batched,
CPU), and latency of the gRPC service (mutual TLS over loopback) under concurrent clients.

    .venv/bin/python bench/reward_throughput.py --checkpoint runs/c100   # bench/results/reward_throughput.json

Python API: `RewardModel.score_batch` for a named group (context: its TRAIN questions, at most 90)
on real GlobalOpinionQA TEST questions with their options; "warm" = the option texts' embeddings
are in memory (the steady state of a server or an RL loop that asks the same questions again);
"new texts" = every question is new, so each option text is embedded first.

gRPC: the service runs in a subprocess (`pluralfed reward serve`, certificates made here), clients
are threads of this process, each with its own mutually-authenticated channel, each sending one
Score call at a time (Q questions for a named group) back to back. Every level is bounded by a
request count and by time. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "globalopinionqa" / "global_opinions.csv"


def target_questions(data_path: Path, limit: int) -> list[tuple[str, list[str]]]:
    from pluralfed.data import is_test_question, load_survey

    data = load_survey(data_path)
    seen: dict[str, list[str]] = {}
    for items in data.groups.values():
        for it in items:
            if is_test_question(it.question) and it.question not in seen:
                seen[it.question] = list(it.options)
    return list(seen.items())[:limit]


def bench_api(args: argparse.Namespace, questions: list[tuple[str, list[str]]]) -> dict[str, Any]:
    from pluralfed.reward import RewardModel

    rm = RewardModel.from_checkpoint(args.checkpoint, cache_dir=args.cache_dir)
    rm.add_groups_from_data(args.data, [args.group])
    rm.score_batch(args.group, questions)  # warm: embeddings in memory
    out: dict[str, Any] = {"group": args.group, "context_items": len(rm.group(args.group))}
    for batch in args.api_batches:
        answers = calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < args.api_seconds:
            for i in range(0, len(questions), batch):
                chunk = questions[i : i + batch]
                rm.score_batch(args.group, chunk)
                answers += sum(len(o) for _, o in chunk)
                calls += 1
        elapsed = time.perf_counter() - start
        out[f"warm_batch_{batch}"] = {
            "answers_per_s": answers / elapsed,
            "questions_per_s": answers / elapsed / np.mean([len(o) for _, o in questions]),
            "ms_per_call": 1000 * elapsed / calls,
            "calls": calls,
        }
    # new texts: every option text unseen, so it is embedded (encoder on CPU) before scoring
    fresh = [(f"{q} (variant {i})", o) for i, (q, o) in enumerate(questions[: args.fresh])]
    rm_fresh = RewardModel.from_checkpoint(
        args.checkpoint, encoder=getattr(rm.encoder, "inner", rm.encoder)
    )
    rm_fresh.add_group(args.group, rm.group(args.group))
    rm_fresh.embed_texts(["warm-up: load the encoder before timing"], disk_cache=False)
    start = time.perf_counter()
    for i in range(0, len(fresh), 64):
        rm_fresh.score_batch(args.group, fresh[i : i + 64])
    elapsed = time.perf_counter() - start
    n = sum(len(o) for _, o in fresh)
    out["new_texts_batch_64"] = {"answers_per_s": n / elapsed, "answers": n, "seconds": elapsed}
    return out


def make_pki(root: Path) -> dict[str, Path]:
    from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert

    create_ca(root / "ca")
    issue_server_cert(root / "ca", root / "server", "reward", ["127.0.0.1", "localhost"])
    issue_node_cert(root / "ca", root / "client", "bench-client")
    allow = root / "allow.toml"
    allow.write_text('[allow_list]\n"bench-client" = "throughput bench"\n', encoding="utf-8")
    return {"server": root / "server", "client": root / "client", "allow": allow}


def start_server(args: argparse.Namespace, pki: dict[str, Path], root: Path) -> tuple[Any, int]:
    from pluralfed.auth import MAX_EXEMPT_CALLS

    port_file = root / "port"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    if args.cache_dir is not None:
        env["PLURALFED_CACHE_DIR"] = str(args.cache_dir)
    cmd = [
        sys.executable, "-m", "pluralfed.cli", "reward", "serve",
        "--checkpoint", str(args.checkpoint), "--listen", "127.0.0.1:0",
        "--tls-dir", str(pki["server"]), "--allow-list", str(pki["allow"]),
        "--groups-data", str(args.data), "--groups", args.group,
        "--port-file", str(port_file), "--threads", str(args.server_threads),
        # every bench client is one certificate: its limit is the clients, and the workers
        # leave the health checks' share (auth.MAX_EXEMPT_CALLS) besides, as the server requires
        "--max-calls-per-client", str(max(args.clients)),
        "--max-workers", str(max(args.clients) + MAX_EXEMPT_CALLS + 1),
    ]  # fmt: skip
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"reward server did not start: {(root / 'server.log').read_text()}")
        time.sleep(0.2)
    return proc, int(port_file.read_text())


def run_level(
    port: int,
    client_dir: Path,
    group: str,
    batches: list[list[tuple[str, list[str]]]],
    clients: int,
    max_requests: int,
    seconds: float,
) -> dict[str, Any]:
    import grpc

    from pluralfed.reward_server import RewardClient, score_request
    from pluralfed.tls import TlsFiles

    files = TlsFiles.from_dir(client_dir)
    requests = [score_request(group, b) for b in batches]
    answers_per = [sum(len(o) for _, o in b) for b in batches]
    latencies: list[float] = []
    answers = [0]
    errors: dict[str, int] = {}
    lock = threading.Lock()
    issued = [0]
    stop_at = time.perf_counter() + seconds
    conns = [RewardClient(f"127.0.0.1:{port}", files) for _ in range(clients)]
    for c in conns:  # connect and handshake before timing
        c.info()

    def worker(c: RewardClient) -> None:
        while time.perf_counter() < stop_at:
            with lock:
                if issued[0] >= max_requests:
                    return
                i = issued[0]
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                c.stub.Score(requests[i % len(requests)], timeout=10.0)
            except grpc.RpcError as err:
                with lock:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                answers[0] += answers_per[i % len(requests)]

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    lat = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "answers_per_s": answers[0] / elapsed,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)) if lat.size else None,
            "p90": float(np.percentile(lat, 90)) if lat.size else None,
            "p99": float(np.percentile(lat, 99)) if lat.size else None,
            "max": float(lat.max()) if lat.size else None,
        },
    }


def bench_grpc(args: argparse.Namespace, questions: list[tuple[str, list[str]]]) -> dict[str, Any]:
    q = args.questions_per_request
    batches = [questions[i : i + q] for i in range(0, len(questions) - q + 1, q)]
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        root = Path(tmp)
        pki = make_pki(root)
        proc, port = start_server(args, pki, root)
        try:
            # warm the server's embeddings with every request once
            run_level(port, pki["client"], args.group, batches, 1, len(batches), 600)
            levels = [
                run_level(
                    port,
                    pki["client"],
                    args.group,
                    batches,
                    n,
                    args.max_requests,
                    args.grpc_seconds,
                )
                for n in args.clients
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"questions_per_request": q, "distinct_requests": len(batches), "levels": levels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--group", default="France", help="the group scored for (held by name)")
    p.add_argument("--questions", type=int, default=256, help="distinct target questions")
    p.add_argument("--api-batches", default="1,8,64", help="questions per score_batch call")
    p.add_argument("--api-seconds", type=float, default=4.0, help="seconds per API batch size")
    p.add_argument("--fresh", type=int, default=64, help="new questions for the new-text figure")
    p.add_argument("--clients", default="1,4,16", help="concurrent gRPC clients per level")
    p.add_argument("--questions-per-request", type=int, default=8)
    p.add_argument("--max-requests", type=int, default=2000, help="cap per level")
    p.add_argument("--grpc-seconds", type=float, default=15.0, help="time cap per level")
    p.add_argument("--threads", type=int, default=1, help="torch threads, this process")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads, the server")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache folder")
    p.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "reward_throughput.json"
    )
    args = p.parse_args(argv)
    args.api_batches = [int(x) for x in args.api_batches.split(",")]
    args.clients = [int(x) for x in args.clients.split(",")]
    if not 1 <= args.questions_per_request <= args.questions:
        p.error(
            f"--questions-per-request {args.questions_per_request} must be 1 to --questions "
            f"({args.questions}): each gRPC request holds that many distinct questions"
        )

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    questions = target_questions(args.data, args.questions)
    print(
        f"{len(questions)} TEST questions, {sum(len(o) for _, o in questions)} answers", flush=True
    )
    if len(questions) < args.questions_per_request:
        p.error(
            f"{args.data} has only {len(questions)} TEST questions, fewer than one request holds"
        )
    api = bench_api(args, questions)
    for k, v in api.items():
        if isinstance(v, dict):
            print(f"API {k}: {v['answers_per_s']:.0f} answers/s", flush=True)
    grpc_result = bench_grpc(args, questions)
    for lv in grpc_result["levels"]:
        lat = lv["latency_ms"]
        print(
            f"gRPC {lv['clients']:3d} clients: {lv['requests']:5d} calls in {lv['seconds']:.1f} s, "
            f"{lv['requests_per_s']:.1f} calls/s, {lv['answers_per_s']:.0f} answers/s, "
            f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, errors {lv['errors']}",
            flush=True,
        )
    result = {
        "command": " ".join(
            [".venv/bin/python bench/reward_throughput.py", *(argv or sys.argv[1:])]
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": {"api": args.threads, "server": args.server_threads},
            "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
            **(
                {"note": "load average above the core count: other jobs shared the CPU"}
                if max(load_before[0], os.getloadavg()[0]) > (os.cpu_count() or 1)
                else {}
            ),
        },
        "checkpoint": str(args.checkpoint),
        "questions": len(questions),
        "answers": sum(len(o) for _, o in questions),
        "api": api,
        "grpc": grpc_result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
