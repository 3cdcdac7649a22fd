"""The node's machine-learning side: its private data, local training and evaluation.

Nothing here knows about gRPC. The raw answers and their embeddings stay in this object; what
leaves is model weights (`weights()`) and aggregate metrics (`evaluate()`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pluralfed.checkpoint import save_checkpoint
from pluralfed.data import SurveyData
from pluralfed.embeddings import TextEncoder
from pluralfed.episodes import GroupSplit
from pluralfed.errors import InputError
from pluralfed.evaluation import GroupEvaluation, evaluate_group
from pluralfed.model import GPO, GPOConfig
from pluralfed.prepare import embed_groups
from pluralfed.tensorfiles import numpy_to_state_dict, state_dict_to_numpy
from pluralfed.training import LocalTrainer, TrainingSettings, fine_tuned_copy

log = logging.getLogger("pluralfed.node")


class TaskCancelled(Exception):
    """The coordinator no longer wants the task this node works on (HeartbeatReply.cancel_task:
    its round closed, or this node's answer is already recorded): its work stops, and the node
    asks for its next task. No failure: nothing is reported."""


class TaskFailed(Exception):
    """This one task cannot be done here (local training diverged, the model predicts no
    distribution): the node reports the task as failed and goes on with the next one. Not an
    InputError, which stops the node: a learning rate too high for one round is no protocol
    break."""


@dataclass(frozen=True)
class LocalResult:
    steps: int
    mean_loss: float
    seconds: float
    # alignment of the first step's target questions under the global model, before training
    alignment_before: float


def node_seed(seed: int, group: str) -> int:
    """Each node its own random stream, the same on every run with the same seed."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def check_weights_fit(cfg: GPOConfig, weights: dict[str, np.ndarray]) -> None:
    """Raise InputError unless `weights` are exactly the tensors (names, shapes) of a GPO with
    `cfg`. The model is built on torch's meta device, which allocates nothing: a config that
    asks for a huge model cannot match weights the download already bounded."""
    try:
        with torch.device("meta"):
            wanted = GPO(cfg).state_dict()
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as err:
        raise InputError(f"the federation's model config does not build a model: {err}") from None
    missing = [name for name in wanted if name not in weights]
    unexpected = [name for name in weights if name not in wanted]
    if missing or unexpected:
        raise InputError(
            f"the federation's model weights do not fit its config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in wanted.items():
        shape = tuple(np.shape(weights[name]))
        if shape != tuple(tensor.shape):
            raise InputError(
                f"the federation's model weights do not fit its config: tensor {name!r} has "
                f"shape {shape}, the config makes it {tuple(tensor.shape)}"
            )
        # loading casts silently: float64 1e300 (finite) would become inf in a float32 model
        dtype = np.asarray(weights[name]).dtype
        if dtype != np.dtype(str(tensor.dtype).removeprefix("torch.")):
            raise InputError(
                f"the federation's model weights do not fit its config: tensor {name!r} is "
                f"{dtype}, the model's is {str(tensor.dtype).removeprefix('torch.')}"
            )


class GroupWorker:
    def __init__(self, group: str, data: SurveyData, encoder: TextEncoder, seed: int = 0) -> None:
        if group not in data.groups:
            raise InputError(
                f"group {group!r} is not in the node's data (it has: {sorted(data.groups)[:10]})"
            )
        self.group = group
        self.encoder = encoder
        self.seed = seed
        started = time.perf_counter()
        self.split: GroupSplit = embed_groups(data, [group], encoder)[group]
        log.info(
            "%s: %d train / %d test questions embedded in %.1f s",
            group,
            len(self.split.train),
            len(self.split.test),
            time.perf_counter() - started,
        )
        self.model: GPO | None = None
        self.trainer: LocalTrainer | None = None

    def forget_run(self) -> None:
        """Drop the model and its local optimizer (Adam moments, episode sampling): the node
        joined another run (JoinReply.run_id), and keep_local_optimizer_state keeps optimizer
        state only within one run, so the new run's first TRAIN task starts afresh."""
        self.model = None
        self.trainer = None

    @property
    def num_train_examples(self) -> int:
        return len(self.split.train)

    def load_global(self, config: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        """Take the global weights; the model (and the Adam state) is built once and kept.

        Config and weights come from the coordinator: both are checked, against each other
        too, before the model is built, so a bad pair is an InputError saying what is wrong
        (not a traceback, nor an allocation of whatever size the config asks for)."""
        try:
            cfg = GPOConfig.from_dict(config)
        except (TypeError, ValueError, ArithmeticError) as err:
            raise InputError(f"the federation's model config is not valid: {err}") from None
        if cfg.embed_dim != self.encoder.dim:
            raise InputError(
                f"the federation's model reads {cfg.embed_dim}-dim embeddings, this node's "
                f"encoder gives {self.encoder.dim}"
            )
        check_weights_fit(cfg, weights)
        if self.model is None or self.model.cfg != cfg:
            self.model = GPO(cfg)
            self.trainer = None
        try:
            self.model.load_state_dict(numpy_to_state_dict(weights))
        except RuntimeError as err:  # torch's "Error(s) in loading state_dict"
            raise InputError(f"the federation's model weights do not load: {err}") from None

    def train(
        self,
        steps: int,
        settings: TrainingSettings,
        keep_optimizer_state: bool = True,
        cancelled: Callable[[], bool] | None = None,
    ) -> LocalResult:
        """`steps` local steps from the loaded model; the optimizer state of the previous task is
        kept (the paper's nodes keep Adam's) unless `keep_optimizer_state` is False or the task
        asks for another optimizer. `cancelled` is asked
        between steps: once it says True, TaskCancelled ends the task before its next step (the
        steps taken stay in the optimizer state, as those of a task whose update was refused)."""
        if self.model is None:
            raise RuntimeError("no global model loaded")
        if self.trainer is None:
            self.trainer = LocalTrainer(self.model, settings, seed=node_seed(self.seed, self.group))
        else:
            # a state is kept only for the same kind of optimizer (a coordinator resumed with
            # another `local_optimizer` asks for another)
            same_kind = self.trainer.settings.optimizer == settings.optimizer
            self.trainer.settings = settings
            if keep_optimizer_state and same_kind:
                self.trainer.set_learning_rate(settings.learning_rate)
            else:
                self.trainer.reset_optimizer()
        self._check_trainable()
        started = time.perf_counter()
        try:
            losses = self.trainer.train_steps(self.split.train, steps, stop=cancelled)
        except ValueError as err:  # the metric's "not a distribution": predictions are NaN
            self.trainer = None
            raise TaskFailed(
                f"local training failed: the model's predictions are not finite ({err}); "
                "the optimizer state is reset"
            ) from None
        bad_step = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad_step is not None or not self.trainer.is_finite():
            # the Adam state kept across rounds would carry the NaN into every later round
            self.trainer = None
            where = (
                f"a non-finite loss at step {bad_step + 1}"
                if bad_step is not None
                else ("non-finite weights")
            )
            raise TaskFailed(
                f"local training diverged ({where} of {steps}, learning rate "
                f"{settings.learning_rate:g}): nothing is uploaded and the optimizer state is reset"
            )
        if len(losses) < steps:
            raise TaskCancelled(f"stopped after {len(losses)} of {steps} local steps")
        before = self.trainer.alignment_before
        assert before is not None  # train_steps scores its first step
        return LocalResult(steps, float(np.mean(losses)), time.perf_counter() - started, before)

    def personalized(self, steps: int, settings: TrainingSettings) -> GPO:
        """The loaded model fine-tuned on this group's TRAIN questions, as a copy."""
        if self.model is None:
            raise RuntimeError("no global model loaded")
        self._check_trainable()
        seed = node_seed(self.seed + 1, self.group)
        return fine_tuned_copy(self.model, self.split.train, steps, settings, seed)

    def save_personalized(
        self,
        folder: Path,
        steps: int,
        settings: TrainingSettings,
        base_model_version: str,
        base_round: int,
    ) -> None:
        """Fine-tune the loaded model on this group's TRAIN questions and save it as a checkpoint
        in `folder` (it stays on this machine: the node never sends it)."""
        model = self.personalized(steps, settings)
        save_checkpoint(
            folder,
            model,
            self.encoder.identity,
            {
                "mode": "personalized",
                "group": self.group,
                # `pluralfed evaluate --checkpoint` evaluates these groups by default
                "training_groups": [self.group],
                "base_model_version": base_model_version,
                "base_round": base_round,
                "steps": steps,
                "learning_rate": settings.learning_rate,
            },
        )

    @staticmethod
    def check_model_config(raw: dict[str, Any]) -> None:
        """ValueError (or TypeError) unless `raw` is a model config this node can build."""
        GPOConfig.from_dict(raw)

    def _check_trainable(self) -> None:
        if len(self.split.train) < 2:
            raise InputError(f"group {self.group!r} has fewer than 2 train questions to train on")

    def weights(self) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError("no model")
        return state_dict_to_numpy(self.model.state_dict())

    def evaluate(self, max_context: int, seed: int) -> GroupEvaluation:
        if self.model is None:
            raise RuntimeError("no global model loaded")
        try:
            with torch.inference_mode():
                return evaluate_group(self.model, self.split, max_context=max_context, seed=seed)
        except InputError as err:  # this group's data cannot be evaluated (no context)
            raise TaskFailed(f"evaluation failed: {err}") from None
        except ValueError as err:  # the metric's "not a distribution": predictions are NaN
            raise TaskFailed(
                f"evaluation failed: the model's predictions are not finite ({err})"
            ) from None
