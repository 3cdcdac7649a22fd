"""Fairness-aware aggregation (coordinator `fairness_q`, q-FedAvg with 1 - alignment as the loss).

The node's side: `alignment_before`, how well the weights a round starts from predict the first
training episode's targets, equals PROTOCOL's alignment computed independently through the
evaluation path. The coordinator's side, on the real engine and gRPC server with mutual TLS:
updates are averaged with weights n * (1 - alignment_before) ** q, the round record says which,
and an update without a usable `alignment_before` (or with any non-finite metric) is refused,
naming the metric, without touching the average. The whole path through real node processes is
in tests/test_federation.py (its full run uses fairness_q).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedharness import (
    FakeNode,
    assert_weights_close,
    reject_name,
    scaled,
    update_messages,
    weighted_average,
)
from test_update_validation import ENCODER, Federation, nudged, serve
from tinymodel import CFG, random_item

from coordinator.service import CoordinatorConfig
from coordinator.settings import RoundSettings
from pluralfed.episodes import sample_episode
from pluralfed.errors import InputError
from pluralfed.evaluation import predict_targets
from pluralfed.metrics import alignment_score
from pluralfed.model import GPO
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.protocol import ALIGNMENT_BEFORE
from pluralfed.training import LocalTrainer, TrainingSettings, build_model

pytestmark = pytest.mark.timeout(120)


def test_alignment_before_is_the_protocol_score_of_the_first_episode_before_training() -> None:
    rng = np.random.default_rng(3)
    items = [random_item(rng, int(rng.integers(2, 6)), f"q{i}") for i in range(40)]
    settings = TrainingSettings(context_range=(5, 12), target_range=(5, 12))
    model = build_model(dataclasses.replace(CFG, members=3), seed=1)
    untouched = GPO(model.cfg)
    untouched.load_state_dict(model.state_dict())
    # the episode the trainer's first step draws: same seed, same sampler
    episode = sample_episode(
        items, np.random.default_rng(7), settings.context_range, settings.target_range
    )
    preds = predict_targets(untouched, episode.context, episode.targets)
    expected = float(
        np.mean(
            [
                alignment_score(p, t.item.distribution)
                for p, t in zip(preds, episode.targets, strict=True)
            ]
        )
    )

    trainer = LocalTrainer(model, settings, seed=7)
    trainer.train_steps(items, 3)
    assert trainer.alignment_before == pytest.approx(expected, abs=1e-6)
    # it scores the weights the round started from, not the trained ones
    trained = predict_targets(model, episode.context, episode.targets)
    after = np.mean(
        [
            alignment_score(p, t.item.distribution)
            for p, t in zip(trained, episode.targets, strict=True)
        ]
    )
    assert after != pytest.approx(expected, abs=1e-6)
    # a second round scores its own first episode with the weights it starts from
    trainer.train_steps(items, 1)
    assert trainer.alignment_before is not None and trainer.alignment_before != expected


def test_a_round_stopped_before_its_first_step_has_no_alignment_before() -> None:
    """`alignment_before` belongs to the round that measured it: a round stopped before its
    first step (its task cancelled) scored nothing, so it must not report the previous round's
    figure as its own to a fairness-aware coordinator."""
    rng = np.random.default_rng(3)
    items = [random_item(rng, 3, f"q{i}") for i in range(12)]
    settings = TrainingSettings(context_range=(2, 4), target_range=(2, 4))
    trainer = LocalTrainer(build_model(CFG, seed=1), settings, seed=7)
    trainer.train_steps(items, 1)
    assert trainer.alignment_before is not None
    assert trainer.train_steps(items, 3, stop=lambda: True) == []
    assert trainer.alignment_before is None


@pytest.mark.parametrize("q", [-0.5, 10.5, math.nan, math.inf])
def test_coordinator_refuses_a_bad_fairness_q(q: float) -> None:
    with pytest.raises(InputError, match="fairness_q"):
        CoordinatorConfig(fairness_q=q).round_settings()


Q = 2.0
GOOD = {"node-good-a": 0.55, "node-good-b": 0.85}  # node -> its alignment_before
EXAMPLES = {"node-good-a": 30, "node-good-b": 50}


def _settings(weighting: str = "examples") -> RoundSettings:
    return RoundSettings(
        weighting=weighting,
        rounds=1,
        min_nodes=5,
        min_updates=1,
        round_timeout_s=scaled(60),
        eval_every=0,
        fairness_q=Q,
        heartbeat_interval_s=1.0,
        session_timeout_s=120.0,
    )


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_updates_are_weighed_by_how_badly_the_model_served_their_group(
    tmp_path: Path, weighting: str
) -> None:
    """Two good updates average with base * (1 - alignment_before) ** q, base = n (weighting
    "examples") or 1 ("uniform": fairness_q must not be dropped there, the aggregate would be a
    plain mean while the round record claims fairness weights); updates with no
    alignment_before, one out of [0, 1], or a NaN metric are refused as MALFORMED, each naming
    the metric, and none of them reaches the average."""
    bad = {
        "node-nan": {"loss": 0.5},  # fairness_q > 0 needs alignment_before
        "node-shape": {"loss": 0.5, ALIGNMENT_BEFORE: 1.5},
        "node-dtype": {"loss": math.nan, ALIGNMENT_BEFORE: 0.5},
    }
    with serve(tmp_path, _settings(weighting)) as fed:
        nodes = {i: fed.node(i) for i in [*GOOD, *bad]}
        try:
            for i, n in nodes.items():
                n.join(ENCODER, EXAMPLES.get(i, 10))
            tasks = {i: n.wait_task(pb.TASK_KIND_TRAIN, timeout=10) for i, n in nodes.items()}
            g0 = nodes["node-good-a"].download(tasks["node-good-a"].model_version)
            for k, (i, metrics) in enumerate(bad.items()):
                reply = _upload(fed, nodes[i], tasks[i], nudged(g0, 10 + k), 10, metrics)
                assert reject_name(reply) == "MALFORMED", (i, reply)
                name = "loss" if i == "node-dtype" else ALIGNMENT_BEFORE
                assert repr(name) in reply.message, (i, reply.message)
            updates = []
            for k, (i, before) in enumerate(GOOD.items()):
                update = nudged(g0, k)
                metrics = {"loss": 0.5, ALIGNMENT_BEFORE: before}
                reply = _upload(fed, nodes[i], tasks[i], update, EXAMPLES[i], metrics)
                assert reject_name(reply) == "ACCEPTED", reply
                updates.append(update)
            fed.wait_rounds(1)
        finally:
            for n in nodes.values():
                n.close()
        base = {i: 1 if weighting == "uniform" else EXAMPLES[i] for i in GOOD}
        weights = [base[i] * (1 - before) ** Q for i, before in GOOD.items()]
        expected = weighted_average(updates, weights)
        assert_weights_close(fed.engine.state.weights, expected, "fairness-weighted average")
        # the base weights alone would give a different model: the test can tell them apart
        plain = weighted_average(updates, [base[i] for i in GOOD])
        assert not np.allclose(plain["embed.weight"], expected["embed.weight"], atol=1e-6)
        [record] = [
            json.loads(line)
            for line in (fed.state_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind") == "round"
        ]
        groups = {i: fed.node(i).group for i in GOOD}
        assert record["update_weights"] == pytest.approx(
            {groups[i]: w for i, w in zip(GOOD, weights, strict=True)}
        )
        assert record["total_weight"] == pytest.approx(sum(weights))
        for i in bad:  # refused for good: the round did not wait for them
            assert record["outcomes"][fed.node(i).group].startswith("rejected: "), record
        assert record["node_metrics"][groups["node-good-a"]][ALIGNMENT_BEFORE] == 0.55


def _upload(
    fed: Federation,
    node: FakeNode,
    task: pb.Task,
    update: dict[str, np.ndarray],
    examples: int,
    metrics: dict[str, float],
) -> pb.UploadReply:
    return node.upload(update_messages(node.session_id, task, update, examples, metrics=metrics))


def test_without_fairness_q_a_missing_alignment_is_fine_and_weights_are_the_examples(
    tmp_path: Path,
) -> None:
    """q = 0 is plain FedAvg: nodes need not send alignment_before (older nodes keep working)."""
    settings = RoundSettings(
        rounds=1, min_nodes=2, min_updates=2, round_timeout_s=scaled(60), eval_every=0
    )
    with serve(tmp_path, settings) as fed:
        nodes = {i: fed.node(i) for i in GOOD}
        try:
            for i, n in nodes.items():
                n.join(ENCODER, EXAMPLES[i])
            tasks = {i: n.wait_task(pb.TASK_KIND_TRAIN, timeout=10) for i, n in nodes.items()}
            g0 = nodes["node-good-a"].download(tasks["node-good-a"].model_version)
            updates = [nudged(g0, k) for k in range(2)]
            for (i, n), update in zip(nodes.items(), updates, strict=True):
                reply = _upload(fed, n, tasks[i], update, EXAMPLES[i], {"loss": 0.5})
                assert reject_name(reply) == "ACCEPTED", reply
            fed.wait_rounds(1)
        finally:
            for n in nodes.values():
                n.close()
    expected = weighted_average(updates, [EXAMPLES[i] for i in GOOD])
    assert_weights_close(fed.engine.state.weights, expected, "plain FedAvg")


def test_uniform_weighting_with_fairness_q_still_weighs_by_alignment(tmp_path: Path) -> None:
    """weighting = "uniform" makes each update's base weight 1, not its examples; fairness_q
    still multiplies it by (1 - alignment_before) ** q (the aggregate is not the plain mean)."""
    from test_engine_recovery import ENC, WEIGHTS, replay_of, start, wait_for

    from coordinator.rounds import RoundEngine
    from coordinator.sessions import Role
    from coordinator.tasks import TaskKind

    settings = RoundSettings(
        rounds=1, min_nodes=2, eval_every=0, weighting="uniform", fairness_q=2.0
    )
    engine = RoundEngine(settings, WEIGHTS, tmp_path, ENC, {})
    nodes = [
        (engine.join("A", Role.TRAIN, 10, ENC, "t"), 0.5, 1.0),  # weight 0.5 ** 2
        (engine.join("B", Role.TRAIN, 30, ENC, "t"), 0.9, 0.0),  # weight 0.1 ** 2
    ]
    driver = start(engine)
    try:
        for s, before, value in nodes:
            t = engine.next_task(s.session_id, None, 10)
            assert t.kind == TaskKind.TRAIN
            engine.accept_update(
                s.session_id,
                None,
                t.task_id,
                t.round,
                10,
                {ALIGNMENT_BEFORE: before},
                replay_of(value),
                80,
                t.model_version,
            )
        wait_for(lambda: engine.completed_rounds() == 1)
    finally:
        engine.stop()
        driver.join(10)
    expected = 0.25 / (0.25 + 0.01)
    np.testing.assert_allclose(engine.state.weights["a"], expected, rtol=1e-6)
    record = engine.state.history.last
    assert record is not None
    assert record["update_weights"] == pytest.approx({"A": 0.25, "B": 0.01})
    assert record["total_weight"] == pytest.approx(0.26)
