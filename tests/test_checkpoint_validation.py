"""load_checkpoint refuses a checkpoint it cannot use whole, with an InputError that names the file
and what is wrong in it: a missing file, model.json that is not JSON, of another format_version or
without its fields, model.safetensors that does not read, holds other tensors than the config's,
a tensor of another dtype or shape, or non-finite weights. Each case saves a real checkpoint
(save_checkpoint) and edits it one way, as a hand edit, a bad copy or another program would."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from test_validation_config import SMALL

import pluralfed.checkpoint as checkpoint_module
from pluralfed.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from pluralfed.errors import InputError
from pluralfed.model import GPOConfig
from pluralfed.training import build_model

pytestmark = pytest.mark.timeout(60)

TENSOR = "members.0.head.weight"  # float32, shape (2, 8) in SMALL


def saved(folder: Path) -> Path:
    save_checkpoint(folder, build_model(SMALL, 0), "enc", {"note": "test"})
    return folder


def meta_edit(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / META_FILE).read_text("utf-8"))
        change(meta)
        (folder / META_FILE).write_text(json.dumps(meta), "utf-8")

    return edit


def tensors_edit(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load((folder / WEIGHTS_FILE).read_bytes())
        change(tensors)
        (folder / WEIGHTS_FILE).write_bytes(save(tensors))

    return edit


def write(name: str, data: bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return edit


def cut_short(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def with_value(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[TENSOR] = tensors[TENSOR].clone()
        tensors[TENSOR][1, 3] = value

    return change


F32 = "torch.float32"
# id -> (the edit, the file the refusal names, the rest of the message as a regex)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "no model.json": (lambda f: (f / META_FILE).unlink(), META_FILE, "checkpoint file not found$"),
    "no weights file": (
        lambda f: (f / WEIGHTS_FILE).unlink(),
        WEIGHTS_FILE,
        "checkpoint file not found$",
    ),
    "model.json not JSON": (write(META_FILE, b"{not json"), META_FILE, "not valid JSON: "),
    "model.json not UTF-8": (write(META_FILE, b'{"a": "\xff"}'), META_FILE, "not valid JSON: "),
    "model.json a list": (write(META_FILE, b"[]"), META_FILE, "expected a JSON object$"),
    # json gives up with RecursionError, which was a traceback
    "model.json nested deep": (write(META_FILE, b"[" * 100_000), META_FILE, "not valid JSON: "),
    "format_version 2": (
        meta_edit(lambda m: m.update(format_version=2)),
        META_FILE,
        "format_version 2, expected 1$",
    ),
    "format_version '1'": (
        meta_edit(lambda m: m.update(format_version="1")),
        META_FILE,
        "format_version '1', expected 1$",
    ),
    # JSON true and 1.0 equal 1 in Python; the format's writer only ever writes the integer
    "format_version true": (
        meta_edit(lambda m: m.update(format_version=True)),
        META_FILE,
        "format_version True, expected 1$",
    ),
    "format_version 1.0": (
        meta_edit(lambda m: m.update(format_version=1.0)),
        META_FILE,
        "format_version 1.0, expected 1$",
    ),
    "no format_version": (
        meta_edit(lambda m: m.pop("format_version")),
        META_FILE,
        "format_version None, expected 1$",
    ),
    "no config": (
        meta_edit(lambda m: m.pop("config")),
        META_FILE,
        "field 'config' missing or not a dict$",
    ),
    "config a list": (
        meta_edit(lambda m: m.update(config=[])),
        META_FILE,
        "field 'config' missing or not a dict$",
    ),
    "no encoder": (
        meta_edit(lambda m: m.pop("encoder")),
        META_FILE,
        "field 'encoder' missing or not a str$",
    ),
    "encoder a number": (
        meta_edit(lambda m: m.update(encoder=7)),
        META_FILE,
        "field 'encoder' missing or not a str$",
    ),
    "no metadata": (
        meta_edit(lambda m: m.pop("metadata")),
        META_FILE,
        "field 'metadata' missing or not a dict$",
    ),
    "weights not safetensors": (
        write(WEIGHTS_FILE, b"not a safetensors file"),
        WEIGHTS_FILE,
        "not a readable safetensors file: ",
    ),
    "weights cut short": (cut_short, WEIGHTS_FILE, "not a readable safetensors file: "),
    "a tensor missing": (
        tensors_edit(lambda t: t.pop("members.0.head.bias")),
        WEIGHTS_FILE,
        re.escape("tensors do not fit the config (missing ['members.0.head.bias'], unexpected [])")
        + "$",
    ),
    "an extra tensor": (
        tensors_edit(lambda t: t.update({"members.0.extra": torch.zeros(3)})),
        WEIGHTS_FILE,
        re.escape("tensors do not fit the config (missing [], unexpected ['members.0.extra'])")
        + "$",
    ),
    "float64 1e300": (
        tensors_edit(lambda t: t.update({TENSOR: torch.full((2, 8), 1e300, dtype=torch.float64)})),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} is torch.float64[2, 8], expected {F32}[2, 8]") + "$",
    ),
    "float16": (
        tensors_edit(lambda t: t.update({TENSOR: t[TENSOR].half()})),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} is torch.float16[2, 8], expected {F32}[2, 8]") + "$",
    ),
    "another shape": (
        tensors_edit(lambda t: t.update({TENSOR: torch.zeros(2, 9)})),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} is {F32}[2, 9], expected {F32}[2, 8]") + "$",
    ),
    "transposed": (
        tensors_edit(lambda t: t.update({TENSOR: t[TENSOR].T.contiguous()})),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} is {F32}[8, 2], expected {F32}[2, 8]") + "$",
    ),
    "a NaN weight": (
        tensors_edit(with_value(float("nan"))),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} has non-finite values") + "$",
    ),
    "an infinite weight": (
        tensors_edit(with_value(float("-inf"))),
        WEIGHTS_FILE,
        re.escape(f"tensor {TENSOR} has non-finite values") + "$",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_checkpoint_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    edit, file_name, message = CASES[case]
    folder = saved(tmp_path / "ckpt")
    edit(folder)
    with pytest.raises(InputError, match="^" + re.escape(f"{folder / file_name}: ") + message):
        load_checkpoint(folder)


def test_tensors_that_do_not_fit_are_named_five_at_most(tmp_path: Path) -> None:
    folder = saved(tmp_path / "ckpt")
    tensors = load((folder / WEIGHTS_FILE).read_bytes())
    gone = sorted(tensors)[:7]
    extra = {f"extra.{i}": torch.zeros(1) for i in range(6)}

    def drop_and_add(t: dict[str, torch.Tensor]) -> None:
        for name in gone:
            del t[name]
        t.update(extra)

    tensors_edit(drop_and_add)(folder)
    with pytest.raises(InputError) as err:
        load_checkpoint(folder)
    assert str(err.value).endswith(f"(missing {gone[:5]}, unexpected {sorted(extra)[:5]})")


def test_the_unedited_checkpoint_loads_whole(tmp_path: Path) -> None:
    """The control: the checkpoint every case starts from loads, weights and all."""
    model = build_model(SMALL, 0)
    folder = saved(tmp_path / "ckpt")
    ckpt = load_checkpoint(folder)
    assert ckpt.model.cfg == SMALL and ckpt.encoder == "enc" and ckpt.metadata == {"note": "test"}
    want, got = model.state_dict(), ckpt.model.state_dict()
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def test_a_config_edited_to_a_huge_model_is_refused_before_it_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 KB edit of model.json (d_model 8192) made the loader build that model, 1.3 GB and 24
    s, before it found that the weights do not fit; up to ~4 GB at the parameter cap."""
    folder = saved(tmp_path / "ckpt")
    meta_edit(lambda m: m["config"].update(d_model=8192, n_heads=8))(folder)
    built_on: list[str] = []
    real_gpo = checkpoint_module.GPO

    def counting_gpo(config: Any) -> Any:
        built_on.append(str(torch.get_default_device()))
        return real_gpo(config)

    monkeypatch.setattr(checkpoint_module, "GPO", counting_gpo)
    with pytest.raises(InputError, match=r"tensor .* is torch.float32\[|tensors do not fit"):
        load_checkpoint(folder)
    assert built_on == ["meta"]  # its shapes only
    saved(tmp_path / "good")
    built_on.clear()
    load_checkpoint(tmp_path / "good")
    assert built_on == ["meta", "cpu"]  # the real model once the weights fit


def test_a_checkpoint_saved_before_ensembles_loads_as_member_zero(tmp_path: Path) -> None:
    """Weights written before `members` existed have their tensors at the top level
    ("head.weight", not "members.0.head.weight"): such a checkpoint still loads, whole."""
    folder = saved(tmp_path / "ckpt")
    tensors_edit(lambda t: t.update({k.removeprefix("members.0."): t.pop(k) for k in list(t)}))(
        folder
    )
    assert not any(k.startswith("members.") for k in load((folder / WEIGHTS_FILE).read_bytes()))
    want = build_model(SMALL, 0).state_dict()
    got = load_checkpoint(folder).model.state_dict()
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def test_a_loaded_model_is_ready_to_predict_not_to_train(tmp_path: Path) -> None:
    """Evaluate and serve predict with what load_checkpoint gives: a model with dropout left in
    training mode would answer the same question differently each time."""
    config = GPOConfig(**{**SMALL.to_dict(), "dropout": 0.5})
    save_checkpoint(tmp_path / "ckpt", build_model(config, 0), "enc", {})
    model = load_checkpoint(tmp_path / "ckpt").model
    assert model.cfg.dropout == 0.5
    assert not any(module.training for module in model.modules())


def test_a_pipe_in_place_of_model_json_is_refused_without_waiting_on_it(tmp_path: Path) -> None:
    """Only regular files are read: opening a FIFO (or a device) for reading would wait for a
    writer, and `pluralfed evaluate` or the reward service would hang instead of saying why."""
    folder = saved(tmp_path / "ckpt")
    (folder / META_FILE).unlink()
    os.mkfifo(folder / META_FILE)
    outcome: list[BaseException | None] = []

    def load_it() -> None:
        try:
            load_checkpoint(folder)
            outcome.append(None)
        except BaseException as err:  # handed to the test's thread
            outcome.append(err)

    reader = threading.Thread(target=load_it, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # it waits on the pipe: give it an end of file, then fail
        os.close(os.open(folder / META_FILE, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("load_checkpoint waited on a pipe")
    assert len(outcome) == 1 and isinstance(outcome[0], InputError)
    assert str(outcome[0]) == (
        f"{folder / META_FILE}: is not a regular file (a folder, pipe or device)"
    )
