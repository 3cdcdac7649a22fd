"""Node-local personalization: the settings a node takes from SHUTDOWN are checked before use.

(The whole path, from a real federation's SHUTDOWN to the saved checkpoint, is covered by
tests/test_federation.py's full run.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinymodel import CFG, random_item

from group_node.node import local_steps_of, personalization_settings, training_settings
from pluralfed import protocol
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb
from pluralfed.training import TrainingSettings, build_model, fine_tuned_copy


def hyperparameters(
    lr: float = 3e-4, context: tuple[int, int] = (9, 90), optimizer: str = ""
) -> pb.Hyperparameters:
    hp = pb.Hyperparameters(learning_rate=lr, optimizer=optimizer)
    hp.context_range.min, hp.context_range.max = context
    hp.target_range.min, hp.target_range.max = 9, 90
    return hp


def test_the_runs_settings_are_taken() -> None:
    s = training_settings(hyperparameters(1e-3, (5, 50)), "SHUTDOWN")
    assert math.isclose(s.learning_rate, 1e-3, rel_tol=1e-6)
    assert s.context_range == (5, 50) and s.target_range == (9, 90)


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        (hyperparameters(lr=0.0), "learning_rate 0.0 is not in (0, 1]"),
        (hyperparameters(lr=float("nan")), "learning_rate nan"),
        (hyperparameters(lr=5.0), "learning_rate 5.0"),
        (hyperparameters(context=(0, 90)), "context_range 0..90"),
        (hyperparameters(context=(50, 9)), "context_range 50..9"),
        (pb.Hyperparameters(learning_rate=3e-4), "context_range 0..0"),  # ranges missing
        # an optimizer of a newer coordinator, which this node does not have
        (hyperparameters(optimizer="lion"), "optimizer 'lion' is not one this node has"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(hp: pb.Hyperparameters, message: str) -> None:
    with pytest.raises(InputError) as err:
        training_settings(hp, "SHUTDOWN")
    assert message in str(err.value)


def test_settings_at_the_edges_of_their_ranges_are_taken() -> None:
    """The ranges are closed where the protocol says so: a learning rate of exactly
    MAX_LEARNING_RATE, an embedding noise of exactly MAX_EMBEDDING_NOISE, episodes of one
    question and 1 or MAX_LOCAL_STEPS local steps are a coordinator's right to send."""
    hp = hyperparameters(lr=protocol.MAX_LEARNING_RATE, context=(1, 1), optimizer="sgd")
    hp.target_range.min, hp.target_range.max = 1, 1
    hp.embedding_noise = protocol.MAX_EMBEDDING_NOISE
    s = training_settings(hp, "TRAIN")
    assert (s.learning_rate, s.embedding_noise) == (1.0, 1.0)
    assert (s.context_range, s.target_range, s.optimizer) == ((1, 1), (1, 1), "sgd")
    for steps in (1, protocol.MAX_LOCAL_STEPS):
        hp.local_steps = steps
        assert local_steps_of(hp) == steps


@pytest.mark.parametrize("steps", [0, protocol.MAX_LOCAL_STEPS + 1])
def test_local_steps_out_of_range_are_refused(steps: int) -> None:
    """A TRAIN task's local steps out of 1..MAX_LOCAL_STEPS (0: a field the coordinator left
    unset) are refused before any download, naming the field."""
    hp = hyperparameters()
    hp.local_steps = steps
    with pytest.raises(
        InputError, match=rf"local_steps {steps} is not in 1\.\.{protocol.MAX_LOCAL_STEPS}$"
    ):
        local_steps_of(hp)


def test_personalization_fine_tunes_with_adam_whatever_the_runs_local_optimizer() -> None:
    """A run of plain gradient steps (local_optimizer = "sgd", learning rate 1 as a gradient
    scale for the server's Adam) must not fine-tune with SGD at learning rate 1."""
    assert personalization_settings(hyperparameters()).optimizer == "adam"
    assert personalization_settings(hyperparameters()).learning_rate == 3e-4
    sgd = hyperparameters(lr=1.0)
    sgd.optimizer = "sgd"
    settings = personalization_settings(sgd)
    assert (settings.optimizer, settings.learning_rate) == ("adam", 3e-4)


def _items(n: int = 12) -> list:
    rng = np.random.default_rng(0)
    return [random_item(rng, 3, f"Question {i}?") for i in range(n)]


def test_a_fine_tuned_copy_is_ready_to_predict_and_leaves_the_federated_model_alone() -> None:
    """The copy is what the node saves and predicts with: trained, in eval mode (dropout off,
    so its predictions do not vary call to call); the final federated model is not changed."""
    model = build_model(CFG, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainingSettings(context_range=(2, 4), target_range=(2, 4))
    copy = fine_tuned_copy(model, _items(), 3, settings, seed=1)
    assert not copy.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in copy.state_dict().items())


def test_fine_tuning_that_leaves_weights_non_finite_is_refused() -> None:
    """The loss of a step is computed before the step: a last step that overflows the weights
    shows only in the weights, and a model of infinities must not be saved as personalized."""
    settings = TrainingSettings(
        learning_rate=3e38, optimizer="sgd", context_range=(2, 4), target_range=(2, 4)
    )
    with pytest.raises(ValueError, match="fine-tuning diverged"):
        fine_tuned_copy(build_model(CFG, 0), _items(), 1, settings, seed=1)
