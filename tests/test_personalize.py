"""Node-local personalization: the settings a node takes from SHUTDOWN are checked before use.

(The whole path, from a real federation's SHUTDOWN to the saved checkpoint, is covered by
tests/test_federation.py's full run.)"""

from __future__ import annotations

import math

import pytest

from group_node.node import personalization_settings, training_settings
from pluralfed.errors import InputError
from pluralfed.proto.pluralfed.v1 import federation_pb2 as pb


def hyperparameters(lr: float = 3e-4, context: tuple[int, int] = (9, 90)) -> pb.Hyperparameters:
    hp = pb.Hyperparameters(learning_rate=lr)
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
    ],
)
def test_bad_settings_are_refused_naming_the_field(hp: pb.Hyperparameters, message: str) -> None:
    with pytest.raises(InputError) as err:
        training_settings(hp, "SHUTDOWN")
    assert message in str(err.value)


def test_personalization_fine_tunes_with_adam_whatever_the_runs_local_optimizer() -> None:
    """A run of plain gradient steps (local_optimizer = "sgd", learning rate 1 as a gradient
    scale for the server's Adam) must not fine-tune with SGD at learning rate 1."""
    assert personalization_settings(hyperparameters()).optimizer == "adam"
    assert personalization_settings(hyperparameters()).learning_rate == 3e-4
    sgd = hyperparameters(lr=1.0)
    sgd.optimizer = "sgd"
    settings = personalization_settings(sgd)
    assert (settings.optimizer, settings.learning_rate) == ("adam", 3e-4)
