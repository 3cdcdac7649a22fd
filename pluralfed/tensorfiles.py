"""Tensors outside the wire: torch state dicts as wire arrays and back (torch is imported only
when these are called, so the coordinator's transport stays torch-free), and model files
(safetensors, in the wire's dtypes and tensor order). `pluralfed.wire` is the wire format itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pluralfed.errors import InputError
from pluralfed.wire import (
    WIRE_FORMAT,
    Array,
    TensorSpec,
    WireError,
    check_values,
    numpy_dtype_of,
    wire_dtype_of,
)


def state_dict_to_numpy(state_dict: Mapping[str, Any], *, copy: bool = True) -> dict[str, Array]:
    """A torch state dict as numpy arrays in wire dtypes (bfloat16 as uint16 bit patterns).

    copy=True (default) detaches the arrays from the module's parameters, which would otherwise
    change under them as training goes on.
    """
    import torch

    out: dict[str, Array] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise WireError(f"tensor {name!r}: a {type(tensor).__name__}, not a torch tensor")
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(np.uint16)
        else:
            arr = t.numpy()
        wire_dtype_of(arr.dtype, name)
        out[name] = arr.copy() if copy else arr
    return out


def numpy_to_state_dict(tensors: Mapping[str, npt.ArrayLike]) -> dict[str, Any]:
    """Numpy arrays (wire dtypes) as torch tensors for `load_state_dict`; uint16 -> bfloat16.

    The tensors own their memory (arrays from the wire are read-only views of received bytes).
    """
    import torch

    out: dict[str, Any] = {}
    for name, array in tensors.items():
        arr = np.asarray(array)
        dtype = wire_dtype_of(arr.dtype, name)
        arr = np.array(arr, dtype=numpy_dtype_of(dtype).newbyteorder("="), order="C", copy=True)
        if dtype == "bfloat16":
            out[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(arr)
    return out


_ORDER_KEY = "pluralfed.order"
_FORMAT_KEY = "pluralfed.format"


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, npt.ArrayLike],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a model to a safetensors file atomically, keeping its tensor order.

    bfloat16 tensors are stored as their uint16 bit patterns (safetensors' numpy side has no
    bfloat16), which `load_tensors` gives back as such. A write that fails (a full disk) is an
    OSError, as for any file: safetensors raises its own error type, which callers that handle
    OSError did not catch (a node's audit copy on a full disk stopped the node).
    """
    from safetensors.numpy import save_file

    arrays: dict[str, Array] = {}
    for name, array in tensors.items():
        arr = np.asarray(array)
        wire_dtype_of(arr.dtype, name)
        arr = arr.view(np.uint16) if arr.dtype.name == "bfloat16" else arr  # ml_dtypes
        arrays[name] = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
    meta = dict(metadata or {})
    meta[_FORMAT_KEY] = WIRE_FORMAT
    meta[_ORDER_KEY] = json.dumps(list(arrays))
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            save_file(arrays, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as err:  # SafetensorError (no stable import path): a full disk too
            raise OSError(str(err)) from err  # callers name the file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike[str], *, check_finite: bool = True) -> dict[str, Array]:
    """Read a model written by `save_tensors` (or any safetensors file of wire dtypes).

    check_finite (default): refuse NaN and infinity in float tensors, as a receiver does; model
    weights and optimizer state that are not finite would poison everything computed from them.
    Raises InputError (`NonFiniteError` for such values) naming the file and what is wrong.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as err:  # SafetensorError has no stable public import path
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    order = _recorded_order(path, meta, names)
    for name in order:
        array = tensors[name]
        spec = TensorSpec(name, wire_dtype_of(array.dtype, name), array.shape)
        try:
            check_values(spec, 0, array.reshape(-1), finite=check_finite, scope="in the tensor")
        except WireError as err:
            raise type(err)(f"{path}: {err}") from None
    return {name: tensors[name] for name in order}


def _recorded_order(
    path: str | os.PathLike[str], meta: Mapping[str, str], names: list[str]
) -> list[str]:
    """The tensor order a file's metadata records (the file's own order if none), checked
    against the tensors the file holds."""
    if _ORDER_KEY not in meta:
        return names
    problem = f"{path}: metadata {_ORDER_KEY!r}"
    try:
        order = json.loads(meta[_ORDER_KEY])
    except (ValueError, RecursionError) as err:
        raise InputError(f"{problem} is not JSON ({err})") from None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise InputError(f"{problem} is not a list of tensor names: {meta[_ORDER_KEY][:80]!r}")
    if len(order) != len(names) or sorted(order) != sorted(names):
        raise InputError(f"{problem} does not match the tensors in the file")
    return order


def load_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a safetensors file (without pluralfed's own keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
    return {k: v for k, v in meta.items() if k not in (_ORDER_KEY, _FORMAT_KEY)}
