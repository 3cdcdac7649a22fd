"""Rounds over a link with latency: what the coordinator's upload window costs when nodes are
far away, and what a larger one costs in memory.

The systems bench's workload (no-op nodes that add a small random delta, FedAvg, mutual TLS,
separate processes) with the default predictor's size (the ensemble of 3, 2,090,118
parameters), but the nodes reach the coordinator through `bench/delay_proxy.py`, which
delays every byte by half the round trip each way. For each round trip and each
`upload_window_bytes`, it prints the median round, the upload throughput per node and the
coordinator's peak memory over its start-up, and writes bench/results/wan.{json,md}.

    python bench/wan.py                      # 8 nodes, 10 rounds, RTT 0/50/150 ms, 3 windows
    python bench/wan.py --rtt-ms 100 --windows 65536,4194304 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sysbench_common import node_ids, pki
from systems import RESULTS, loadavg, run_scenario

PREDICTOR_PARAMS = 2_090_118  # GPO(GPOConfig(members=3)): the default model


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| round trip | upload window | round (median) | upload per node | all uploads "
        "| coordinator peak − start-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['rtt_ms']:g} ms | {r['window'] // 1024} KiB | failed: {r['error']} | | | |"
            )
            continue
        lines.append(
            f"| {r['rtt_ms']:g} ms | {r['window'] // 1024} KiB | {r['round_s_median']:.2f} s "
            f"| {r['upload_MBps_single_median']:.1f} MB/s "
            f"| {r['upload_MBps_aggregate_median']:.1f} MB/s "
            f"| {r['coord_peak_over_ready_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--params", type=int, default=PREDICTOR_PARAMS)
    ap.add_argument("--rtt-ms", default="0,50,150", help="comma-separated round trips")
    ap.add_argument(
        "--windows", default="65536,1048576,4194304", help="comma-separated upload_window_bytes"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/pluralfed-wanbench"))
    ap.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS / "wan")
    args = ap.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",") if x]
    windows = [int(x) for x in args.windows.split(",") if x]
    cfg = {"nodes": args.nodes, "params": args.params, "rounds": args.rounds, "per_proc": 1}
    args.work.mkdir(parents=True, exist_ok=True)
    pkidir = args.work / "pki"
    pki(pkidir, node_ids(args.nodes))
    rows: list[dict[str, Any]] = []
    for rtt in rtts:
        for window in windows:
            name = f"rtt{rtt:g}-w{window}"
            print(f"{name}: {cfg} (load {loadavg()})", flush=True)
            coord_args = ["--upload-window-bytes", str(window)]
            try:
                r = run_scenario(name, cfg, args.work, pkidir, args.timeout, coord_args, rtt)
            except Exception as err:  # one failed run is a row of the table, not the end
                print(f"{name} FAILED: {err}", flush=True)
                rows.append({"rtt_ms": rtt, "window": window, "error": str(err)})
                continue
            if not r["complete"]:
                print(f"{name}: not every node in every round: {r['errors']}", flush=True)
            rows.append({"rtt_ms": rtt, "window": window, **r})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    measured = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"measured_at": measured, "config": cfg, "runs": rows}, indent=1) + "\n"
    )
    md = (
        f"# Rounds over a link with latency ({measured})\n\n"
        f"`python bench/wan.py --nodes {args.nodes} --rounds {args.rounds} --params "
        f"{args.params} --rtt-ms {args.rtt_ms} --windows {args.windows}`: {args.nodes} no-op "
        f"nodes, a model of {args.params * 4 / 1e6:.1f} MB, mutual TLS, through "
        "bench/delay_proxy.py (0 ms: direct on loopback). The coordinator reads at most 4 "
        "uploads at once (its default).\n\n" + table(rows) + "\n"
    )
    args.out.with_suffix(".md").write_text(md)
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
