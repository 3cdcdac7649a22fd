"""The run's durable state: global weights, completed rounds, history, server-optimizer state.

Written after every round so that a coordinator killed at any moment restarts where it was:
weights go to a new safetensors file first, then `state.json` (the commit point) is renamed over
the old one naming that file, then the previous weights file is removed. A crash between any two
steps leaves a consistent state.json pointing at complete weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_json, commit_file
from pluralfed.wire import load_tensors, save_tensors

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class RunState:
    run_id: str
    completed_rounds: int
    weights: dict[str, np.ndarray]
    model_config: dict[str, Any]
    encoder_identity: str
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: dict[str, Any] = field(default_factory=dict)


def _weights_name(state: RunState) -> str:
    return f"weights-r{state.completed_rounds:05d}.safetensors"


def _optimizer_name(state: RunState) -> str:
    return f"optimizer-r{state.completed_rounds:05d}.safetensors"


def save_state(folder: Path, state: RunState) -> None:
    folder = Path(folder)
    weights_file = _weights_name(state)
    tmp = folder / f".{weights_file}.tmp"
    save_tensors(tmp, state.weights)
    commit_file(tmp, folder / weights_file)
    arrays = {k: v for k, v in state.optimizer_state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.optimizer_state.items() if not isinstance(v, np.ndarray)}
    optimizer_file = None
    if arrays:
        optimizer_file = _optimizer_name(state)
        tmp = folder / f".{optimizer_file}.tmp"
        save_tensors(tmp, arrays)
        commit_file(tmp, folder / optimizer_file)
    atomic_write_json(
        folder / STATE_FILE,
        {
            "version": STATE_VERSION,
            "run_id": state.run_id,
            "completed_rounds": state.completed_rounds,
            "weights_file": weights_file,
            "optimizer_file": optimizer_file,
            "optimizer_scalars": scalars,
            "model_config": state.model_config,
            "encoder_identity": state.encoder_identity,
            "history": state.history,
            "evaluations": state.evaluations,
        },
    )
    keep = {weights_file, optimizer_file}
    for old in [*folder.glob("weights-r*.safetensors"), *folder.glob("optimizer-r*.safetensors")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def load_state(folder: Path) -> RunState | None:
    """The saved state, or None if the folder holds no run yet."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text("utf-8"))
        if raw.get("version") != STATE_VERSION:
            raise InputError(
                f"{path}: state version {raw.get('version')!r}, expected {STATE_VERSION}"
            )
        weights = load_tensors(Path(folder) / raw["weights_file"])
        optimizer_state: dict[str, Any] = dict(raw.get("optimizer_scalars") or {})
        if raw.get("optimizer_file"):
            optimizer_state.update(load_tensors(Path(folder) / raw["optimizer_file"]))
        return RunState(
            run_id=str(raw["run_id"]),
            completed_rounds=int(raw["completed_rounds"]),
            weights=weights,
            model_config=dict(raw["model_config"]),
            encoder_identity=str(raw["encoder_identity"]),
            history=list(raw["history"]),
            evaluations=list(raw["evaluations"]),
            optimizer_state=optimizer_state,
        )
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise InputError(f"{path}: cannot resume from this state: {err}") from err
