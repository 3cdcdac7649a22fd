"""What the coordinator hands out and has open: the task kinds, a task as a node is told it
(`TaskSpec`), the global model as a node downloads it (`GlobalModel`), and the round the engine
has open (`OpenTask`, what its nodes answered so far), and what it keeps of the round it closed
last (`ClosedTask`).

Plain data, with no lock of their own and nothing of the transport: the round engine
(rounds.py) makes and changes them under its lock, and the transport (server.py) turns `TaskSpec`
and `GlobalModel` into its messages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from coordinator.sessions import Role
from coordinator.settings import RoundSettings
from coordinator.strategy import StreamingFedAvg
from pluralfed.metrics import GroupEvaluation


class TaskKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    WAIT = "wait"
    SHUTDOWN = "shutdown"


class GlobalModel(NamedTuple):
    """One version of the global model, as nodes download it."""

    version: str
    round: int  # completed rounds that made it
    weights: Mapping[str, np.ndarray]
    digest: bytes = b""  # digest_of(weights) when known: hashing a large model once is enough
    # the task open when it was read ("" none): its download is of use while that one is, and
    # read under the same lock, so a round closing in between cannot make it the next task's
    task_id: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """What a node is asked to do next; the transport turns it into a protobuf Task."""

    kind: TaskKind
    task_id: str = ""
    round: int = 0
    model_version: str = ""
    deadline: float = 0.0  # time.monotonic() seconds (the transport sends it as a timestamp)
    settings: RoundSettings | None = None


@dataclass
class OpenTask:
    """The task of the round the engine has open: whom it asked (`selected`), what each group
    answered, and what the answers add up to so far (the running sum of a training round's
    updates, or an evaluation round's reports). Read and changed under the engine's lock, but
    for `aggregate`'s folds (see RoundEngine.accept_update)."""

    kind: TaskKind
    task_id: str
    round: int
    model_version: str
    deadline: float
    selected: dict[str, str]  # session id -> group
    answered: dict[str, str] = field(default_factory=dict)  # group -> outcome
    folding: set[str] = field(default_factory=set)  # groups whose update is being folded now
    aggregate: StreamingFedAvg | None = None
    evaluations: dict[str, tuple[Role, GroupEvaluation]] = field(default_factory=dict)
    bytes_in: int = 0
    node_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # group -> its update's weight
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ClosedTask:
    """What the engine keeps of the round it closed last: whom it counted. A node whose answer
    closed a round (the likeliest moment for its reply to be lost) and sends it again must be
    told DUPLICATE or ALREADY_EXISTS, not "stale", or it cannot tell a counted answer from a
    lost one. The round's sums are let go; `answered` and `folding` are the closed round's own,
    so folds still ending after the close are seen."""

    kind: TaskKind
    task_id: str
    round: int
    answered: Mapping[str, str]  # group -> outcome
    folding: set[str]

    @classmethod
    def of(cls, t: OpenTask) -> ClosedTask:
        return cls(t.kind, t.task_id, t.round, t.answered, t.folding)

    def is_task(self, kind: TaskKind, task_id: str, round_: int) -> bool:
        return (self.kind, self.task_id, self.round) == (kind, task_id, round_)
