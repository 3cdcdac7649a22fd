"""Embedding noise in training: one random shift per question, the same for all its options,
reproducible from the trainer's seed, off (and bit-for-bit the old training) at 0, validated
wherever the setting comes in (training settings, coordinator config, a node's TRAIN task)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tinymodel import CFG, random_item

from coordinator.server import task_to_proto
from coordinator.service import CoordinatorConfig
from coordinator.settings import RoundSettings
from coordinator.tasks import TaskKind, TaskSpec
from group_node.node import local_steps_of, training_settings
from pluralfed.episodes import Episode, EpisodeBatch, jitter_questions, make_batch
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.training import LocalTrainer, TrainingSettings, build_model

torch.set_num_threads(1)


def _batch() -> tuple[list[Episode], EpisodeBatch]:
    rng = np.random.default_rng(0)
    episodes = [
        Episode([random_item(rng, 3, "a"), random_item(rng, 4, "b")], [random_item(rng, 5, "c")]),
        Episode([random_item(rng, 2, "d")], [random_item(rng, 3, "e")]),  # shorter: padded
    ]
    return episodes, make_batch(episodes)


def test_each_question_moves_by_one_shift_shared_by_its_options() -> None:
    _, batch = _batch()
    moved = jitter_questions(batch, 0.5, np.random.default_rng(1))
    shift = (moved.embeddings - batch.embeddings).numpy()
    shifts = []
    for row, slices in enumerate(batch.question_slices):
        for start, end in slices:
            per_option = shift[row, start:end]
            np.testing.assert_allclose(per_option, per_option[:1].repeat(end - start, 0), atol=1e-6)
            shifts.append(per_option[0])
    # questions get different shifts, of about the asked size
    assert min(np.abs(a - b).max() for i, a in enumerate(shifts) for b in shifts[i + 1 :]) > 1e-3
    assert 0.3 < float(np.std(np.stack(shifts))) < 0.7
    padding = ~batch.token_mask.numpy()
    assert padding.any() and np.all(shift[padding] == 0)
    # the rest of the batch, and the batch it came from, are untouched
    assert torch.equal(moved.probs, batch.probs) and torch.equal(moved.segment, batch.segment)
    assert moved.question_slices == batch.question_slices
    assert not torch.equal(moved.embeddings, batch.embeddings)


def test_no_noise_is_the_same_batch_and_draws_no_random_numbers() -> None:
    _, batch = _batch()
    rng = np.random.default_rng(5)
    assert jitter_questions(batch, 0.0, rng) is batch
    assert rng.random() == np.random.default_rng(5).random()


@pytest.mark.parametrize("std", [-0.1, float("nan"), float("inf")])
def test_bad_noise_is_refused(std: float) -> None:
    _, batch = _batch()
    with pytest.raises(ValueError, match="embedding noise"):
        jitter_questions(batch, std, np.random.default_rng(0))


def _trained(noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(3)
    items = [random_item(rng, 4, f"q{i}") for i in range(30)]
    model = build_model(CFG, seed=0)
    settings = TrainingSettings(context_range=(3, 8), target_range=(3, 8), embedding_noise=noise)
    LocalTrainer(model, settings, seed).train_steps(items, 5)
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_training_with_noise_is_reproducible_and_differs_from_without() -> None:
    assert _same(_trained(0.1), _trained(0.1))
    assert not _same(_trained(0.1), _trained(0.0))
    assert not _same(_trained(0.1, seed=0), _trained(0.1, seed=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embedding_noise", -0.01),
        ("embedding_noise", 1.5),
        ("embedding_noise", float("nan")),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        # an infinite rate passed `> 0` and turned the weights into NaN at the first step
        ("learning_rate", float("inf")),
        ("optimizer", "adagrad"),
        ("context_range", (0, 5)),
        ("target_range", (9, 3)),
        ("groups_per_step", 0),
    ],
)
def test_training_settings_are_validated(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        TrainingSettings(**kwargs)


def test_the_coordinator_sends_its_noise_to_the_nodes() -> None:
    settings = CoordinatorConfig(embedding_noise=0.06).round_settings()
    assert settings.embedding_noise == 0.06
    spec = TaskSpec(TaskKind.TRAIN, "t1", 3, "v3", settings=settings)
    hp = task_to_proto(spec).hyperparameters
    got = training_settings(hp, "TRAIN")
    assert got.embedding_noise == pytest.approx(0.06)
    assert got.learning_rate == pytest.approx(settings.learning_rate)


@pytest.mark.parametrize("value", [-0.1, 1.01])
def test_coordinator_config_refuses_bad_noise(value: float) -> None:
    with pytest.raises(InputError, match="embedding_noise"):
        CoordinatorConfig(embedding_noise=value).round_settings()
    with pytest.raises(ValueError, match="embedding_noise"):
        RoundSettings(embedding_noise=value)


def _hp(**fields: object) -> pb.Hyperparameters:
    hp = pb.Hyperparameters(local_steps=6, learning_rate=3e-4)
    hp.context_range.min, hp.context_range.max = 9, 90
    hp.target_range.min, hp.target_range.max = 9, 90
    for name, value in fields.items():
        setattr(hp, name, value)
    return hp


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        (_hp(embedding_noise=-0.5), "TRAIN hyperparameters: embedding_noise -0.5 is not in 0..1"),
        (_hp(embedding_noise=2.0), "embedding_noise 2.0"),
        (_hp(embedding_noise=float("nan")), "embedding_noise nan"),
        (_hp(learning_rate=float("inf")), "learning_rate inf"),
        (_hp(optimizer="lbfgs"), "optimizer 'lbfgs' is not one this node has (only 'adam', 'sgd')"),
    ],
)
def test_a_node_refuses_a_train_task_with_bad_settings(
    hp: pb.Hyperparameters, message: str
) -> None:
    with pytest.raises(InputError) as err:
        training_settings(hp, "TRAIN")
    assert message in str(err.value)


def test_a_node_refuses_a_train_task_without_steps() -> None:
    assert local_steps_of(_hp()) == 6
    for steps in (0, 10**6):
        with pytest.raises(InputError, match=f"local_steps {steps} is not in 1.."):
            local_steps_of(_hp(local_steps=steps))


def test_a_task_without_the_field_means_no_noise() -> None:
    """Coordinators from before the setting send no field: nodes train as before."""
    assert training_settings(_hp(), "TRAIN").embedding_noise == 0.0


def test_a_node_ignores_settings_it_does_not_know() -> None:
    """A newer coordinator's extra settings (Hyperparameters.extensions, fields this node has no
    name for) neither refuse the task nor change how the node trains."""
    hp = _hp()
    hp.extensions["momentum"] = "0.9"
    hp.extensions[""] = "\x00" * 1000
    newer = pb.Hyperparameters.FromString(
        hp.SerializeToString() + b"\xf8\x06\x01"  # field 111, varint 1: unknown to this node
    )
    assert training_settings(newer, "TRAIN") == training_settings(_hp(), "TRAIN")
    assert local_steps_of(newer) == 6


def test_a_node_runs_the_optimizer_the_task_names() -> None:
    assert training_settings(_hp(), "TRAIN").optimizer == "adam"  # an older coordinator: Adam
    assert training_settings(_hp(optimizer="sgd"), "TRAIN").optimizer == "sgd"
    settings = CoordinatorConfig(local_optimizer="sgd").round_settings()
    hp = task_to_proto(TaskSpec(TaskKind.TRAIN, "t1", 3, "v3", settings=settings)).hyperparameters
    assert hp.optimizer == "sgd"
    with pytest.raises(InputError, match="local_optimizer must be one of adam, sgd"):
        CoordinatorConfig(local_optimizer="lbfgs")


def test_a_coordinators_train_task_asks_nodes_to_keep_their_local_optimizer_state() -> None:
    """The paper's nodes keep Adam's moments from one round to the next (PROTOCOL.md's
    reference settings): a coordinator's TRAIN task says so, whatever local optimizer it asks
    for, or every round would restart Adam from zero and the runs would not compare."""
    for optimizer in ("adam", "sgd"):
        settings = CoordinatorConfig(local_optimizer=optimizer).round_settings()
        spec = TaskSpec(TaskKind.TRAIN, "t1", 3, "v3", settings=settings)
        assert task_to_proto(spec).hyperparameters.keep_local_optimizer_state is True
