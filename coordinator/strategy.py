"""Aggregation: how the coordinator turns the nodes' updates into the next global model.

Pure numpy: no gRPC, no torch, so every rule here is testable on its own.

- `fedavg`: the reference weighted average of whole updates.
- `StreamingFedAvg`: the same average, folded slice by slice from spooled updates
  (`pluralfed.wire.UpdateSpool`), so memory is O(model size) whatever the number of nodes.
- Server optimizers (`ServerOptimizer`): turn the round's average into the next global model:
  plain FedAvg, FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive Federated Optimization",
  ICLR 2021). Their state exports to a flat dict of numpy arrays and scalars for checkpoints.
- `qfedavg_weight(s)`: fairness-aware weights in the spirit of q-FedAvg (Li et al., "Fair
  Resource Allocation in Federated Learning", ICLR 2020); `fairness_weight` is the one the
  coordinator uses (`fairness_q`), with 1 - alignment as the loss.
- `streaming_update_norm`: how far one spooled update moves the model; the coordinator refuses an
  update past its `norm_bound`. `update_norm` is the same for a whole update in memory, and
  `clip_by_norm` / `clip_scale` (and `StreamingFedAvg.add(scale=)`) would clip instead of
  refusing: the coordinator does not use them, they are here for a strategy that wants to.

Sums are kept in float64: the accumulator costs 2x a float32 model (a few MB here) and in exchange
the average is independent of arrival order to ~1e-16 and equals `fedavg` exactly, which keeps
rounds reproducible and testable. Integer tensors are averaged and rounded to nearest; bool
tensors take the weighted majority; optimizers move only floating-point tensors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pluralfed.errors import InputError
from pluralfed.wire import (
    FLOAT_DTYPES,
    TensorSlice,
    TensorSpec,
    as_numeric,
    float32_to_bfloat16,
    wire_dtype_of,
)

Array = npt.NDArray[Any]
Weights = Mapping[str, Array]
StateValue = Array | float | int | str
# the key under which every optimizer's state names the optimizer that wrote it
OPTIMIZER_KEY = "optimizer"


class AggregationError(RuntimeError):
    """The aggregate cannot give a result: no updates, zero total weight, or a failed fold."""


# --------------------------------------------------------------------------------------------
# helpers


def _finite_model(out: dict[str, Array], specs: Sequence[TensorSpec]) -> dict[str, Array]:
    """`out` if every floating-point value in it is finite, else AggregationError naming the
    first tensor that is not. Finite updates can still average, or be moved by the server's step
    (server_lr > 1, an adaptive step), past float32's range; a non-finite global model would go to
    every node (which refuse it and stop) and into the checkpoint (which a restart refuses)."""
    for spec in specs:
        if spec.dtype not in FLOAT_DTYPES:
            continue
        values = as_numeric(np.asarray(out[spec.name]), spec.dtype).reshape(-1)
        step = 1 << 16  # in blocks: a model-sized mask would add to the coordinator's peak
        if not all(np.isfinite(values[i : i + step]).all() for i in range(0, values.size, step)):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise AggregationError(
                f"the new model's tensor {spec.name!r} has {bad} non-finite value(s) (finite "
                "updates that overflow the tensor's dtype once averaged or stepped: a norm_bound "
                "refuses such updates)"
            )
    return out


def _check_weight(weight: float, what: str = "weight") -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise InputError(f"{what} must be a finite number >= 0, got {weight!r}")
    return w


def _float64(values: Array, dtype: str) -> Array:
    """Values as float64 numbers (bfloat16 bit patterns decoded first)."""
    return np.asarray(as_numeric(values, dtype), dtype=np.float64)


def _from_float64(mean: Array, spec: TensorSpec) -> Array:
    """A float64 result in the tensor's own dtype and shape."""
    mean = mean.reshape(spec.shape)
    if spec.dtype == "bfloat16":
        return float32_to_bfloat16(mean.astype(np.float32))
    if spec.dtype in FLOAT_DTYPES:
        return mean.astype(spec.numpy_dtype)
    if spec.dtype == "bool":
        return mean >= 0.5
    info = np.iinfo(spec.numpy_dtype)
    # float64 rounds int64's largest value up to 2**63, which the cast would wrap to the most
    # negative one: clip to the largest float64 the dtype holds instead
    top = float(info.max)
    if top > info.max:
        top = float(np.nextafter(top, 0.0))
    return np.clip(np.rint(mean), info.min, top).astype(spec.numpy_dtype)


def _spec(name: str, array: Array) -> TensorSpec:
    return TensorSpec(name, wire_dtype_of(np.asarray(array).dtype, name), np.shape(array))


def _check_same_model(reference: Weights, other: Weights, what: str) -> list[TensorSpec]:
    """Specs of reference; raise InputError unless other has the same names, dtypes and shapes."""
    specs = [_spec(name, array) for name, array in reference.items()]
    if set(other) != set(reference):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise InputError(f"{what}: tensors differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for spec in specs:
        got = _spec(spec.name, other[spec.name])
        if got != spec:
            raise InputError(
                f"{what}: tensor {spec.name!r} is {got.dtype}{list(got.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
    return specs


# --------------------------------------------------------------------------------------------
# FedAvg


def fedavg(updates: Sequence[Weights], weights: Sequence[float] | None = None) -> dict[str, Array]:
    """Weighted average of whole updates (reference implementation; weights=None: uniform).

    Each tensor is sum_k w_k x_k / sum_k w_k, computed in float64 in update order and returned in
    the first update's tensor order and dtypes.
    """
    if not updates:
        raise AggregationError("no updates to average")
    if weights is None:
        weights = [1.0] * len(updates)
    if len(weights) != len(updates):
        raise InputError(f"{len(updates)} updates but {len(weights)} weights")
    ws = [_check_weight(w) for w in weights]
    total = 0.0
    for w in ws:
        total += w
    if total <= 0:
        raise AggregationError("total weight is 0: nothing to average")
    specs = [_spec(name, array) for name, array in updates[0].items()]
    for k, update in enumerate(updates[1:], start=1):
        _check_same_model(updates[0], update, f"update {k}")
    out: dict[str, Array] = {}
    for spec in specs:
        acc = np.zeros(spec.numel, dtype=np.float64)
        for update, w in zip(updates, ws, strict=True):
            acc += _float64(np.asarray(update[spec.name]).reshape(-1), spec.dtype) * w
        out[spec.name] = _from_float64(acc / total, spec)
    return out


class _OpenUpdate:
    __slots__ = ("covered", "folded", "weight")

    def __init__(self, weight: float, names: Iterable[str]) -> None:
        self.weight = weight
        self.covered = dict.fromkeys(names, 0)  # elements folded per tensor, in order
        self.folded = False


class StreamingFedAvg:
    """A running weighted sum of updates, folded slice by slice; memory O(model size).

    Only complete updates count: `fold_update` folds one whole, already validated update (e.g.
    `UpdateSpool.replay()` after `finish`) and commits it. The low-level pair `add_chunk` /
    `commit` does the same by hand. An update that breaks off after some of it was folded cannot
    be taken out of the sum again, so the aggregate then refuses to give a result (an error the
    coordinator must treat as a failed round); errors found before folding leave it untouched.

    uniform=True gives every update weight 1, whatever weight it is folded with.
    `fold_update` is thread-safe (updates fold one at a time); `add_chunk`/`commit` are not.
    """

    def __init__(self, specs: Sequence[TensorSpec], *, uniform: bool = False) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise InputError("model specs have duplicate tensor names")
        self._specs = {s.name: s for s in specs}
        self._sums = {s.name: np.zeros(s.numel, dtype=np.float64) for s in specs}
        self._uniform = uniform
        self._total_weight = 0.0
        self._num_updates = 0
        self._open: _OpenUpdate | None = None
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._scratch = np.empty(0, dtype=np.float64)  # w * slice, reused from slice to slice

    @property
    def specs(self) -> list[TensorSpec]:
        return list(self._specs.values())

    @property
    def total_weight(self) -> float:
        return self._total_weight

    @property
    def num_updates(self) -> int:
        return self._num_updates

    def _effective(self, weight: float) -> float:
        return 1.0 if self._uniform else _check_weight(weight)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise AggregationError(f"aggregate unusable: {self._broken}")

    def add_chunk(self, name: str, element_offset: int, values: Array, weight: float) -> None:
        """Fold weight * values into tensor `name` at flat element_offset (slices in order).

        values: consecutive elements in the tensor's dtype (bfloat16 as uint16 bit patterns) or
        already as floats. Everything is checked before the sum changes.
        """
        self._check_usable()
        w = self._effective(weight)
        spec = self._specs.get(name)
        if spec is None:
            raise InputError(f"tensor {name!r} is not in the model")
        flat = np.asarray(values).reshape(-1)
        if self._open is None:
            self._open = _OpenUpdate(w, self._specs)
        elif w != self._open.weight:
            raise InputError(
                f"tensor {name!r}: slice folded with weight {w}, the open update has "
                f"{self._open.weight}"
            )
        done = self._open.covered[name]
        if element_offset != done:
            raise InputError(
                f"tensor {name!r}: slice at element {element_offset}, expected element {done} "
                "(slices of a tensor must come in order, each once)"
            )
        if done + flat.size > spec.numel:
            raise InputError(
                f"tensor {name!r}: slice of {flat.size} elements at {element_offset} overflows "
                f"its {spec.numel} elements"
            )
        if flat.size:
            self._fold(spec, self._sums[name][done : done + flat.size], flat, w, element_offset)
            self._open.folded = True
        self._open.covered[name] = done + flat.size

    def _fold(self, spec: TensorSpec, target: Array, flat: Array, w: float, at: int) -> None:
        """target += w * flat in float64, without slice-sized temporaries.

        A fresh float64 copy of every slice (and of its product with w) made the fold the
        coordinator's largest cost (page faults of new buffers, three passes over memory); here
        numpy casts in small cache-sized blocks. Same float64 operations as `fedavg`, so the
        result stays exactly equal to it; x * 1.0 is x, so uniform weights skip the multiply.
        """
        numbers = as_numeric(flat, spec.dtype)  # bfloat16 bit patterns -> float32 (exact)
        if spec.dtype in FLOAT_DTYPES and not np.isfinite(numbers).all():
            raise InputError(f"tensor {spec.name!r}: non-finite values in slice at {at}")
        if w == 1.0:
            np.add(target, numbers, out=target, dtype=np.float64)
            return
        scratch = self._scratch
        if scratch.size < numbers.size:
            scratch = self._scratch = np.empty(numbers.size, dtype=np.float64)
        product = scratch[: numbers.size]
        np.multiply(numbers, w, out=product, dtype=np.float64)
        np.add(target, product, out=target, dtype=np.float64)

    def commit(self, weight: float) -> None:
        """Count the open update: every element of every tensor must have been folded once."""
        self._check_usable()
        w = self._effective(weight)
        update = self._open if self._open is not None else _OpenUpdate(w, self._specs)
        if w != update.weight:
            raise InputError(f"commit with weight {w}, the update was folded with {update.weight}")
        for name, spec in self._specs.items():
            if update.covered[name] != spec.numel:
                self.abort()
                raise AggregationError(
                    f"update incomplete: tensor {name!r} has {update.covered[name]} of "
                    f"{spec.numel} elements"
                )
        self._total_weight += w
        self._num_updates += 1
        self._open = None

    def abort(self) -> None:
        """Drop the open update; if part of it was already folded, the aggregate is unusable."""
        if self._open is not None and self._open.folded:
            self._broken = "an update was only partly folded into the sum"
        self._open = None

    def fold_update(
        self,
        slices: Iterable[TensorSlice],
        weight: float,
        *,
        reference: Weights | None = None,
        scale: float = 1.0,
    ) -> None:
        """Fold one whole validated update and count it.

        With reference and scale < 1, float tensors are folded as reference + scale * (x -
        reference): the update clipped towards the global model (see `clip_scale`).
        """
        if not (0.0 <= scale <= 1.0):
            raise InputError(f"scale must be in [0, 1], got {scale}")
        with self._lock:
            if self._open is not None:
                raise AggregationError("another update is open (add_chunk without commit)")
            try:
                for piece in slices:
                    spec = self._specs.get(piece.spec.name)
                    if spec != piece.spec:
                        raise InputError(
                            f"tensor {piece.spec.name!r}: update has {piece.spec}, model has {spec}"
                        )
                    values = piece.values
                    if reference is not None and scale != 1.0 and spec.dtype in FLOAT_DTYPES:
                        end = piece.element_offset + values.size
                        ref = _float64(
                            np.asarray(reference[spec.name]).reshape(-1)[
                                piece.element_offset : end
                            ],
                            spec.dtype,
                        )
                        values = ref + scale * (_float64(values, spec.dtype) - ref)
                    self.add_chunk(spec.name, piece.element_offset, values, weight)
                self.commit(weight)
            except BaseException:
                self.abort()
                raise

    def result(self) -> dict[str, Array]:
        """The weighted average, each tensor in its spec's dtype and shape."""
        self._check_usable()
        if self._open is not None:
            raise AggregationError("an update is still open: commit or abort it first")
        if self._num_updates == 0:
            raise AggregationError("no updates to average")
        if self._total_weight <= 0:
            raise AggregationError("total weight is 0: nothing to average")
        with self._lock:
            return {name: self._mean(spec) for name, spec in self._specs.items()}

    def _mean(self, spec: TensorSpec) -> Array:
        """One tensor's average, with no model-sized float64 temporary."""
        sums = self._sums[spec.name]
        if spec.dtype in ("float32", "float64", "float16"):
            # divides in float64 and rounds once to the dtype, as sums / total then astype does
            out = np.empty(spec.shape, dtype=spec.numpy_dtype)
            np.divide(sums, self._total_weight, out=out.reshape(-1), dtype=np.float64)
            return out
        return _from_float64(sums / self._total_weight, spec)

    def reset(self) -> None:
        """Start over with no updates, keeping the sums' memory for the next round.

        Fresh model-sized buffers are expensive (the first write to every page faults), so the
        coordinator reuses one aggregate from round to round instead of allocating a new one.
        """
        with self._lock:
            for sums in self._sums.values():
                sums.fill(0.0)
            self._total_weight = 0.0
            self._num_updates = 0
            self._open = None
            self._broken = None


# --------------------------------------------------------------------------------------------
# update norms


def update_norm(update: Weights, reference: Weights) -> float:
    """L2 norm of (update - reference) over all floating-point tensors."""
    specs = _check_same_model(reference, update, "update")
    total = 0.0
    for spec in specs:
        if spec.dtype in FLOAT_DTYPES:
            delta = _float64(np.asarray(update[spec.name]), spec.dtype) - _float64(
                np.asarray(reference[spec.name]), spec.dtype
            )
            total += float(np.dot(delta.reshape(-1), delta.reshape(-1)))
    return math.sqrt(total)


def streaming_update_norm(slices: Iterable[TensorSlice], reference: Weights) -> float:
    """`update_norm` of an update given as slices (e.g. `UpdateSpool.replay()`), O(slice) memory."""
    total = 0.0
    for piece in slices:
        spec = piece.spec
        if spec.dtype not in FLOAT_DTYPES:
            continue
        end = piece.element_offset + piece.values.size
        ref = np.asarray(reference[spec.name]).reshape(-1)[piece.element_offset : end]
        delta = _float64(piece.values, spec.dtype) - _float64(ref, spec.dtype)
        total += float(np.dot(delta, delta))
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that shrinks an update of this norm to at most max_norm (1.0 if within)."""
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise InputError(f"max_norm must be a finite number > 0, got {max_norm}")
    return 1.0 if norm <= max_norm else max_norm / norm


def clip_by_norm(
    update: Weights, reference: Weights, max_norm: float
) -> tuple[dict[str, Array], float]:
    """Shrink (update - reference) to L2 norm at most max_norm; returns (clipped, original norm).

    Bounds how far any one node can drag the global model. Non-float tensors pass unchanged.
    """
    norm = update_norm(update, reference)
    scale = clip_scale(norm, max_norm)
    out: dict[str, Array] = {}
    for name, array in update.items():
        spec = _spec(name, array)
        if scale == 1.0 or spec.dtype not in FLOAT_DTYPES:
            out[name] = np.array(array, copy=True)
            continue
        ref = _float64(np.asarray(reference[name]), spec.dtype)
        clipped = ref + scale * (_float64(np.asarray(array), spec.dtype) - ref)
        out[name] = _from_float64(clipped.reshape(-1), spec)
    return out, norm


# --------------------------------------------------------------------------------------------
# q-FedAvg-style weights


def qfedavg_weight(loss: float, num_examples: float, q: float) -> float:
    """Unnormalised fairness weight n_k * F_k**q of one update (see `qfedavg_weights`).

    Usable as the weight of `StreamingFedAvg.fold_update` as updates arrive, since the average
    divides by the total weight anyway.
    """
    return float(qfedavg_weights([loss], [num_examples], q, normalize=False)[0])


def qfedavg_weights(
    losses: Sequence[float], num_examples: Sequence[float], q: float, *, normalize: bool = True
) -> Array:
    """Averaging weights p_k * F_k**q that favour nodes the model serves worst.

    p_k = n_k / sum(n) is the node's share of examples and F_k its local loss under the current
    global model (measure it before local training). q = 0 is plain FedAvg; larger q moves
    weight towards high-loss groups. This is the gradient weighting of the q-FFL objective
    sum_k p_k F_k**(q+1) / (q+1) (Li et al. 2020); unlike full q-FedAvg it does not rescale the
    step by a Lipschitz estimate, so it combines with any server optimizer. Computed in log space,
    so large q does not overflow. Returns weights summing to 1 (or unnormalised n_k * F_k**q).
    """
    if len(losses) != len(num_examples):
        raise InputError(f"{len(losses)} losses but {len(num_examples)} example counts")
    if not losses:
        raise InputError("no nodes to weigh")
    if not (math.isfinite(q) and q >= 0):
        raise InputError(f"q must be a finite number >= 0, got {q}")
    loss = np.array([_check_weight(x, "loss") for x in losses], dtype=np.float64)
    n = np.array([_check_weight(x, "number of examples") for x in num_examples], dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_w = np.log(n)
        if q != 0:
            log_w = log_w + q * np.log(loss)
    if not np.isfinite(log_w).any():
        raise InputError("every node has weight 0 (no examples, or zero loss with q > 0)")
    if not normalize:
        return np.exp(log_w)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


MAX_FAIRNESS_Q = 10.0
# a node whose questions the model already predicts perfectly still counts, a little
MIN_FAIRNESS_LOSS = 1e-6


def fairness_weight(base_weight: float, alignment_before: float, q: float) -> float:
    """An update's q-FedAvg weight: base_weight * (1 - alignment_before) ** q.

    alignment_before is how well the global model the node started from predicted its own
    questions (PROTOCOL's 1 - Jensen-Shannon distance, in [0, 1]); 1 - alignment is the loss
    that q-FFL raises to the power q, so groups the model serves worst weigh more. Unlike the
    paper's Gaussian NLL it is never negative, and it is the metric the targets are set in.
    q = 0 is plain FedAvg.
    """
    if not (math.isfinite(q) and 0 <= q <= MAX_FAIRNESS_Q):
        raise InputError(f"fairness q must be in 0..{MAX_FAIRNESS_Q:g}, got {q}")
    if not (math.isfinite(alignment_before) and 0.0 <= alignment_before <= 1.0):
        raise InputError(f"alignment_before must be in [0, 1], got {alignment_before}")
    if q == 0:
        return _check_weight(base_weight, "base weight")  # exactly FedAvg's weight
    return qfedavg_weight(max(1.0 - alignment_before, MIN_FAIRNESS_LOSS), base_weight, q)


# --------------------------------------------------------------------------------------------
# server optimizers


class ServerOptimizer(Protocol):
    """Turns the round's averaged weights into the next global model.

    State (moments, step count) exports as a flat dict of numpy arrays and scalars, e.g. to go
    into a checkpoint next to the model, and loads back into a fresh optimizer of the same
    `name` (the state says which optimizer wrote it; another one refuses it).
    """

    name: str

    def apply(self, global_weights: Weights, averaged: Weights) -> dict[str, Array]:
        """The next global model; AggregationError, with the state unchanged, if it would not
        be finite."""
        ...

    def state_dict(self) -> dict[str, StateValue]: ...

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None: ...


class FedAvgOptimizer:
    """Plain FedAvg: new = global + server_lr * (averaged - global); server_lr=1 is new = averaged.

    server_lr < 1 damps each round's move (FedAvg with a server learning rate, no momentum).
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise InputError(f"server_lr must be a finite number > 0, got {server_lr}")
        self.server_lr = server_lr
        self.step = 0

    def apply(self, global_weights: Weights, averaged: Weights) -> dict[str, Array]:
        """The new global model. With server_lr = 1 (and for non-float tensors) it is `averaged`
        itself, not a copy: the engine hands over a fresh average it never touches again, and a
        copy was one more whole model in memory at the end of every round."""
        specs = _check_same_model(global_weights, averaged, "averaged weights")
        out: dict[str, Array] = {}
        for spec in specs:
            if self.server_lr == 1.0 or spec.dtype not in FLOAT_DTYPES:
                out[spec.name] = np.asarray(averaged[spec.name])
                continue
            g = _float64(np.asarray(global_weights[spec.name]), spec.dtype).reshape(-1)
            a = _float64(np.asarray(averaged[spec.name]), spec.dtype).reshape(-1)
            with np.errstate(over="ignore"):  # an overflow is refused just below
                out[spec.name] = _from_float64(g + self.server_lr * (a - g), spec)
        _finite_model(out, specs)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, StateValue]:
        return {OPTIMIZER_KEY: self.name, "step": self.step}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        _check_written_by(state, self.name)
        for key in state:
            if key not in (OPTIMIZER_KEY, "step"):
                kind = "moments of an adaptive optimizer, " if key[:2] in ("m/", "v/") else ""
                raise InputError(
                    f"optimizer state: unexpected entry {key!r} ({kind}not {self.name})"
                )
        self.step = _state_step(state)


def _check_written_by(state: Mapping[str, StateValue], name: str) -> None:
    """InputError unless `state` was saved by the optimizer `name` (or names none: saved before
    states named their optimizer). Loading another optimizer's state would silently drop or
    misread it, e.g. a run resumed with FedAvg after FedAdam lost its moments without a word."""
    written_by = state.get(OPTIMIZER_KEY)
    if written_by is None:
        return
    if written_by != name:
        raise InputError(
            f"optimizer state: saved by server optimizer {written_by!r}, cannot be loaded by {name!r}"
        )


def _state_step(state: Mapping[str, StateValue]) -> int:
    step = state.get("step")
    if isinstance(step, np.ndarray):
        step = step.item()
    if not isinstance(step, int | np.integer) or int(step) < 0:
        raise InputError(f"optimizer state: 'step' must be an integer >= 0, got {step!r}")
    return int(step)


class _AdaptiveOptimizer:
    """Shared FedOpt machinery (Reddi et al. 2021, Algorithm 2), without bias correction.

    With the pseudo-gradient D = averaged - global:
        m <- beta1 * m + (1 - beta1) * D
        v <- (per variant, from D**2)
        global <- global + server_lr * m / (sqrt(v) + tau)
    m starts at 0, v at tau**2 (the paper's v_{-1} >= tau**2). tau bounds the step where v is
    small: the largest per-coordinate move is about server_lr * |m| / tau. Moments are float64,
    one pair per floating-point tensor; other tensors take the average as is.
    """

    name: str

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        initial_accumulator: float | None = None,
    ) -> None:
        for label, value, low, high in (
            ("server_lr", server_lr, 0.0, math.inf),
            ("tau", tau, 0.0, math.inf),
        ):
            if not (math.isfinite(value) and low < value < high):
                raise InputError(f"{label} must be a finite number > 0, got {value}")
        for label, value in (("beta1", beta1), ("beta2", beta2)):
            if not (0.0 <= value < 1.0):
                raise InputError(f"{label} must be in [0, 1), got {value}")
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.initial_accumulator = tau * tau if initial_accumulator is None else initial_accumulator
        if not (math.isfinite(self.initial_accumulator) and self.initial_accumulator >= 0):
            raise InputError(f"initial_accumulator must be >= 0, got {initial_accumulator}")
        self.step = 0
        self._m: dict[str, Array] = {}
        self._v: dict[str, Array] = {}

    def _second_moment(self, v: Array, d2: Array) -> Array:
        raise NotImplementedError

    def _direction(self, m: Array, v: Array) -> Array:
        """The move per unit of server_lr (this is step self.step + 1)."""
        return m / (np.sqrt(v) + self.tau)

    def apply(self, global_weights: Weights, averaged: Weights) -> dict[str, Array]:
        """The next global model; state changes only once every tensor is computed."""
        specs = _check_same_model(global_weights, averaged, "averaged weights")
        for name, m in self._m.items():
            if name not in global_weights or m.shape != np.shape(global_weights[name]):
                raise InputError(f"optimizer state for tensor {name!r} does not fit the model")
        out: dict[str, Array] = {}
        new_m: dict[str, Array] = {}
        new_v: dict[str, Array] = {}
        for spec in specs:
            if spec.dtype not in FLOAT_DTYPES:
                out[spec.name] = np.array(averaged[spec.name], copy=True)
                continue
            g = _float64(np.asarray(global_weights[spec.name]), spec.dtype)
            d = _float64(np.asarray(averaged[spec.name]), spec.dtype) - g
            old_m = self._m.get(spec.name)
            old_v = self._v.get(spec.name)
            if old_m is None or old_v is None:
                old_m = np.zeros_like(d)
                old_v = np.full_like(d, self.initial_accumulator)
            m = self.beta1 * old_m + (1.0 - self.beta1) * d
            v = self._second_moment(old_v, d * d)
            new = g + self.server_lr * self._direction(m, v)
            new_m[spec.name], new_v[spec.name] = m, v
            with np.errstate(over="ignore"):  # an overflow is refused just below
                out[spec.name] = _from_float64(new.reshape(-1), spec)
        _finite_model(out, specs)
        self._m, self._v = new_m, new_v
        self.step += 1
        return out

    def state_dict(self) -> dict[str, StateValue]:
        """{"optimizer": name, "step": int, "m/<tensor>": array, "v/<tensor>": array} (copies)."""
        state: dict[str, StateValue] = {OPTIMIZER_KEY: self.name, "step": self.step}
        for name in self._m:
            state[f"m/{name}"] = self._m[name].copy()
            state[f"v/{name}"] = self._v[name].copy()
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        _check_written_by(state, self.name)
        step = _state_step(state)
        m: dict[str, Array] = {}
        v: dict[str, Array] = {}
        for key, value in state.items():
            if key in ("step", OPTIMIZER_KEY):
                continue
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name or not isinstance(value, np.ndarray):
                raise InputError(f"optimizer state: unexpected entry {key!r}")
            array = np.asarray(value, dtype=np.float64).copy()
            if not np.isfinite(array).all() or (kind == "v" and (array < 0).any()):
                raise InputError(f"optimizer state: {key!r} has invalid values")
            (m if kind == "m" else v)[name] = array
        if set(m) != set(v) or any(m[k].shape != v[k].shape for k in m):
            raise InputError("optimizer state: first and second moments do not match")
        self.step, self._m, self._v = step, m, v


class FedAdagrad(_AdaptiveOptimizer):
    """FedAdagrad: v <- v + D**2 (steps shrink as squared pseudo-gradients accumulate)."""

    name = "fedadagrad"

    def _second_moment(self, v: Array, d2: Array) -> Array:
        return v + d2


class FedAdam(_AdaptiveOptimizer):
    """FedAdam: v <- beta2 * v + (1 - beta2) * D**2."""

    name = "fedadam"

    def _second_moment(self, v: Array, d2: Array) -> Array:
        return self.beta2 * v + (1.0 - self.beta2) * d2


class FedYogi(_AdaptiveOptimizer):
    """FedYogi: v <- v - (1 - beta2) * D**2 * sign(v - D**2).

    Like Adam, but v moves additively and only as far as D**2 is from it, so a sudden large
    pseudo-gradient raises the step size less abruptly (more stable across heterogeneous groups).
    """

    name = "fedyogi"

    def _second_moment(self, v: Array, d2: Array) -> Array:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


class ServerAdam(FedAdam):
    """Adam as torch runs it (bias-corrected moments, beta2 0.999, eps 1e-8), on the averaged
    deltas. With nodes that take one plain gradient step (local_optimizer = "sgd", learning rate
    1), the delta is minus the mean of the groups' gradients, and this is centralized Adam on a
    batch of every group, step for step, without the data leaving the nodes."""

    name = "adam"

    def __init__(
        self,
        server_lr: float = 3e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tau: float = 1e-8,
        initial_accumulator: float | None = 0.0,
    ) -> None:
        super().__init__(server_lr, beta1, beta2, tau, initial_accumulator)

    def _direction(self, m: Array, v: Array) -> Array:
        t = self.step + 1
        m_hat = m / (1.0 - self.beta1**t)
        v_hat = v / (1.0 - self.beta2**t)
        return m_hat / (np.sqrt(v_hat) + self.tau)


def make_server_optimizer(name: str, **kwargs: float) -> ServerOptimizer:
    """A server optimizer by name: fedavg, fedadagrad, fedadam, fedyogi or adam."""
    kinds: dict[str, type[FedAvgOptimizer] | type[_AdaptiveOptimizer]] = {
        "fedavg": FedAvgOptimizer,
        "fedadagrad": FedAdagrad,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "adam": ServerAdam,
    }
    try:
        kind = kinds[name.lower()]
    except KeyError:
        raise InputError(f"unknown server optimizer {name!r} (known: {', '.join(kinds)})") from None
    return kind(**kwargs)


__all__ = [
    "MAX_FAIRNESS_Q",
    "AggregationError",
    "FedAdagrad",
    "FedAdam",
    "FedAvgOptimizer",
    "FedYogi",
    "ServerAdam",
    "ServerOptimizer",
    "StreamingFedAvg",
    "clip_by_norm",
    "clip_scale",
    "fairness_weight",
    "fedavg",
    "make_server_optimizer",
    "qfedavg_weight",
    "qfedavg_weights",
    "streaming_update_norm",
    "update_norm",
]
