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
from pluralfed.records import EvaluationRecord, RoundRecord
from pluralfed.tensorfiles import load_tensors, save_tensors

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass
class RunState:
    run_id: str
    completed_rounds: int
    weights: dict[str, np.ndarray]
    model_config: dict[str, Any]
    encoder_identity: str
    history: list[RoundRecord] = field(default_factory=list)
    evaluations: list[EvaluationRecord] = field(default_factory=list)
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


def _file_in(folder: Path, raw: dict[str, Any], key: str, path: Path) -> Path:
    """The file `raw[key]` names, which must be a plain name inside the state folder: state.json
    never names another place, and a path that leaves the folder is refused, not followed."""
    name = raw[key]
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or Path(name).name != name
        or "\\" in name
        or "\0" in name
    ):
        raise InputError(f"{path}: field {key!r} must be a file name in {folder}, got {name!r}")
    return folder / name


def _records(raw: dict[str, Any], key: str, path: Path, needs: dict[str, type]) -> list[Any]:
    """raw[key] as a list of records (JSON objects), each with the fields the engine reads."""
    value = raw[key]
    if not isinstance(value, list):
        raise InputError(f"{path}: field {key!r} must be a list, got {type(value).__name__}")
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            raise InputError(f"{path}: {key}[{i}] must be an object, got {type(record).__name__}")
        for field_name, kind in needs.items():
            got = record.get(field_name)
            if not isinstance(got, kind) or isinstance(got, bool):
                raise InputError(
                    f"{path}: {key}[{i}] field {field_name!r} missing or not a {kind.__name__}"
                )
        if record["round"] < 0:
            raise InputError(f"{path}: {key}[{i}] has round {record['round']}")
    return value


def _finite(tensors: dict[str, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise InputError(f"{where}: tensor {name!r} has non-finite values (NaN or infinity)")
    return tensors


def load_state(folder: Path) -> RunState | None:
    """The saved state, or None if the folder holds no run yet. Every field is checked, since
    the run continues from it: a bad state.json is refused with what and where, never half used."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: cannot resume from this state: {err}") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("version") != STATE_VERSION:
        raise InputError(f"{path}: state version {raw.get('version')!r}, expected {STATE_VERSION}")
    for key, kind in (
        ("run_id", str),
        ("completed_rounds", int),
        ("weights_file", str),
        ("model_config", dict),
        ("encoder_identity", str),
        ("history", list),
        ("evaluations", list),
    ):
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise InputError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if raw["completed_rounds"] < 0:
        raise InputError(f"{path}: field 'completed_rounds' is {raw['completed_rounds']}, < 0")
    scalars = raw.get("optimizer_scalars") or {}
    if not isinstance(scalars, dict):
        raise InputError(f"{path}: field 'optimizer_scalars' must be an object")
    # what the engine and the final report read from each record
    history = _records(raw, "history", path, {"round": int, "participants": list})
    evaluations = _records(raw, "evaluations", path, {"round": int, "reports": dict})
    weights_path = _file_in(folder, raw, "weights_file", path)
    optimizer_path = (
        _file_in(folder, raw, "optimizer_file", path) if raw.get("optimizer_file") else None
    )
    try:
        weights = _finite(load_tensors(weights_path), weights_path)
        optimizer_state: dict[str, Any] = dict(scalars)
        if optimizer_path is not None:
            optimizer_state.update(_finite(load_tensors(optimizer_path), optimizer_path))
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise InputError(f"{path}: cannot resume from this state: {err}") from err
    return RunState(
        run_id=raw["run_id"],
        completed_rounds=raw["completed_rounds"],
        weights=weights,
        model_config=raw["model_config"],
        encoder_identity=raw["encoder_identity"],
        history=history,
        evaluations=evaluations,
        optimizer_state=optimizer_state,
    )
