"""Local training steps (what a group node runs each round) and the centralized baseline loop."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pluralfed.episodes import (
    EmbeddedItem,
    EpisodeBatch,
    check_seed,
    jitter_questions,
    make_batch,
    sample_episode,
)
from pluralfed.metrics import alignment_score
from pluralfed.model import GPO, GPOConfig, gpo_loss, question_softmax
from pluralfed.protocol import (
    CONTEXT_RANGE,
    LEARNING_RATE,
    LOCAL_OPTIMIZERS,
    MAX_EMBEDDING_NOISE,
    TARGET_RANGE,
)

# torch.manual_seed takes 64-bit seeds only and treats a negative one as this much more, so
# reducing modulo it keeps every seed torch accepted as it was and lets larger ones through
TORCH_SEED_MODULUS = 2**64


def seed_everything(seed: int) -> None:
    """Same seed, same run: Python, numpy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % TORCH_SEED_MODULUS)


def build_model(config: GPOConfig, seed: int) -> GPO:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed % TORCH_SEED_MODULUS)
    model = GPO(config)
    torch.random.set_rng_state(generator_state)
    return model


@dataclass(frozen=True)
class TrainingSettings:
    learning_rate: float = LEARNING_RATE
    context_range: tuple[int, int] = CONTEXT_RANGE
    target_range: tuple[int, int] = TARGET_RANGE
    groups_per_step: int = 1  # episodes (one per group) in one optimizer step
    # std of the Gaussian shift added to each question's embeddings in training (0 = none; see
    # `jitter_questions`)
    embedding_noise: float = 0.0
    # the local optimizer: "adam" (the paper's), or "sgd" (one plain gradient step per step, for
    # a server optimizer that treats the averaged deltas as gradients; see coordinator `adam`)
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r}"
            )
        for name, (lo, hi) in (
            ("context_range", self.context_range),
            ("target_range", self.target_range),
        ):
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"{name} must be a range low..high with 1 <= low <= high, got {lo}..{hi}"
                )
        if self.optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(LOCAL_OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step must be at least 1, got {self.groups_per_step}")
        if not (
            np.isfinite(self.embedding_noise) and 0 <= self.embedding_noise <= MAX_EMBEDDING_NOISE
        ):
            raise ValueError(
                f"embedding_noise must be in 0..{MAX_EMBEDDING_NOISE}, got {self.embedding_noise!r}"
            )


def target_alignment(means: torch.Tensor, batch: EpisodeBatch) -> float:
    """Mean PROTOCOL alignment of the batch's target questions under the network's output.

    means: (B, T) or, for an ensemble, (members, B, T); the members' distributions are averaged
    as `GPO.predict` does (without the context memory, which training never uses).
    """
    stacked = means.detach() if means.dim() == 3 else means.detach().unsqueeze(0)
    pred = torch.stack([question_softmax(m, batch) for m in stacked]).mean(0).double().numpy()
    true = batch.probs.double().numpy()
    scores = [
        alignment_score(pred[b, start:end], true[b, start:end])
        for b, row in enumerate(batch.question_slices)
        for start, end in row
        if batch.is_target[b, start]
    ]
    if not scores:
        raise ValueError("the batch has no target questions to score")
    return float(np.mean(scores))


def make_optimizer(model: GPO, settings: TrainingSettings) -> torch.optim.Optimizer:
    """The local optimizer `settings.optimizer` names (one of protocol.LOCAL_OPTIMIZERS)."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    return torch.optim.Adam(model.parameters(), lr=settings.learning_rate)


class LocalTrainer:
    """Local training of one model with the settings' optimizer (Adam, the paper's, or SGD); its
    state lives here across rounds, as the paper's nodes keep Adam's."""

    def __init__(self, model: GPO, settings: TrainingSettings, seed: int) -> None:
        self.model = model
        self.settings = settings
        self.rng = np.random.default_rng(check_seed(seed))
        self.optimizer = make_optimizer(model, settings)
        self.steps_done = 0
        # alignment of the last `train_steps` call's first episode under the weights it started
        # from (before any of its steps): a fairness-aware coordinator weighs updates by it
        self.alignment_before: float | None = None

    def is_finite(self) -> bool:
        """Whether the weights and the optimizer state hold only finite numbers."""
        tensors: list[torch.Tensor] = [*self.model.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def reset_optimizer(self) -> None:
        """A fresh optimizer (no moments), for a task that asks not to keep the local optimizer
        state; the episode sampling goes on where it was, so tasks still draw new episodes."""
        self.optimizer = make_optimizer(self.model, self.settings)

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, groups: Sequence[Sequence[EmbeddedItem]], *, score: bool = False) -> float:
        """One optimizer step on one random episode from each of `groups` (batched, padded).

        score=True also records in `alignment_before` how well the weights the step starts
        from predict the episode's targets (free: it is the step's own forward pass).
        """
        s = self.settings
        episodes = [
            sample_episode(items, self.rng, s.context_range, s.target_range) for items in groups
        ]
        batch = jitter_questions(make_batch(episodes), s.embedding_noise, self.rng)
        self.model.train()
        mean, log_std = self.model(batch)
        if score:
            self.alignment_before = target_alignment(mean, batch)
        loss = gpo_loss(mean, log_std, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return float(loss.detach())

    def train_steps(
        self,
        items: Sequence[EmbeddedItem],
        steps: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[float]:
        """`steps` local steps on one group's TRAIN questions (a group node's round); the first
        step scores the weights the round starts from (`alignment_before`). `stop` is asked
        before each step: when it says True, the steps end there (fewer losses than `steps`),
        so a node whose task the coordinator cancelled does not train it to the end."""
        self.alignment_before = None
        losses: list[float] = []
        for i in range(steps):
            if stop is not None and stop():
                break
            losses.append(self.step([items], score=i == 0))
        return losses


def fine_tuned_copy(
    model: GPO,
    items: Sequence[EmbeddedItem],
    steps: int,
    settings: TrainingSettings,
    seed: int,
) -> GPO:
    """A copy of `model` fine-tuned `steps` steps on one group's questions, with a fresh Adam
    (personalization: the federation's optimizer state belongs to its rounds); `model` itself is
    not changed."""
    copy = GPO(model.cfg)
    copy.load_state_dict(model.state_dict())
    trainer = LocalTrainer(copy, settings, seed)
    losses = trainer.train_steps(items, steps)
    if not (all(math.isfinite(loss) for loss in losses) and trainer.is_finite()):
        raise ValueError(
            f"fine-tuning diverged (non-finite loss or weights; learning rate "
            f"{settings.learning_rate:g})"
        )
    return copy.eval()


EpochCallback = Callable[[int, float], None]


def train_centralized(
    trainer: LocalTrainer,
    groups: Mapping[str, Sequence[EmbeddedItem]],
    epochs: int,
    on_epoch: EpochCallback | None = None,
) -> list[float]:
    """Centralized training: every epoch, the groups shuffled, one step per batch of
    `groups_per_step` groups. The paper's code batches all 8 training groups into one step
    (groups_per_step = 8: 100 epochs are 100 steps); 1 steps on a group at a time (800 steps).
    Returns the mean loss of each epoch.
    """
    names = sorted(groups)
    per_step = max(1, trainer.settings.groups_per_step)
    losses = []
    for epoch in range(1, epochs + 1):
        order = [names[i] for i in trainer.rng.permutation(len(names))]
        epoch_losses = [
            trainer.step([groups[n] for n in order[i : i + per_step]])
            for i in range(0, len(order), per_step)
        ]
        losses.append(float(np.mean(epoch_losses)))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
