"""Whole federations as real processes: a coordinator and group nodes, mutual TLS on 127.0.0.1.

- a full run: rounds 1..3 once each in metrics.jsonl, an evaluation of training and held-out
  groups, results.json and a loadable final checkpoint, and a global model that IS the weighted
  average of what the nodes uploaded (from the nodes' own audit copies, recomputed with numpy;
  fairness-aware weights, each node's examples times 1 - its alignment_before);
- a node killed mid-run: the next round closes at its deadline with the remaining updates and the
  run finishes;
- the coordinator killed mid-run and restarted: the nodes rejoin on their own and the run
  completes with every round exactly once and the same run id;
- two runs with the same seed, side by side: the same weights to the bit.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedharness import (
    FedData,
    Pki,
    Procs,
    assert_weights_close,
    free_port,
    make_fed_data,
    restart_coordinator,
    start_coordinator,
    start_node,
    tails,
    wait_until,
    weighted_average,
)

from coordinator.evaluations import HELD_OUT_SET, TRAIN_SET
from coordinator.state import load_state
from pluralfed.checkpoint import load_checkpoint
from pluralfed.localfed import node_id
from pluralfed.protocol import ALIGNMENT_BEFORE
from pluralfed.tensorfiles import load_metadata, load_tensors, state_dict_to_numpy
from pluralfed.wire import digest_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def fed_data(tmp_path_factory: pytest.TempPathFactory, session_cache_dir: Path) -> FedData:
    """4 synthetic groups (3 train, 1 held out), embedded once into the session's cache."""
    return make_fed_data(tmp_path_factory.mktemp("fed-data"), session_cache_dir, n_groups=4)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    with Procs(tmp_path / "logs") as p:
        yield p


def allow_list(groups: list[str]) -> dict[str, str]:
    return {node_id(g): g for g in groups}


def round_numbers(records: list[dict]) -> list[int]:
    return [r["round"] for r in records]


def test_full_run_aggregate_is_the_weighted_average_of_the_uploads(
    tmp_path: Path, procs: Procs, pki: Pki, fed_data: FedData, session_cache_dir: Path
) -> None:
    train, held_out = fed_data.groups[:3], fed_data.groups[3]
    coord = start_coordinator(
        procs,
        tmp_path,
        pki,
        allow_list(fed_data.groups),
        # 4 KiB upload chunks: the nodes must cut their updates as Join tells them (the input
        # layer alone is ~50 KB); a bigger chunk would be refused and the rounds would fail.
        # 16 KiB download parts: the real nodes assemble models sent in many small parts.
        # Embedding noise on: the nodes take it from their TRAIN tasks and train with it.
        # fairness_q = 1: updates weigh n * (1 - alignment_before), from the nodes' metrics.
        {
            "rounds": 3,
            "eval_every": 3,
            "min_nodes": 3,
            "min_updates": 3,
            "upload_chunk_bytes": 4096,
            "download_chunk_bytes": 16384,
            "embedding_noise": 0.05,
            "fairness_q": 1.0,
        },
    )
    audit = {g: tmp_path / "audit" / node_id(g) for g in train}
    # one training node and the evaluate-only node personalize the final model for their group
    personalized = {g: tmp_path / "personalized" / node_id(g) for g in (train[0], held_out)}

    def personalize(g: str) -> dict[str, str]:
        if g not in personalized:
            return {}
        return {"personalize_steps": "4", "personalized_dir": str(personalized[g])}

    nodes = [
        start_node(
            procs,
            tmp_path,
            pki,
            coord,
            g,
            fed_data.files[g],
            cache_dir=session_cache_dir,
            settings={"save_updates_dir": str(audit[g]), **personalize(g)},
        )
        for g in train
    ]
    nodes.append(
        start_node(
            procs,
            tmp_path,
            pki,
            coord,
            held_out,
            fed_data.files[held_out],
            role="evaluate-only",
            cache_dir=session_cache_dir,
            settings=personalize(held_out),
        )
    )
    everyone = [coord.proc, *nodes]
    assert coord.proc.wait(240, nodes) == 0, tails(everyone)
    for node in nodes:
        assert node.wait(60, everyone) == 0, tails(everyone)

    # metrics.jsonl: rounds 1..3 once each, then the evaluation of both sets of groups
    rounds = coord.round_records()
    assert round_numbers(rounds) == [1, 2, 3], tails(everyone)
    for node in nodes[:-1]:  # the training nodes trained with the coordinator's noise
        assert "embedding noise 0.05," in node.log(), tails([node])
    for r in rounds:
        assert r["participants"] == sorted(train), r
        before = {g: r["node_metrics"][g][ALIGNMENT_BEFORE] for g in train}
        assert all(0.0 < a < 1.0 for a in before.values()), r
        fair = {g: fed_data.train_counts[g] * (1.0 - before[g]) for g in train}
        assert r["update_weights"] == pytest.approx(fair), r
        assert r["total_weight"] == pytest.approx(sum(fair.values()))
    [evaluation] = coord.evaluation_records()
    assert evaluation["round"] == 3
    assert set(evaluation["reports"]) == {TRAIN_SET, HELD_OUT_SET}
    assert evaluation["groups"] == sorted(fed_data.groups) and evaluation["missing"] == []
    roles = {g: e["role"] for g, e in evaluation["per_group"].items()}
    assert roles == {**dict.fromkeys(train, "train"), held_out: "evaluate-only"}
    for report in evaluation["reports"].values():
        assert 0.0 < report["model"]["alignment"] <= 1.0

    # results.json and the final checkpoint
    results = json.loads((coord.state_dir / "results.json").read_text())
    state = load_state(coord.state_dir)
    assert state is not None
    assert results["run_id"] == state.run_id and results["rounds"] == 3
    assert results["final_evaluation"] == evaluation
    checkpoint = load_checkpoint(coord.state_dir / "final")
    assert checkpoint.metadata["run_id"] == state.run_id
    assert checkpoint.metadata["rounds"] == 3
    assert checkpoint.metadata["training_groups"] == sorted(train)
    final = state_dict_to_numpy(checkpoint.model.state_dict())
    assert_weights_close(final, state.weights, "final checkpoint vs coordinator state")

    # personalization: the final model (downloaded at SHUTDOWN), fine-tuned on the node's own
    # data, saved where the node was told; nodes not asked wrote nothing
    assert not (tmp_path / "personalized" / node_id(train[1])).exists()
    for g, folder in personalized.items():
        own = load_checkpoint(folder)
        assert own.metadata["mode"] == "personalized" and own.metadata["group"] == g
        assert own.metadata["training_groups"] == [g]
        assert own.metadata["base_round"] == 3 and own.metadata["steps"] == 4
        final_version = f"{state.run_id}-r3-{digest_of(state.weights).hex()[:12]}"
        assert own.metadata["base_model_version"] == final_version
        assert own.model.cfg == checkpoint.model.cfg and own.encoder == checkpoint.encoder
        mine = state_dict_to_numpy(own.model.state_dict())
        assert mine.keys() == final.keys()
        assert not all(np.array_equal(mine[k], final[k]) for k in final), g

    # the global model after the last round is sum(c_i w_i) / sum(c_i) over the nodes' uploads,
    # c_i = n_i * (1 - alignment_before_i) as the audit copies record them (fairness_q = 1)
    last = rounds[-1]
    uploads, counts = [], []
    for g in train:
        [path] = audit[g].glob(f"round-00003-{last['task_id']}.safetensors")
        meta = load_metadata(path)
        weights = load_tensors(path)
        assert meta["group"] == g and meta["task_id"] == last["task_id"] and meta["round"] == "3"
        assert meta["digest"] == digest_of(weights).hex()
        assert int(meta["num_examples"]) == fed_data.train_counts[g]
        alignment_before = float(meta[f"metric.{ALIGNMENT_BEFORE}"])
        assert alignment_before == last["node_metrics"][g][ALIGNMENT_BEFORE]
        uploads.append(weights)
        counts.append(int(meta["num_examples"]) * (1.0 - alignment_before))
        # one audit file per round: every round this node trained in
        assert len(list(audit[g].glob("round-*.safetensors"))) == 3
    expected = weighted_average(uploads, counts)
    assert_weights_close(state.weights, expected, "global model after round 3")
    # the nodes did train, each on its own data: their uploads differ
    assert not all(np.array_equal(uploads[0][k], uploads[1][k]) for k in uploads[0])


def test_a_run_is_a_function_of_its_seed_to_the_bit(
    tmp_path: Path, procs: Procs, pki: Pki, fed_data: FedData, session_cache_dir: Path
) -> None:
    """Figures are compared across runs (PROTOCOL.md), so two federations with the same seed,
    run side by side (their updates arrive in whatever order the machine gives), end with the
    same weights to the bit, their nodes report the same losses every round and their
    evaluations the same figures: nothing in a run may depend on timing, arrival order or an
    unseeded draw. One of them evaluates after every round, the other only after the last:
    evaluating must not touch training. Another coordinator seed ends elsewhere."""
    train = fed_data.groups[:3]
    runs = {"a": (11, 3), "b": (11, 1), "other": (12, 3)}  # seed, eval_every
    coordinators = {
        name: start_coordinator(
            procs,
            tmp_path / name,
            pki,
            allow_list(train),
            {"rounds": 3, "eval_every": every, "min_nodes": 3, "min_updates": 3, "seed": seed},
            name=f"coordinator-{name}",
        )
        for name, (seed, every) in runs.items()
    }
    nodes = {
        name: [
            start_node(
                procs,
                tmp_path / name,
                pki,
                coord,
                g,
                fed_data.files[g],
                cache_dir=session_cache_dir,
            )
            for g in train
        ]
        for name, coord in coordinators.items()
    }
    everyone = [*(c.proc for c in coordinators.values()), *(n for ns in nodes.values() for n in ns)]
    for name, coord in coordinators.items():
        assert coord.proc.wait(300, nodes[name]) == 0, tails(everyone)

    def outcome(name: str) -> tuple[str, list[dict[str, tuple[float, float]]], dict]:
        coord = coordinators[name]
        state = load_state(coord.state_dir)
        assert state is not None
        losses = [
            {g: (m["loss"], m[ALIGNMENT_BEFORE]) for g, m in r["node_metrics"].items()}
            for r in coord.round_records()
        ]
        evaluations = coord.evaluation_records()
        assert [e["round"] for e in evaluations] == list(range(runs[name][1], 4, runs[name][1]))
        return digest_of(state.weights).hex(), losses, evaluations[-1]["reports"]

    a, b, other = outcome("a"), outcome("b"), outcome("other")
    assert len(a[1]) == 3 and all(len(per_round) == 3 for per_round in a[1]), a[1]
    assert a[0] == b[0], "the same seed ended with other weights"
    assert a[1] == b[1], "the same seed's nodes reported other losses"
    assert a[2] == b[2], "the same seed's final evaluation differs"
    assert other[0] != a[0] and other[1] != a[1]


def test_node_killed_mid_run_round_closes_at_its_deadline(
    tmp_path: Path, procs: Procs, pki: Pki, fed_data: FedData, session_cache_dir: Path
) -> None:
    train = fed_data.groups[:3]
    deadline_s = 15.0
    coord = start_coordinator(
        procs,
        tmp_path,
        pki,
        allow_list(train),
        {
            "rounds": 2,
            "eval_every": 0,  # evaluate only after the last round
            "min_nodes": 3,
            "min_updates": 2,
            "round_timeout_s": deadline_s,
            "eval_timeout_s": 10.0,
            "heartbeat_interval_s": 1.0,
            # longer than a round: the dead node's session outlives round 2, so the round ends
            # at its deadline, not when the session expires
            "session_timeout_s": 20.0,
            "local_steps": 4,
        },
        verbose=True,  # the line of each accepted update is a debug line
    )
    nodes = {
        g: start_node(
            procs, tmp_path, pki, coord, g, fed_data.files[g], cache_dir=session_cache_dir
        )
        for g in train
    }
    everyone = [coord.proc, *nodes.values()]

    # the first node whose round-1 update is counted dies (SIGKILL) at once: the round still
    # closes with all three updates, and round 2 is opened for all three
    def first_accepted() -> str | None:
        m = re.search(r"round 1: update from (\S+) accepted", coord.proc.log())
        return m.group(1) if m else None

    victim = wait_until(
        first_accepted,
        180,
        "a round-1 update to be accepted",
        logs=nodes.values(),
        must_live=everyone,
    )
    nodes[victim].kill()
    assert nodes[victim].returncode == -signal.SIGKILL
    survivors = sorted(set(train) - {victim})

    assert coord.proc.wait(180, list(nodes.values())) == 0, tails(everyone)
    for g in survivors:
        assert nodes[g].wait(60, everyone) == 0, tails(everyone)

    records = coord.round_records()
    assert round_numbers(records) == [1, 2], tails(everyone)
    round1, round2 = records
    assert victim in round1["participants"], round1
    assert round2["selected"] == sorted(train), round2
    assert round2["participants"] == survivors, round2
    assert victim not in round2["outcomes"], round2
    assert set(round2["outcomes"].values()) == {"accepted"}
    # it waited for the dead node until the deadline, not longer
    assert deadline_s - 0.5 <= round2["seconds"] <= deadline_s + 5.0, round2["seconds"]
    assert re.search(
        r"train round 2: deadline passed without \['" + re.escape(victim), coord.proc.log()
    )
    [evaluation] = coord.evaluation_records()
    assert evaluation["groups"] == survivors, evaluation
    assert (coord.state_dir / "results.json").exists()


def test_coordinator_killed_and_restarted_nodes_rejoin_and_run_completes(
    tmp_path: Path, procs: Procs, pki: Pki, fed_data: FedData, session_cache_dir: Path
) -> None:
    train = fed_data.groups[:3]
    rounds = 6
    port = free_port()  # a restarted coordinator must be found where the nodes look for it
    coord = start_coordinator(
        procs,
        tmp_path,
        pki,
        allow_list(train),
        {
            "listen": f"127.0.0.1:{port}",
            "rounds": rounds,
            "eval_every": 0,
            "min_nodes": 3,
            "min_updates": 3,
            "local_steps": 30,  # rounds of ~1 s: the kill lands well before the last one
        },
    )
    assert coord.port == port
    nodes = [
        start_node(procs, tmp_path, pki, coord, g, fed_data.files[g], cache_dir=session_cache_dir)
        for g in train
    ]
    everyone = [coord.proc, *nodes]
    coord.wait_round(2, 180, logs=nodes)
    coord.proc.kill()
    state = load_state(coord.state_dir)
    assert state is not None
    run_id, done_at_kill = state.run_id, state.completed_rounds
    assert 2 <= done_at_kill < rounds, f"killed after round {done_at_kill}: too late to test"

    restarted = restart_coordinator(procs, coord, session_cache_dir)
    everyone = [restarted.proc, *nodes]
    assert restarted.proc.wait(240, nodes) == 0, tails(everyone)
    for node in nodes:
        assert node.wait(60, everyone) == 0, tails(everyone)

    log = restarted.proc.log()
    assert f"resumed run {run_id} after round {done_at_kill}" in log, restarted.proc.tail()
    assert round_numbers(restarted.round_records()) == list(range(1, rounds + 1)), tails(everyone)
    assert [e["round"] for e in restarted.evaluation_records()] == [rounds]
    results = json.loads((restarted.state_dir / "results.json").read_text())
    assert results["run_id"] == run_id and results["rounds"] == rounds
    final = load_state(restarted.state_dir)
    assert final is not None and final.run_id == run_id
    # every node rejoined the same run by itself: two joins, one per coordinator process
    for node in nodes:
        joins = re.findall(r"joined run (\w+)", node.log())
        assert len(joins) >= 2 and set(joins) == {run_id}, node.tail()
        assert re.search(r"coordinator unreachable|joining again", node.log()), node.tail()
