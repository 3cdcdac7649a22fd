"""What the coordinator's per-round checkpoint costs as a run's history grows.

Every round the engine checkpoints (coordinator/state.py `save_state`: the weights file, then
state.json with the whole history) and writes the round's row to metrics.jsonl (appended; rebuilt
from the state only at a start that finds it wrong, or when an evaluation is replaced). This
times both with the real code on synthetic histories of N rounds (16 training groups, 4 metrics
each, an evaluation of 18 groups every 10 rounds, records shaped as the engine writes them), next
to what the same records cost written as before session 21 (state.json indented, which makes
json use its pure-Python encoder, and metrics.jsonl rebuilt whole every round). CPU seconds of
this process; the model is the default one's size, 8.4 MB of float32.

    .venv/bin/python bench/checkpoint_cost.py                 # 1,000 .. 20,000 rounds
    .venv/bin/python bench/checkpoint_cost.py --rounds 500 5000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.state import RunState, load_state, save_state
from pluralfed.fsutil import atomic_write_bytes

GROUPS = [f"group-{i:02d}" for i in range(16)]
HELD_OUT = [f"held-out-{i}" for i in range(2)]


def round_record(n: int) -> dict[str, Any]:
    return {
        "round": n,
        "task_id": f"{n:032x}",
        "participants": GROUPS,
        "selected": GROUPS,
        "outcomes": dict.fromkeys(GROUPS, "accepted"),
        "seconds": 12.345678901234,
        "bytes_in": 134_300_160,
        "bytes_out_model": 134_300_160,
        "total_weight": 1234.0,
        "update_weights": {g: 77.125 for g in GROUPS},
        "node_metrics": {
            g: {"loss": 1.2345678, "steps": 6.0, "seconds": 3.456789, "alignment_before": 0.7712}
            for g in GROUPS
        },
        "finished_at": 1_796_000_000.123456 + n,
    }


def evaluation_record(n: int) -> dict[str, Any]:
    figures = {"model": 0.7712345, "uniform": 0.66, "prior": 0.74, "worst": 0.69}
    return {
        "round": n,
        "kind": "evaluation",
        "groups": GROUPS + HELD_OUT,
        "missing": [],
        "missing_held_out": [],
        "held_out_unconnected": [],
        "seconds": 4.2,
        "reports": {"training": {"alignment": 0.77, "worst": 0.70, "fi": 0.95}},
        "per_group": {
            g: {"role": "train", "num_questions": 120, **figures} for g in GROUPS + HELD_OUT
        },
    }


def cpu(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(rounds: int, weights: dict[str, np.ndarray], folder: Path) -> dict[str, float]:
    history = [round_record(n) for n in range(1, rounds + 1)]
    evaluations = [evaluation_record(n) for n in range(10, rounds + 1, 10)]
    state = RunState("bench", rounds, weights, {}, "enc", history, evaluations)  # type: ignore[arg-type]
    save_state(folder, state)  # a first checkpoint, so that the timed one replaces files
    row = {"kind": "round", **history[-1]}
    metrics = folder / "metrics.jsonl"
    metrics.write_text("")

    def append() -> None:
        with metrics.open("ab") as f:
            f.write((json.dumps(row, sort_keys=True) + "\n").encode())

    def rebuild() -> None:
        rows = [{"kind": "round", **r} for r in history] + list(evaluations)
        rows.sort(key=lambda r: (r["round"], r.get("kind") == "evaluation"))
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(metrics, text.encode())

    def indented_state_json() -> None:  # state.json as written before: the same dict, indent 2
        text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(folder / "state-indented.json", text.encode())

    out = {
        "rounds": rounds,
        "state_json_mib": 0.0,
        "save_state_s": cpu(lambda: save_state(folder, state)),
        "metrics_append_s": cpu(append),
        "load_state_s": cpu(lambda: load_state(folder)),
        "before_state_json_mib": 0.0,
        "before_state_s": 0.0,
        "before_metrics_s": cpu(rebuild),
    }
    out["state_json_mib"] = (folder / "state.json").stat().st_size / 2**20
    raw = json.loads((folder / "state.json").read_bytes())
    weights_only = cpu(lambda: save_state(folder, RunState("b", rounds, weights, {}, "enc")))
    out["before_state_s"] = weights_only + cpu(indented_state_json)
    out["before_state_json_mib"] = (folder / "state-indented.json").stat().st_size / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    a = ap.parse_args()
    weights = {"w": np.random.default_rng(0).standard_normal(2_098_440).astype(np.float32)}
    print(
        "| rounds of history | state.json MiB | checkpoint CPU s | metrics row CPU s | "
        "resume load CPU s | before: state.json MiB | before: checkpoint CPU s | "
        "before: metrics rebuild CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rounds in a.rounds:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(rounds, weights, Path(tmp))
        print(
            f"| {r['rounds']:,} | {r['state_json_mib']:.1f} | {r['save_state_s']:.2f} | "
            f"{r['metrics_append_s']:.4f} | {r['load_state_s']:.2f} | "
            f"{r['before_state_json_mib']:.1f} | {r['before_state_s']:.2f} | "
            f"{r['before_metrics_s']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
