"""Model checkpoints: weights as safetensors plus a small JSON of config and metadata. No pickle.

A checkpoint is a folder holding `model.safetensors` and `model.json`; both the centralized CLI and
the coordinator write this layout, and everything that serves or evaluates a model reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from pluralfed.errors import InputError
from pluralfed.fsutil import atomic_write_bytes, atomic_write_json
from pluralfed.model import GPO, GPOConfig, upgrade_state_dict

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: GPO
    encoder: str  # identity of the text encoder the model was trained with
    metadata: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(folder: Path, model: GPO, encoder: str, metadata: dict[str, Any]) -> None:
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_FILE, save(tensors))
    atomic_write_json(
        folder / META_FILE,
        {
            "format_version": FORMAT_VERSION,
            "config": model.cfg.to_dict(),
            "encoder": encoder,
            "metadata": metadata,
        },
    )


def load_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.exists():
            raise InputError(f"{p}: checkpoint file not found")
        if not p.is_file():  # a FIFO or a device would be read without end, or wait for ever
            raise InputError(f"{p}: is not a regular file (a folder, pipe or device)")
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"{meta_path}: not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object")
    version = meta.get("format_version")
    # type() too: JSON true and 1.0 equal 1 in Python, but no writer of this format wrote them
    if type(version) is not int or version != FORMAT_VERSION:
        raise InputError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    for key, kind in (("config", dict), ("encoder", str), ("metadata", dict)):
        if not isinstance(meta.get(key), kind):
            raise InputError(f"{meta_path}: field {key!r} missing or not a {kind.__name__}")
    try:
        config = GPOConfig.from_dict(meta["config"])
        # shapes only, no memory: a config edited to a huge model is refused against the weights
        # file before the model is built (it took 1.3 GB and 24 s, up to ~4 GB at the size cap)
        with torch.device("meta"):
            skeleton = GPO(config)
    # GPOConfig refuses what it can name (ValueError); torch's own failures while building the
    # network are ArithmeticError or RuntimeError, and a field of the wrong kind a TypeError
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as err:
        raise InputError(f"{meta_path}: bad model config: {err}") from err
    try:
        tensors = load(weights_path.read_bytes())
    except Exception as err:  # safetensors raises its own error types
        raise InputError(f"{weights_path}: not a readable safetensors file: {err}") from err
    tensors = upgrade_state_dict(tensors)
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{weights_path}: tensors do not fit the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise InputError(
                f"{weights_path}: tensor {name} is {got.dtype}{list(got.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise InputError(f"{weights_path}: tensor {name} has non-finite values")
    try:
        model = GPO(config)
        model.load_state_dict(tensors)
    except RuntimeError as err:  # shapes and names are checked above; this is a safety net
        raise InputError(f"{weights_path}: tensors do not fit the config: {err}") from err
    model.eval()
    return Checkpoint(model=model, encoder=meta["encoder"], metadata=meta["metadata"])
