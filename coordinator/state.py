"""The run's durable state: global weights, completed rounds, history, server-optimizer state.

Written after every round so that a coordinator killed at any moment restarts where it was:
the round's record is appended to history.jsonl and weights go to a new safetensors file first,
then `state.json` (the commit point) is renamed over the old one naming that file and how much
of history.jsonl is the run's, then the previous weights file is removed. A crash between any
two steps leaves a consistent state.json pointing at complete weights and records. state.json
records the BLAKE3 digest of the weights (and optimizer) file it names and of the records, so a
file changed on disk afterwards (a flipped bit that keeps the values finite) is refused on
resume, not sent to every node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.history import EVALUATIONS_FILE, HISTORY_FILE, EvaluationLog, RoundHistory
from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_json, commit_file
from pluralfed.records import EvaluationRecord, RoundRecord
from pluralfed.tensorfiles import load_tensors, save_tensors
from pluralfed.wire import digest_of

STATE_FILE = "state.json"
# 2: the history in history.jsonl (1 kept it in state.json: a start of this version moves it)
STATE_VERSION = 2
# what a run leaves in its state folder besides state.json (weights-r00000 is only the initial
# model of a start killed before its first state.json, which the seed makes again)
RUN_FILES = (
    "weights-r*.safetensors",
    "optimizer-r*.safetensors",
    HISTORY_FILE,
    EVALUATIONS_FILE,
    "metrics.jsonl",
    "results.json",
)


class CheckpointError(Exception):
    """The run's state could not be written (a full disk, a read-only folder): the run cannot go
    on, but state.json, renamed into place only once complete, still holds the last checkpoint."""


@dataclass
class RunState:
    run_id: str
    completed_rounds: int
    weights: dict[str, np.ndarray]
    model_config: dict[str, Any]
    encoder_identity: str
    history: RoundHistory  # in the state folder's history.jsonl
    evaluations: EvaluationLog  # in its evaluations.jsonl
    optimizer_state: dict[str, Any] = field(default_factory=dict)


def _weights_name(state: RunState) -> str:
    return f"weights-r{state.completed_rounds:05d}.safetensors"


def _optimizer_name(state: RunState) -> str:
    return f"optimizer-r{state.completed_rounds:05d}.safetensors"


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Any failure to write `path` as a CheckpointError naming it (safetensors' own I/O error
    names no file)."""
    try:
        yield
    except Exception as err:
        raise CheckpointError(f"cannot write {path}: {err}") from err


def _save_tensor_file(
    folder: Path, name: str, tensors: Mapping[str, np.ndarray], digest: bytes | None = None
) -> str:
    """Write `tensors` to `folder/name` (a temp file first, removed if the write fails);
    returns their digest's hex (`digest` if the caller has it), which state.json records."""
    tmp = folder / f".{name}.tmp"
    with _writing(folder / name):
        try:
            save_tensors(tmp, tensors)
            commit_file(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return (digest or digest_of(tensors)).hex()


def save_state(
    folder: Path,
    state: RunState,
    weights_digest: bytes | None = None,
    record: RoundRecord | None = None,
    evaluation: EvaluationRecord | None = None,
) -> None:
    """Checkpoint `state`, with `record` (the round it completed) or `evaluation` appended to
    its records first; raises CheckpointError naming the file that could not be written
    (state.json is then still the previous checkpoint, unless only the folder's fsync after
    its rename failed; a record appended stays beyond what it counts, and the records in
    memory keep it: the run stops). `weights_digest`: `digest_of` the weights, when the caller
    has it already (the round engine hashes them for the version)."""
    folder = Path(folder)
    for records, name in ((state.history, HISTORY_FILE), (state.evaluations, EVALUATIONS_FILE)):
        if records.path != folder / name:
            raise ValueError(f"the records of a state saved to {folder} are in {records.path}")
    with _writing(state.history.path):
        state.history.write_pending()  # a version-1 state's records, at its first checkpoint
        if record is not None:
            state.history.append(record)
    with _writing(state.evaluations.path):
        state.evaluations.write_pending()
        if evaluation is not None:
            state.evaluations.append(evaluation)
    weights_file = _weights_name(state)
    arrays = {k: v for k, v in state.optimizer_state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.optimizer_state.items() if not isinstance(v, np.ndarray)}
    optimizer_file = _optimizer_name(state) if arrays else None
    # files this checkpoint adds (not a round's files written again): removed if it fails, so
    # that a full disk is not left fuller by a model no state.json names
    added = [
        folder / name
        for name in (weights_file, optimizer_file)
        if name is not None and not (folder / name).exists()
    ]
    try:
        _commit_state(folder, state, weights_file, optimizer_file, arrays, scalars, weights_digest)
    except CheckpointError:
        # not the files a state.json on disk names: the write can fail after its rename (the
        # folder's fsync), and that state.json is then the checkpoint
        named = _named_files(folder / STATE_FILE)
        for path in added:
            if named is not None and path.name not in named:
                path.unlink(missing_ok=True)
        raise
    keep = {weights_file, optimizer_file}
    for old in [*folder.glob("weights-r*.safetensors"), *folder.glob("optimizer-r*.safetensors")]:
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _named_files(path: Path) -> set[str] | None:
    """The weights and optimizer files `path` (a state.json) names; None if it cannot be read
    (then nothing may be taken for unnamed)."""
    try:
        raw = json.loads(path.read_bytes())
        return {str(raw.get("weights_file")), str(raw.get("optimizer_file"))}
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _commit_state(
    folder: Path,
    state: RunState,
    weights_file: str,
    optimizer_file: str | None,
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
    weights_digest: bytes | None,
) -> None:
    """The weights (and optimizer) files, then state.json naming them: the commit point."""
    weights_hex = _save_tensor_file(folder, weights_file, state.weights, weights_digest)
    optimizer_digest = None
    if optimizer_file is not None:
        optimizer_digest = _save_tensor_file(folder, optimizer_file, arrays)
    with _writing(folder / STATE_FILE):
        atomic_write_json(
            folder / STATE_FILE,
            {
                "version": STATE_VERSION,
                "run_id": state.run_id,
                "completed_rounds": state.completed_rounds,
                "weights_file": weights_file,
                "weights_digest": weights_hex,
                "optimizer_file": optimizer_file,
                "optimizer_digest": optimizer_digest,
                "optimizer_scalars": scalars,
                "model_config": state.model_config,
                "encoder_identity": state.encoder_identity,
                "history_bytes": state.history.nbytes,
                "history_digest": state.history.digest(),
                "evaluations_bytes": state.evaluations.nbytes,
                "evaluations_digest": state.evaluations.digest(),
            },
        )


def run_leftovers(folder: Path) -> list[str]:
    """What of an earlier run `folder` holds (sorted names; `final/` for its model)."""
    found = {p.name for pattern in RUN_FILES for p in folder.glob(pattern)}
    found.discard("weights-r00000.safetensors")
    if (folder / "final").exists():
        found.add("final/")
    return sorted(found)


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


def _check_digest(
    raw: dict[str, Any], key: str, tensors: Mapping[str, np.ndarray], where: Path, path: Path
) -> None:
    """The digest state.json recorded for a tensor file (older state.json files have none)."""
    recorded = raw.get(key)
    if recorded is None:
        return
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise InputError(f"{path}: field {key!r} must be a BLAKE3 digest (64 hex digits)")
    if digest_of(tensors).hex() != recorded.lower():
        raise InputError(
            f"{where}: its contents do not match the digest {path} recorded for it ({key}): "
            "the file was damaged or changed after it was written; restore it from a backup, "
            "or start a new run in another state folder"
        )


def _inline(raw: dict[str, Any], key: str, path: Path) -> list[Any]:
    """A version-1 state.json's list of records."""
    if not isinstance(raw.get(key), list):
        raise InputError(f"{path}: field {key!r} missing or not a list")
    return list(raw[key])


def _logs(folder: Path, raw: dict[str, Any], path: Path) -> tuple[RoundHistory, EvaluationLog]:
    """The run's records: history.jsonl and evaluations.jsonl as state.json names them, or (a
    state.json of version 1) state.json's own lists, checked, which the first checkpoint writes
    there."""
    if raw["version"] == 1:
        history = RoundHistory.from_records(
            folder / HISTORY_FILE, _inline(raw, "history", path), f"{path}: history"
        )
        evaluations = EvaluationLog.from_records(
            folder / EVALUATIONS_FILE, _inline(raw, "evaluations", path), f"{path}: evaluations"
        )
        return history, evaluations
    named = []
    for key in ("history", "evaluations"):
        nbytes, digest = raw.get(f"{key}_bytes"), raw.get(f"{key}_digest")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise InputError(f"{path}: field '{key}_bytes' missing or not a count of bytes")
        if not isinstance(digest, str) or len(digest) != 64:
            raise InputError(
                f"{path}: field '{key}_digest' must be a BLAKE3 digest (64 hex digits)"
            )
        named.append((nbytes, digest))
    return (
        RoundHistory.load(folder / HISTORY_FILE, *named[0], path),
        EvaluationLog.load(folder / EVALUATIONS_FILE, *named[1], path),
    )


def _check_consistent(
    raw: dict[str, Any], history: RoundHistory, evaluations: EvaluationLog, path: Path
) -> None:
    """state.json's fields agree with each other and the records, as save_state writes them:
    one record per completed round (their order the records check), the weights file of that
    round, evaluations of rounds done. Anything else was edited or damaged, and resuming from
    it would lose or repeat rounds."""
    done = raw["completed_rounds"]
    if len(history) != done:
        raise InputError(
            f"{path}: field 'completed_rounds' is {done}, but the history holds "
            f"{len(history)} round record(s)"
        )
    expected = f"weights-r{done:05d}.safetensors"
    if raw["weights_file"] != expected:
        raise InputError(
            f"{path}: field 'weights_file' is {raw['weights_file']!r}, expected {expected!r} "
            f"for completed_rounds {done}"
        )
    optimizer = raw.get("optimizer_file")
    if optimizer and optimizer != f"optimizer-r{done:05d}.safetensors":
        raise InputError(
            f"{path}: field 'optimizer_file' is {optimizer!r}, expected "
            f"'optimizer-r{done:05d}.safetensors' for completed_rounds {done}"
        )
    last = evaluations.last
    if last is not None and last["round"] > done:
        raise InputError(
            f"{path}: the evaluations hold one of round {last['round']}, beyond "
            f"completed_rounds {done}"
        )


def _finite(tensors: dict[str, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise InputError(f"{where}: tensor {name!r} has non-finite values (NaN or infinity)")
    return tensors


def load_state(folder: Path) -> RunState | None:
    """The saved state, or None if the folder holds no run yet. Every field is checked, since
    the run continues from it: a bad state.json is refused with what and where, never half used.
    A folder with another run's files but no state.json is refused too: starting afresh there
    would delete that run's weights at once and overwrite its metrics and results."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.exists():
        leftovers = run_leftovers(folder)
        if leftovers:
            raise InputError(
                f"{folder} holds files of an earlier run ({', '.join(leftovers)}) but no "
                f"{STATE_FILE}, so that run cannot be resumed, and a new run there would delete "
                "or overwrite them: restore its state.json, or move those files away, or give "
                "the coordinator another state folder"
            )
        return None
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(f"{path}: cannot resume from this state: {err}") from err
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("version")
    if type(version) is not int or version not in (1, STATE_VERSION):
        raise InputError(
            f"{path}: state version {raw.get('version')!r}, expected {STATE_VERSION} (or 1)"
        )
    for key, kind in (
        ("run_id", str),
        ("completed_rounds", int),
        ("weights_file", str),
        ("model_config", dict),
        ("encoder_identity", str),
    ):
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise InputError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if raw["completed_rounds"] < 0:
        raise InputError(f"{path}: field 'completed_rounds' is {raw['completed_rounds']}, < 0")
    scalars = raw.get("optimizer_scalars") or {}
    if not isinstance(scalars, dict):
        raise InputError(f"{path}: field 'optimizer_scalars' must be an object")
    history, evaluations = _logs(folder, raw, path)
    _check_consistent(raw, history, evaluations, path)
    weights_path = _file_in(folder, raw, "weights_file", path)
    optimizer_path = (
        _file_in(folder, raw, "optimizer_file", path) if raw.get("optimizer_file") else None
    )
    try:
        weights = _finite(load_tensors(weights_path), weights_path)
        _check_digest(raw, "weights_digest", weights, weights_path, path)
        optimizer_state: dict[str, Any] = dict(scalars)
        if optimizer_path is not None:
            arrays = _finite(load_tensors(optimizer_path), optimizer_path)
            _check_digest(raw, "optimizer_digest", arrays, optimizer_path, path)
            optimizer_state.update(arrays)
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
