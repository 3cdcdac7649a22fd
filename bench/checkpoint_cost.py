"""What the coordinator's per-round checkpoint costs as a run's history grows.

Every round the engine checkpoints (coordinator/state.py `save_state`: the round's record
appended to history.jsonl, the weights file, then state.json naming history.jsonl and
evaluations.jsonl by length and digest) and appends the round's row to metrics.jsonl. This
times that with the real code on synthetic histories of N rounds (16 training groups, 4 metrics
each, an evaluation of 18 groups every 10 rounds, records shaped as the engine writes them),
next to session 21's layout, where state.json held every record inline and was rewritten every
round. Also what a resume costs: CPU seconds of `load_state` (the weights' digest included), and
CPU seconds and the Python heap's peak (tracemalloc) of reading the records, which then held
every record and now keeps the last ones and the groups named, and of checking metrics.jsonl
against them (which then built the whole file's text, and now streams). CPU seconds of this process; the model is the default
one's size, 8.4 MB of float32.

    .venv/bin/python bench/checkpoint_cost.py                 # 1,000 .. 20,000 rounds
    .venv/bin/python bench/checkpoint_cost.py --rounds 500 5000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE, EvaluationLog, RoundHistory
from coordinator.metrics_file import MetricsFile, row_key
from coordinator.state import RunState, load_state, save_state
from pluralfed.fsutil import atomic_write_json
from pluralfed.records import EvaluationRecord, RoundRecord

GROUPS = [f"group-{i:02d}" for i in range(16)]
HELD_OUT = [f"held-out-{i}" for i in range(2)]


def round_record(n: int) -> RoundRecord:
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


def evaluation_record(n: int) -> EvaluationRecord:
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
    records = [round_record(n) for n in range(1, rounds + 1)]
    evaluations = [evaluation_record(n) for n in range(10, rounds + 1, 10)]
    history = RoundHistory.from_records(folder / HISTORY_FILE, records[:-1], "bench")
    logged = EvaluationLog.from_records(folder / EVALUATIONS_FILE, evaluations, "bench")
    state = RunState("bench", rounds, weights, {}, "enc", history, logged)
    save_state(folder, state)  # a first checkpoint, so that the timed one replaces files

    def checkpoint() -> None:  # the last round's: its record, then the checkpoint
        save_state(folder, state, record=records[-1])

    out: dict[str, float] = {"rounds": rounds, "save_state_s": cpu(checkpoint)}
    out["state_json_mib"] = (folder / "state.json").stat().st_size / 2**20
    out["resume_s"] = cpu(lambda: load_state(folder))
    out["records_s"], out["records_mib"] = cpu_and_heap(lambda: read_records(folder))
    MetricsFile(folder, state).write()  # written whole; then checked as a resume checks it
    out["mend_s"], out["mend_mib"] = cpu_and_heap(lambda: MetricsFile(folder, state).mend())

    def session_21_mend() -> None:  # every row in a list, the file's text, then compared
        rows = [{"kind": "round", **r} for r in records] + list(evaluations)
        rows.sort(key=row_key)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        assert (folder / "metrics.jsonl").read_bytes() == text

    out["before_mend_s"], out["before_mend_mib"] = cpu_and_heap(session_21_mend)

    # session 21: state.json with the history inline, unindented, rewritten every round
    raw = json.loads((folder / "state.json").read_bytes())
    raw.update(history=records, evaluations=evaluations)
    old = folder / "old" / "state.json"
    old.parent.mkdir()
    empty = RunState(
        "b",
        rounds,
        weights,
        {},
        "enc",
        RoundHistory.create(old.parent / HISTORY_FILE),
        EvaluationLog.create(old.parent / EVALUATIONS_FILE),
    )
    weights_only = cpu(lambda: save_state(old.parent, empty))
    out["before_state_s"] = weights_only + cpu(lambda: atomic_write_json(old, raw, indent=None))
    out["before_state_json_mib"] = old.stat().st_size / 2**20
    out["before_load_s"], out["before_load_mib"] = cpu_and_heap(
        lambda: json.loads(old.read_bytes())
    )
    return out


def read_records(folder: Path) -> None:
    """What a resume reads of the records (weights aside): state.json, history.jsonl, then
    evaluations.jsonl, each evaluation read once more (the engine notes their groups)."""
    path = folder / "state.json"
    raw = json.loads(path.read_bytes())
    RoundHistory.load(folder / HISTORY_FILE, raw["history_bytes"], raw["history_digest"], path)
    evaluations = EvaluationLog.load(
        folder / EVALUATIONS_FILE, raw["evaluations_bytes"], raw["evaluations_digest"], path
    )
    for _ in evaluations.records():
        pass


def cpu_and_heap(fn: Any) -> tuple[float, float]:
    """CPU seconds of `fn`, and the peak of the Python heap while it ran, in MiB (a second
    run: tracemalloc slows it)."""
    seconds = cpu(fn)
    tracemalloc.start()
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    a = ap.parse_args()
    weights = {"w": np.random.default_rng(0).standard_normal(2_098_440).astype(np.float32)}
    print(
        "| rounds of history | state.json MiB | checkpoint CPU s | resume CPU s | records: CPU s "
        "/ heap peak MiB | metrics.jsonl check: CPU s / heap peak MiB | session 21: state.json "
        "MiB | session 21: checkpoint CPU s | session 21: records CPU s / heap peak MiB | "
        "session 21: metrics.jsonl check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rounds in a.rounds:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(rounds, weights, Path(tmp))
        print(
            f"| {r['rounds']:,} | {r['state_json_mib']:.2f} | {r['save_state_s']:.2f} | "
            f"{r['resume_s']:.2f} | {r['records_s']:.2f} / {r['records_mib']:.1f} | "
            f"{r['mend_s']:.2f} / {r['mend_mib']:.1f} | "
            f"{r['before_state_json_mib']:.1f} | {r['before_state_s']:.2f} | "
            f"{r['before_load_s']:.2f} / {r['before_load_mib']:.0f} | "
            f"{r['before_mend_s']:.2f} / {r['before_mend_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
