"""The node's machine-learning side (group_node.worker.GroupWorker) on its own, with a real
model and real local training: the group it is built for, the model config it takes from the
coordinator, the settings and figures of each task, and what it refuses to train or evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_validation_node import DIM, SMALL, FakeEncoder, diverging_weights, small_weights

import pluralfed.training
from group_node.worker import GroupWorker, TaskCancelled, TaskFailed, node_seed
from pluralfed.checkpoint import load_checkpoint
from pluralfed.data import SurveyData, SurveyItem, is_test_question
from pluralfed.episodes import EmbeddedItem
from pluralfed.errors import InputError
from pluralfed.model import GPOConfig
from pluralfed.training import LocalTrainer, TrainingSettings

SETTINGS = TrainingSettings(context_range=(2, 3), target_range=(2, 3))


def questions(train: int, test: int, prefix: str = "Question") -> list[str]:
    """`train` TRAIN and `test` TEST questions (PROTOCOL.md's sha256 split)."""
    found: dict[bool, list[str]] = {False: [], True: []}
    i = 0
    while len(found[False]) < train or len(found[True]) < test:
        q = f"{prefix} {i}?"
        found[is_test_question(q)].append(q)
        i += 1
    return found[False][:train] + found[True][:test]


def group_worker(train: int = 8, test: int = 3, group: str = "G") -> GroupWorker:
    items = [SurveyItem(q, ("a", "b"), np.array([0.3, 0.7])) for q in questions(train, test)]
    return GroupWorker(group, SurveyData({group: items}), FakeEncoder())


def adam_steps(w: GroupWorker) -> set[float]:
    assert w.trainer is not None
    return {float(st["step"]) for st in w.trainer.optimizer.state.values()}


def test_each_group_draws_its_own_random_stream_the_same_on_every_run() -> None:
    """Nodes of one run share its seed: without the group in it, every node would draw the
    same episodes in the same order."""
    assert node_seed(0, "A") == node_seed(0, "A")
    assert len({node_seed(0, "A"), node_seed(0, "B"), node_seed(1, "A")}) == 3


def test_a_worker_is_only_for_a_group_in_its_data() -> None:
    items = [SurveyItem(q, ("a", "b"), np.array([0.3, 0.7])) for q in questions(4, 1)]
    with pytest.raises(
        InputError, match=r"group 'H' is not in the node's data \(it has: \['G'\]\)"
    ):
        GroupWorker("H", SurveyData({"G": items}), FakeEncoder())


def test_a_node_embeds_its_own_groups_questions_only() -> None:
    """The other groups of a shared data file are none of its business (and their embedding
    would cost minutes with the real encoder)."""
    encoded: list[str] = []

    class Counting(FakeEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            encoded.extend(texts)
            return super().encode(texts)

    mine = [SurveyItem(q, ("a", "b"), np.array([0.3, 0.7])) for q in questions(4, 1)]
    other = [SurveyItem(q, ("x", "y"), np.array([0.5, 0.5])) for q in questions(4, 1, "Other")]
    GroupWorker("G", SurveyData({"G": mine, "H": other}), Counting())
    assert encoded and all("Question" in t and "Other" not in t for t in encoded)


def test_a_model_for_embeddings_of_another_size_is_refused() -> None:
    cfg = GPOConfig(**{**SMALL.to_dict(), "embed_dim": 2 * DIM})
    with pytest.raises(
        InputError, match=f"reads {2 * DIM}-dim embeddings, this node's encoder gives {DIM}"
    ):
        group_worker().load_global(cfg.to_dict(), small_weights(cfg))


def test_a_new_model_config_gets_a_new_model_and_a_fresh_optimizer() -> None:
    """A coordinator restarted with another model (or a new run) sends another config: the
    node trains that model, not the one it kept, and Adam starts afresh for it."""
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    w.train(2, SETTINGS)
    wider = GPOConfig(**{**SMALL.to_dict(), "d_ff": 16})
    w.load_global(wider.to_dict(), small_weights(wider))
    before = w.weights()
    assert {k: v.shape for k, v in before.items()} == {
        k: v.shape for k, v in small_weights(wider).items()
    }
    w.train(3, SETTINGS)
    after = w.weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert adam_steps(w) == {3.0}


def test_each_task_trains_with_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer state is kept across TRAIN tasks, but each task's hyperparameters (here
    the episode sizes) are the ones the coordinator sent with it."""
    drawn: list[tuple[int, int]] = []
    original = pluralfed.training.sample_episode

    def recording(items: Sequence[EmbeddedItem], rng: Any, context: Any, target: Any) -> Any:
        drawn.append(context)
        return original(items, rng, context, target)

    monkeypatch.setattr(pluralfed.training, "sample_episode", recording)
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    w.train(1, SETTINGS)
    w.train(1, TrainingSettings(context_range=(4, 5), target_range=(2, 3)))
    assert drawn == [(2, 3), (4, 5)]
    assert adam_steps(w) == {2.0}


@pytest.mark.parametrize(("first", "then"), [("adam", "sgd"), ("sgd", "adam")])
def test_a_task_with_another_optimizer_trains_with_that_optimizer(first: str, then: str) -> None:
    """Keeping the optimizer state across tasks keeps one kind of optimizer: a task that asks
    for another (a coordinator resumed with another `local_optimizer`) gets a fresh optimizer
    of that kind. Before, the node went on stepping with the one it had."""
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    w.train(1, TrainingSettings(context_range=(2, 3), target_range=(2, 3), optimizer=first))
    w.train(1, TrainingSettings(context_range=(2, 3), target_range=(2, 3), optimizer=then))
    assert w.trainer is not None
    kinds = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    assert type(w.trainer.optimizer) is kinds[then]
    if then == "adam":
        assert adam_steps(w) == {1.0}  # fresh: the first task's step was another optimizer's


def test_a_tasks_mean_loss_is_the_mean_over_its_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    losses: list[list[float]] = []
    original = LocalTrainer.train_steps

    def recording(self: LocalTrainer, *args: Any, **kwargs: Any) -> list[float]:
        losses.append(original(self, *args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(LocalTrainer, "train_steps", recording)
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    result = w.train(4, SETTINGS)
    assert len(losses) == 1 and len(set(losses[0])) > 1
    assert result.steps == 4 and result.mean_loss == pytest.approx(float(np.mean(losses[0])))


@pytest.mark.parametrize("task", ["train", "personalized"])
def test_a_group_with_a_single_train_question_is_not_trained(task: str) -> None:
    """An episode needs a context and a target question."""
    w = group_worker(train=1, test=2)
    w.load_global(SMALL.to_dict(), small_weights())
    with pytest.raises(InputError, match="group 'G' has fewer than 2 train questions to train on"):
        w.train(1, SETTINGS) if task == "train" else w.personalized(1, SETTINGS)


def test_a_group_without_train_questions_fails_its_evaluation_not_the_node() -> None:
    """Nothing to use as context: the task fails (the node reports it and goes on), it is no
    InputError, which would stop the node."""
    w = group_worker(train=0, test=3)
    w.load_global(SMALL.to_dict(), small_weights())
    with pytest.raises(TaskFailed, match="evaluation failed: group 'G' has no train questions"):
        w.evaluate(max_context=90, seed=0)


@pytest.mark.parametrize("bad", ["predicts NaN", "diverges"])
def test_a_failed_task_resets_the_optimizer_it_would_have_poisoned(bad: str) -> None:
    """Weights that make every prediction NaN, or training diverge, fail the task; the next
    task, from good weights, starts a fresh optimizer (the failure says so)."""
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    w.train(2, SETTINGS)
    if bad == "predicts NaN":
        weights = {k: np.full(v.shape, 3e38, np.float32) for k, v in small_weights().items()}
    else:
        weights = diverging_weights()
    w.load_global(SMALL.to_dict(), weights)
    with pytest.raises(TaskFailed, match="the optimizer state is reset"):
        w.train(2, SETTINGS)
    w.load_global(SMALL.to_dict(), small_weights())
    w.train(3, SETTINGS)
    assert adam_steps(w) == {3.0}


def test_a_non_finite_loss_is_reported_at_the_step_it_came(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure the coordinator's operator reads names the step (1-based, of the task's)."""
    monkeypatch.setattr(LocalTrainer, "train_steps", lambda self, *a, **k: [0.7, float("nan")])
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    with pytest.raises(
        TaskFailed, match=r"local training diverged \(a non-finite loss at step 2 of 3,"
    ):
        w.train(3, SETTINGS)


@pytest.mark.parametrize("asked", [1, 3])
def test_a_task_cancelled_before_its_last_step_is_cancelled_not_done(asked: int) -> None:
    """`cancelled` says True before the last step (or the first): the task ends as cancelled,
    with the steps it took, never as an update that claims all of its steps."""
    calls: list[None] = []

    def cancelled() -> bool:
        calls.append(None)
        return len(calls) >= asked  # asked before each step: True before step `asked`

    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    with pytest.raises(TaskCancelled, match=rf"stopped after {asked - 1} of 3 local steps"):
        w.train(3, SETTINGS, cancelled=cancelled)


def test_an_evaluation_chooses_its_context_by_the_tasks_seed() -> None:
    """EvaluationConfig.seed chooses the context questions when the group has more than
    max_context: the same seed, the same evaluation; another seed, other contexts."""
    w = group_worker(train=8, test=3)
    w.load_global(SMALL.to_dict(), small_weights())
    scores = {seed: w.evaluate(max_context=2, seed=seed).model for seed in range(4)}
    assert w.evaluate(max_context=2, seed=1).model == scores[1]
    assert len(set(scores.values())) > 1


def test_a_last_step_that_leaves_the_weights_non_finite_fails_the_task() -> None:
    """Each step's loss is taken before its update: the update of a one-step task can make the
    weights non-finite with every loss finite: the task fails, before anything is uploaded,
    and the optimizer state that holds the NaN is dropped."""
    w = group_worker()
    w.load_global(SMALL.to_dict(), diverging_weights())
    with pytest.raises(TaskFailed, match=r"local training diverged \(non-finite weights of 1,"):
        w.train(1, SETTINGS)
    assert w.trainer is None


def test_personalization_does_not_replay_the_episodes_of_the_nodes_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fine-tuned copy draws its episodes from a stream of its own: with the training
    stream it would go over the very episodes of the node's first training task again."""
    drawn: list[list[str]] = []
    original = pluralfed.training.sample_episode

    def recording(*args: Any, **kwargs: Any) -> Any:
        episode = original(*args, **kwargs)
        drawn.append([e.item.question for e in [*episode.context, *episode.targets]])
        return episode

    monkeypatch.setattr(pluralfed.training, "sample_episode", recording)
    trained, personalized = group_worker(train=12), group_worker(train=12)
    for w in (trained, personalized):
        w.load_global(SMALL.to_dict(), small_weights())
    trained.train(3, SETTINGS)
    training_episodes, drawn[:] = list(drawn), []
    personalized.personalized(3, SETTINGS)
    assert len(drawn) == len(training_episodes) == 3
    assert drawn != training_episodes


def test_weights_with_a_tensor_the_config_does_not_make_are_refused() -> None:
    """All the config's tensors and no other: an extra one is a coordinator that sends
    another model than it describes, refused before anything is loaded, naming the tensor."""
    weights = {**small_weights(), "members.0.extra": np.zeros(3, np.float32)}
    with pytest.raises(InputError, match=r"missing \[\], unexpected \['members.0.extra'\]$"):
        group_worker().load_global(SMALL.to_dict(), weights)


def test_a_personalized_checkpoint_says_what_it_was_made_from(tmp_path: Path) -> None:
    """The copy stays on the node's machine; its model.json says whose it is and how it was
    made, and `training_groups` makes `pluralfed evaluate --checkpoint` take the node's group by
    default."""
    w = group_worker()
    w.load_global(SMALL.to_dict(), small_weights())
    settings = TrainingSettings(context_range=(2, 3), target_range=(2, 3), learning_rate=1e-3)
    w.save_personalized(tmp_path / "mine", 2, settings, "v7", 7)
    ckpt = load_checkpoint(tmp_path / "mine")
    assert ckpt.encoder == "fake-enc" and ckpt.model.cfg == SMALL
    assert ckpt.metadata == {
        "mode": "personalized",
        "group": "G",
        "training_groups": ["G"],
        "base_model_version": "v7",
        "base_round": 7,
        "steps": 2,
        "learning_rate": 1e-3,
    }
