"""The round settings a run is made with: every field a node will be sent or the engine acts on,
refused when made if no run could use it (the coordinator's config and code alike make them here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.strategy import MAX_FAIRNESS_Q
from pluralfed import protocol
from pluralfed.config import ConfigValueError, check_finite_number, check_whole_number
from pluralfed.protocol import MAX_EMBEDDING_NOISE, MAX_GROUP_NAME

# Limits of the round settings. Each is what the protocol can carry (protos: uint32 rounds, ranges
# and max_context, uint64 seed) or what every node refuses (group_node/), so that a value
# no run could use is refused when the settings are made, not rounds later.
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# what nodes accept (pluralfed.protocol, which the node checks against too)
NODE_MAX_LOCAL_STEPS = protocol.MAX_LOCAL_STEPS
NODE_MAX_LEARNING_RATE = protocol.MAX_LEARNING_RATE
NODE_MIN_HEARTBEAT_S = protocol.MIN_HEARTBEAT_S
NODE_MAX_HEARTBEAT_S = protocol.MAX_HEARTBEAT_S
MAX_COUNT = 1_000_000  # rounds, nodes, updates: far above any real federation
MAX_DURATION_S = 365 * 24 * 3600.0  # a deadline must stay a representable timestamp
SERVER_OPTIMIZERS = ("fedavg", "fedadagrad", "fedadam", "fedyogi", "adam")
WEIGHTINGS = ("examples", "uniform")


@dataclass(frozen=True)
class RoundSettings:
    # the defaults are PROTOCOL.md's (pluralfed.protocol), as every reported figure uses them
    rounds: int = protocol.FEDERATED_ROUNDS
    min_nodes: int = 1  # training nodes needed before a round starts
    min_updates: int = 1  # accepted updates needed for a round to count
    round_timeout_s: float = 300.0
    eval_timeout_s: float = 300.0
    eval_every: int = protocol.EVAL_EVERY
    eval_at_start: bool = False
    local_steps: int = protocol.LOCAL_STEPS
    learning_rate: float = protocol.LEARNING_RATE
    embedding_noise: float = 0.0  # nodes' per-question embedding noise in training (std)
    context_range: tuple[int, int] = protocol.CONTEXT_RANGE
    target_range: tuple[int, int] = protocol.TARGET_RANGE
    max_context: int = protocol.EVAL_MAX_CONTEXT
    weighting: str = "examples"  # or "uniform"
    # q-FedAvg: each update's weight times (1 - its node's alignment_before) ** q; 0: FedAvg
    fairness_q: float = 0.0
    server_optimizer: str = "fedavg"
    # the nodes' optimizer: adam (the paper's), or sgd (each node's delta is then -learning_rate
    # x its gradients, for server_optimizer = "adam": centralized Adam on the groups' mean gradient)
    local_optimizer: str = protocol.LOCAL_OPTIMIZER
    server_lr: float | None = None  # None: the optimizer's default (1.0 for fedavg)
    norm_bound: float | None = None  # max L2 norm of (update - global); None: no bound
    seed: int = 0
    session_timeout_s: float = 60.0
    heartbeat_interval_s: float = 5.0
    quorum_timeout_s: float | None = None  # give up waiting for a quorum after this long
    # The groups that may only evaluate (held out); every other group may only train. None: each
    # node's Join says its role (nothing then stops a held-out group from training).
    evaluate_only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Refuse (ConfigValueError naming the field) every value no run could use, whether the
        settings come from the coordinator's config or are made in code (benchmarks, tests):
        one set of checks for both. NaN passes every comparison and infinity breaks deadlines,
        so every float must be finite."""
        for key, low, high in (
            ("rounds", 1, MAX_COUNT),
            ("min_nodes", 1, MAX_COUNT),
            ("min_updates", 1, MAX_COUNT),
            ("eval_every", 0, MAX_COUNT),  # 0: only at the end
            ("local_steps", 1, NODE_MAX_LOCAL_STEPS),
            ("max_context", 1, UINT32_MAX),
            ("seed", 0, UINT64_MAX),
        ):
            check_whole_number(key, getattr(self, key), low, high, SETTINGS)
        for key in ("context_range", "target_range"):
            pair = getattr(self, key)
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ConfigValueError(
                    key, f"{key} must be two whole numbers low, high; got {pair!r}", SETTINGS
                )
            for value in pair:
                check_whole_number(key, value, 1, UINT32_MAX, SETTINGS)
            if pair[0] > pair[1]:
                raise ConfigValueError(
                    key, f"{key} must be low <= high, got {pair[0]}..{pair[1]}", SETTINGS
                )
        _check_float("learning_rate", self.learning_rate, 0.0, NODE_MAX_LEARNING_RATE, True)
        _check_float("embedding_noise", self.embedding_noise, 0.0, MAX_EMBEDDING_NOISE)
        _check_float("fairness_q", self.fairness_q, 0.0, MAX_FAIRNESS_Q)
        for key in ("round_timeout_s", "eval_timeout_s", "session_timeout_s"):
            _check_float(key, getattr(self, key), 0.0, MAX_DURATION_S, True)
        _check_float(
            "heartbeat_interval_s",
            self.heartbeat_interval_s,
            NODE_MIN_HEARTBEAT_S,
            NODE_MAX_HEARTBEAT_S,
        )
        if self.quorum_timeout_s is not None:  # None: wait for a quorum forever
            _check_float("quorum_timeout_s", self.quorum_timeout_s, 0.0, MAX_DURATION_S, True)
        for key in ("server_lr", "norm_bound"):  # None: the optimizer's default; no bound
            value = getattr(self, key)
            if value is not None:
                _check_float(key, value, 0.0, math.inf, True)
        if not isinstance(self.eval_at_start, bool):
            raise ConfigValueError(
                "eval_at_start",
                f"eval_at_start must be true or false, got {self.eval_at_start!r}",
                SETTINGS,
            )
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS, any_case=True)
        _check_choice("local_optimizer", self.local_optimizer, protocol.LOCAL_OPTIMIZERS)
        if self.evaluate_only is not None:
            names = self.evaluate_only
            if not isinstance(names, tuple) or not all(
                isinstance(n, str) and 0 < len(n.strip()) <= MAX_GROUP_NAME for n in names
            ):
                raise ConfigValueError(
                    "evaluate_only",
                    f"evaluate_only must be a list of group names (1..{MAX_GROUP_NAME} "
                    f"characters), got {names!r}",
                    SETTINGS,
                )
            unprintable = [n for n in names if not n.isprintable()]
            if unprintable:  # the allow-list refuses such names: none would ever match
                raise ConfigValueError(
                    "evaluate_only",
                    f"evaluate_only name {unprintable[0]!r} holds control characters",
                    SETTINGS,
                )
            spaced = [n for n in names if n != n.strip()]
            if spaced:  # the allow-list refuses such names: none would ever match
                raise ConfigValueError(
                    "evaluate_only",
                    f"evaluate_only name {spaced[0]!r} has leading or trailing whitespace; "
                    f"remove it ({spaced[0].strip()!r})",
                    SETTINGS,
                )
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigValueError(
                    "evaluate_only", f"evaluate_only names {twice} more than once", SETTINGS
                )
        # across fields
        if self.min_updates > self.min_nodes:
            raise ConfigValueError(
                "min_updates",
                f"min_updates must be at most min_nodes ({self.min_nodes}), got {self.min_updates}",
                SETTINGS,
                related=("min_nodes",),
            )
        if self.session_timeout_s <= self.heartbeat_interval_s:
            raise ConfigValueError(
                "session_timeout_s",
                f"session_timeout_s ({self.session_timeout_s:g}) must be longer than "
                f"heartbeat_interval_s ({self.heartbeat_interval_s:g})",
                SETTINGS,
                related=("heartbeat_interval_s",),
            )


SETTINGS = "round settings"


def _check_float(key: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    check_finite_number(key, value, low, high, low_open=low_open, what=SETTINGS)


def _check_choice(
    key: str, value: object, choices: Iterable[str], *, any_case: bool = False
) -> None:
    names = list(choices)
    given = value.lower() if any_case and isinstance(value, str) else value
    if not isinstance(value, str) or given not in names:
        raise ConfigValueError(
            key, f"{key} must be one of {', '.join(names)}, got {value!r}", SETTINGS
        )
