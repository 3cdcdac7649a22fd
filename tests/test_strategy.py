"""Aggregation rules: FedAvg (whole and streaming), server optimizers, fairness weights, clipping."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.strategy import (
    AggregationError,
    FedAdagrad,
    FedAdam,
    FedAvgOptimizer,
    FedYogi,
    StateValue,
    StreamingFedAvg,
    clip_by_norm,
    clip_scale,
    fairness_weight,
    fedavg,
    make_server_optimizer,
    qfedavg_weight,
    qfedavg_weights,
    streaming_update_norm,
    update_norm,
)
from pluralfed import wire
from pluralfed.errors import InputError
from pluralfed.wire import TensorSlice, UpdateSpool


def random_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(6, 5)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
        "s": np.array(rng.normal(), dtype=np.float64),
        "h": rng.normal(size=(4,)).astype(np.float16),
        "empty": np.zeros((0, 2), np.float32),
    }


def random_updates(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [random_model(rng) for _ in range(n)]


def spooled(update: dict[str, np.ndarray], directory: Path, chunk_bytes: int) -> UpdateSpool:
    spool = UpdateSpool(wire.specs_of(update), directory)
    for chunk in wire.iter_chunks(update, chunk_bytes):
        spool.add(chunk)
    spool.finish(wire.digest_of(update))
    return spool


# --------------------------------------------------------------------------------------------
# fedavg


def test_fedavg_matches_an_independent_weighted_mean() -> None:
    updates = random_updates(0, 5)
    weights = [3, 1, 4, 1, 5]
    out = fedavg(updates, weights)
    assert list(out) == list(updates[0])
    for name in updates[0]:
        stack = np.stack([np.asarray(u[name], np.float64) for u in updates])
        expected = np.average(stack, axis=0, weights=weights) if stack.size else stack[0]
        assert out[name].dtype == updates[0][name].dtype
        assert out[name].shape == updates[0][name].shape
        tol = 1e-3 if updates[0][name].dtype == np.float16 else 1e-6
        np.testing.assert_allclose(out[name], expected, rtol=tol, atol=tol)


def test_fedavg_uniform_is_the_plain_mean_and_scale_free() -> None:
    updates = random_updates(1, 4)
    uniform = fedavg(updates)
    np.testing.assert_allclose(uniform["w"], np.mean([u["w"] for u in updates], axis=0), rtol=1e-6)
    a = fedavg(updates, [1, 2, 3, 4])
    b = fedavg(updates, [10, 20, 30, 40])
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


def test_fedavg_refuses_bad_input() -> None:
    updates = random_updates(2, 2)
    with pytest.raises(AggregationError, match="no updates"):
        fedavg([])
    with pytest.raises(InputError, match="2 updates but 1 weights"):
        fedavg(updates, [1.0])
    with pytest.raises(InputError, match="weight"):
        fedavg(updates, [1.0, -1.0])
    with pytest.raises(InputError, match="weight"):
        fedavg(updates, [1.0, math.nan])
    with pytest.raises(AggregationError, match="total weight is 0"):
        fedavg(updates, [0.0, 0.0])
    bad = dict(updates[1])
    bad["w"] = bad["w"].T
    with pytest.raises(InputError, match=r"'w'.*expected float32\[6, 5\]"):
        fedavg([updates[0], bad])
    missing = {k: v for k, v in updates[1].items() if k != "b"}
    with pytest.raises(InputError, match="missing"):
        fedavg([updates[0], missing])


def test_fedavg_refuses_more_weights_than_updates_and_another_dtype() -> None:
    updates = random_updates(2, 2)
    with pytest.raises(InputError, match="2 updates but 3 weights"):
        fedavg(updates, [1.0, 1.0, 1.0])
    # the same shape in another dtype is another model, not something to average
    other = dict(updates[1])
    other["w"] = other["w"].astype(np.float64)
    with pytest.raises(InputError, match=r"'w' is float64\[6, 5\], expected float32\[6, 5\]"):
        fedavg([updates[0], other])
    with pytest.raises(InputError, match=r"'w' is float64"):
        FedAvgOptimizer().apply(updates[0], other)


def test_integer_and_bool_tensors_average_sensibly() -> None:
    updates = [
        {"n": np.array([1, 10], np.int64), "m": np.array([True, False])},
        {"n": np.array([2, 20], np.int64), "m": np.array([True, True])},
        {"n": np.array([4, 31], np.int64), "m": np.array([False, False])},
    ]
    out = fedavg(updates, [1, 1, 2])
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [3, 23]  # 11/4 -> 3, 92/4 -> 23
    assert out["m"].dtype == np.bool_ and out["m"].tolist() == [True, False]  # weighted majority


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])  # the wire's integer dtypes
def test_integers_at_the_top_of_their_range_average_without_wrapping(dtype: type) -> None:
    """The mean is computed in float64, where int64's largest value rounds up to a number the
    dtype cannot hold: it saturates at the largest float64 the dtype holds, never
    wrapping to the most negative value. Smaller integers average exactly at their top."""
    info = np.iinfo(dtype)
    top: np.ndarray = np.array([info.max], dtype)
    bottom: np.ndarray = np.array([info.min], dtype)
    expected = int(np.nextafter(float(info.max), 0.0)) if info.bits == 64 else int(info.max)
    for out in (
        fedavg([{"n": top}, {"n": top}])["n"],
        fedavg([{"n": top}, {"n": top.copy()}], [1, 3])["n"],
    ):
        assert out.dtype == dtype and int(out[0]) == expected
        assert expected > int(info.max) - 2**11  # within float64's spacing at the top
    assert int(fedavg([{"n": bottom}, {"n": bottom}])["n"][0]) == int(info.min)
    aggregate = StreamingFedAvg(wire.specs_of({"n": top}))
    for _ in range(2):
        pieces: list[TensorSlice] = []
        assembler = wire.TensorAssembler(wire.specs_of({"n": top}), on_slice=pieces.append)
        for chunk in wire.iter_chunks({"n": top}, 64):
            assembler.add(chunk)
        assembler.finish(wire.digest_of({"n": top}))
        aggregate.fold_update(pieces, 1.0)
    assert int(aggregate.result()["n"][0]) == expected


def test_bfloat16_tensors_average_in_float() -> None:
    a = np.array([1.0, 2.0, -3.0], np.float32)
    b = np.array([3.0, 2.0, 5.0], np.float32)
    ups = [{"x": wire.float32_to_bfloat16(a)}, {"x": wire.float32_to_bfloat16(b)}]
    out = fedavg(ups)
    assert out["x"].dtype == np.uint16
    assert wire.bfloat16_to_float32(out["x"]).tolist() == [2.0, 2.0, 1.0]


# --------------------------------------------------------------------------------------------
# streaming


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_fedavg_with_random_chunking(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    updates = random_updates(seed, 6)
    weights = rng.integers(1, 500, size=len(updates)).tolist()
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    for update, weight in zip(updates, weights, strict=True):
        chunk_bytes = int(rng.integers(1, 200))
        with spooled(update, tmp_path, chunk_bytes) as spool:
            aggregate.fold_update(spool.replay(int(rng.integers(1, 300))), weight)
    assert aggregate.num_updates == len(updates)
    assert aggregate.total_weight == sum(weights)
    streamed, reference = aggregate.result(), fedavg(updates, weights)
    assert list(streamed) == list(reference)
    for name in reference:
        assert streamed[name].dtype == reference[name].dtype
        assert streamed[name].shape == reference[name].shape
        np.testing.assert_array_equal(streamed[name], reference[name])  # same float64 sums
    assert list(tmp_path.iterdir()) == []


def test_streaming_from_the_assembler_callback() -> None:
    updates = random_updates(3, 3)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    for k, update in enumerate(updates):
        pieces: list[TensorSlice] = []
        assembler = wire.TensorAssembler(wire.specs_of(update), on_slice=pieces.append)
        for chunk in wire.iter_chunks(update, 7):
            assembler.add(chunk)
        assembler.finish(wire.digest_of(update))
        aggregate.fold_update(pieces, k + 1)
    for name, value in fedavg(updates, [1, 2, 3]).items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_streaming_uniform_ignores_the_weights(tmp_path: Path) -> None:
    updates = random_updates(4, 3)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]), uniform=True)
    for update, weight in zip(updates, [5, 50, 500], strict=True):
        with spooled(update, tmp_path, 64) as spool:
            aggregate.fold_update(spool.replay(), weight)
    assert aggregate.total_weight == 3
    for name, value in fedavg(updates).items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_streaming_bfloat16_equals_fedavg() -> None:
    rng = np.random.default_rng(12)
    updates = [{"x": wire.float32_to_bfloat16(rng.normal(size=7))} for _ in range(3)]
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    for k, update in enumerate(updates):
        aggregate.fold_update(_slices(update), k + 1)
    out = aggregate.result()
    assert out["x"].dtype == np.uint16
    np.testing.assert_array_equal(out["x"], fedavg(updates, [1, 2, 3])["x"])


def test_a_reset_aggregate_starts_over_even_after_it_broke() -> None:
    """The coordinator reuses one aggregate round after round: a reset must forget the last
    round's weight and a partly folded update of it."""
    updates = random_updates(13, 3)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    aggregate.fold_update(_slices(updates[0]), 4)
    aggregate.reset()
    aggregate.fold_update(_slices(updates[1]), 2)
    assert aggregate.total_weight == 2 and aggregate.num_updates == 1
    for name, value in updates[1].items():
        np.testing.assert_array_equal(aggregate.result()[name], value)

    def breaks_off() -> Iterator[TensorSlice]:
        yield next(_slices(updates[2]))
        raise OSError("disk gone")

    with pytest.raises(OSError):
        aggregate.fold_update(breaks_off(), 1)
    with pytest.raises(AggregationError, match="partly folded"):
        aggregate.result()
    aggregate.reset()
    aggregate.fold_update(_slices(updates[2]), 3)
    for name, value in updates[2].items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_duplicate_tensor_names_are_refused() -> None:
    spec = wire.TensorSpec("w", "float32", (2,))
    with pytest.raises(InputError, match="duplicate tensor names"):
        StreamingFedAvg([spec, wire.TensorSpec("b", "float32", (1,)), spec])


def test_streaming_with_no_updates_is_an_error() -> None:
    aggregate = StreamingFedAvg(wire.specs_of(random_updates(5, 1)[0]))
    with pytest.raises(AggregationError, match="no updates"):
        aggregate.result()


def test_rejected_upload_never_touches_the_sum(tmp_path: Path) -> None:
    updates = random_updates(6, 3)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    with spooled(updates[0], tmp_path, 32) as spool:
        aggregate.fold_update(spool.replay(), 2)
    before = {name: s.copy() for name, s in aggregate._sums.items()}

    # bad digest: dropped at finish, the update cannot even be replayed
    bad = UpdateSpool(wire.specs_of(updates[1]), tmp_path)
    for chunk in wire.iter_chunks(updates[1], 32):
        bad.add(chunk)
    with pytest.raises(wire.DigestMismatchError):
        bad.finish(wire.digest_of(updates[2]))
    with pytest.raises(RuntimeError):
        aggregate.fold_update(bad.replay(), 3)
    # truncated upload
    cut = UpdateSpool(wire.specs_of(updates[1]), tmp_path)
    for chunk in list(wire.iter_chunks(updates[1], 32))[:-1]:
        cut.add(chunk)
    with pytest.raises(wire.WireError):
        cut.finish(wire.digest_of(updates[1]))
    assert list(tmp_path.iterdir()) == []

    assert aggregate.num_updates == 1 and aggregate.total_weight == 2
    for name, s in aggregate._sums.items():
        np.testing.assert_array_equal(s, before[name])
    with spooled(updates[2], tmp_path, 32) as spool:
        aggregate.fold_update(spool.replay(), 5)
    for name, value in fedavg([updates[0], updates[2]], [2, 5]).items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_errors_found_before_folding_leave_the_aggregate_usable() -> None:
    updates = random_updates(7, 2)
    specs = wire.specs_of(updates[0])
    aggregate = StreamingFedAvg(specs)
    aggregate.fold_update(_slices(updates[0]), 1)
    wrong = wire.TensorSpec("w", "float32", (5, 6))
    with pytest.raises(InputError, match="'w'"):
        aggregate.fold_update([TensorSlice(wrong, 0, np.zeros(30, np.float32))], 1)
    with pytest.raises(InputError, match="not in the model"):
        aggregate.add_chunk("nope", 0, np.zeros(1), 1)
    aggregate.abort()
    aggregate.fold_update(_slices(updates[1]), 1)
    for name, value in fedavg(updates).items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def _slices(update: dict[str, np.ndarray]) -> Iterator[TensorSlice]:
    for name, array in update.items():
        spec = wire.TensorSpec.of(name, array)
        yield TensorSlice(spec, 0, np.asarray(array).reshape(-1))


def test_a_partly_folded_update_makes_the_aggregate_refuse() -> None:
    updates = random_updates(8, 2)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    aggregate.fold_update(_slices(updates[0]), 1)

    def breaks_off() -> Iterator[TensorSlice]:
        yield next(_slices(updates[1]))
        raise OSError("disk gone")

    with pytest.raises(OSError):
        aggregate.fold_update(breaks_off(), 1)
    with pytest.raises(AggregationError, match="partly folded"):
        aggregate.result()

    incomplete = StreamingFedAvg(wire.specs_of(updates[0]))
    with pytest.raises(AggregationError, match="incomplete: tensor 'b'"):
        incomplete.fold_update(list(_slices(updates[0]))[:1], 1)
    with pytest.raises(AggregationError, match="unusable"):
        incomplete.result()


def test_add_chunk_and_commit_by_hand() -> None:
    update = {"v": np.arange(10, dtype=np.float32)}
    aggregate = StreamingFedAvg(wire.specs_of(update))
    aggregate.add_chunk("v", 0, update["v"][:4], 2.0)
    with pytest.raises(InputError, match="expected element 4"):
        aggregate.add_chunk("v", 5, update["v"][5:], 2.0)
    with pytest.raises(InputError, match="weight"):
        aggregate.add_chunk("v", 4, update["v"][4:], 3.0)
    with pytest.raises(InputError, match="non-finite"):
        aggregate.add_chunk("v", 4, np.full(6, np.nan, np.float32), 2.0)
    with pytest.raises(AggregationError, match="still open"):
        aggregate.result()
    aggregate.add_chunk("v", 4, update["v"][4:], 2.0)
    aggregate.commit(2.0)
    np.testing.assert_array_equal(aggregate.result()["v"], update["v"])


def test_a_slice_past_the_tensors_end_is_refused_before_folding() -> None:
    aggregate = StreamingFedAvg([wire.TensorSpec("v", "float32", (4,))])
    aggregate.add_chunk("v", 0, np.ones(2, np.float32), 1.0)
    with pytest.raises(InputError, match="slice of 3 elements at 2 overflows its 4 elements"):
        aggregate.add_chunk("v", 2, np.ones(3, np.float32), 1.0)
    aggregate.add_chunk("v", 2, np.full(2, 3.0, np.float32), 1.0)
    aggregate.commit(1.0)
    assert aggregate.result()["v"].tolist() == [1.0, 1.0, 3.0, 3.0]


def test_commit_with_another_weight_than_the_slices_is_refused() -> None:
    aggregate = StreamingFedAvg([wire.TensorSpec("v", "float32", (2,))])
    aggregate.add_chunk("v", 0, np.ones(2, np.float32), 2.0)
    with pytest.raises(
        InputError, match=r"commit with weight 3\.0, the update was folded with 2\.0"
    ):
        aggregate.commit(3.0)
    aggregate.commit(2.0)
    assert aggregate.total_weight == 2.0


def test_an_incomplete_commit_by_hand_leaves_no_update_open() -> None:
    aggregate = StreamingFedAvg([wire.TensorSpec("v", "float32", (4,))])
    aggregate.add_chunk("v", 0, np.ones(2, np.float32), 1.0)
    with pytest.raises(AggregationError, match="incomplete: tensor 'v' has 2 of 4 elements"):
        aggregate.commit(1.0)
    # the half-folded update was dropped (not left open): the aggregate says why it is unusable
    with pytest.raises(AggregationError, match="partly folded"):
        aggregate.result()


def test_an_update_refused_before_any_value_was_folded_leaves_the_aggregate_usable() -> None:
    """An empty slice, or a first slice at the wrong offset, opens the update but folds
    nothing: dropping it must not make the round's aggregate unusable."""
    updates = random_updates(14, 2)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    aggregate.fold_update(_slices(updates[0]), 1)
    spec = wire.TensorSpec.of("w", updates[1]["w"])
    with pytest.raises(InputError, match="expected element 0"):
        aggregate.fold_update([TensorSlice(spec, 3, np.zeros(3, np.float32))], 1)
    aggregate.add_chunk("w", 0, np.zeros(0, np.float32), 1.0)
    aggregate.abort()
    aggregate.fold_update(_slices(updates[1]), 1)
    for name, value in fedavg(updates).items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_fold_update_refuses_a_scale_past_one_and_an_update_open_by_hand() -> None:
    updates = random_updates(15, 2)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))
    for bad in (1.5, -0.5):
        with pytest.raises(InputError, match="scale must be in"):
            aggregate.fold_update(_slices(updates[0]), 1, reference=updates[1], scale=bad)
    pieces = list(_slices(updates[0]))
    aggregate.add_chunk(pieces[0].spec.name, 0, pieces[0].values, 1.0)
    with pytest.raises(AggregationError, match="another update is open"):
        aggregate.fold_update(_slices(updates[1]), 1)
    # the update open by hand is untouched and can be finished
    for piece in pieces[1:]:
        aggregate.add_chunk(piece.spec.name, 0, piece.values, 1.0)
    aggregate.commit(1.0)
    for name, value in updates[0].items():
        np.testing.assert_array_equal(aggregate.result()[name], value)


def test_a_fold_interrupted_by_ctrl_c_is_not_left_open() -> None:
    updates = random_updates(16, 2)
    aggregate = StreamingFedAvg(wire.specs_of(updates[0]))

    def interrupted() -> Iterator[TensorSlice]:
        yield next(_slices(updates[0]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        aggregate.fold_update(interrupted(), 1)
    with pytest.raises(AggregationError, match="partly folded"):
        aggregate.result()


# --------------------------------------------------------------------------------------------
# norms and clipping


def test_update_norm_and_clipping() -> None:
    reference: dict[str, np.ndarray] = {"a": np.zeros(2, np.float32), "n": np.array([1], np.int64)}
    update: dict[str, np.ndarray] = {
        "a": np.array([3.0, 4.0], np.float32),
        "n": np.array([100], np.int64),
    }
    assert update_norm(update, reference) == 5.0  # ints do not count
    clipped, norm = clip_by_norm(update, reference, 2.5)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [1.5, 2.0])
    assert clipped["n"].tolist() == [100]
    unchanged, _ = clip_by_norm(update, reference, 10.0)
    np.testing.assert_array_equal(unchanged["a"], update["a"])
    assert clip_scale(5.0, 2.5) == 0.5 and clip_scale(1.0, 2.5) == 1.0
    with pytest.raises(InputError):
        clip_scale(1.0, 0.0)


def test_norms_leave_out_integer_tensors_and_clipping_needs_a_finite_bound() -> None:
    reference: dict[str, np.ndarray] = {"a": np.zeros(2, np.float32), "n": np.array([1], np.int64)}
    update: dict[str, np.ndarray] = {
        "a": np.array([3.0, 4.0], np.float32),
        "n": np.array([100], np.int64),
    }
    pieces = [TensorSlice(spec, 0, update[spec.name]) for spec in wire.specs_of(update)]
    assert streaming_update_norm(pieces, reference) == 5.0  # the int tensor does not count
    for bad in (math.inf, math.nan, -1.0):
        with pytest.raises(InputError, match="max_norm must be a finite number > 0"):
            clip_scale(1.0, bad)


def test_streaming_norm_and_clipped_fold_match_the_whole_versions(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    global_model = random_model(rng)
    updates = random_updates(10, 3)
    aggregate = StreamingFedAvg(wire.specs_of(global_model))
    clipped_updates = []
    for update in updates:
        with spooled(update, tmp_path, 40) as spool:
            norm = streaming_update_norm(spool.replay(24), global_model)
            assert norm == pytest.approx(update_norm(update, global_model), rel=1e-12)
            scale = clip_scale(norm, 1.0)
            aggregate.fold_update(spool.replay(), 1, reference=global_model, scale=scale)
        clipped_updates.append(clip_by_norm(update, global_model, 1.0)[0])
    expected = fedavg(clipped_updates)
    for name, value in aggregate.result().items():
        np.testing.assert_allclose(
            value, expected[name], rtol=1e-3 if value.dtype == np.float16 else 1e-6
        )


# --------------------------------------------------------------------------------------------
# q-FedAvg weights


def test_qfedavg_weights() -> None:
    n = [100, 300, 600]
    losses = [0.5, 1.0, 2.0]
    np.testing.assert_allclose(qfedavg_weights(losses, n, 0.0), [0.1, 0.3, 0.6])
    # q = 2: p_k * F_k^2 = 0.1*0.25, 0.3*1, 0.6*4 -> normalised
    raw = np.array([0.1 * 0.25, 0.3 * 1.0, 0.6 * 4.0])
    np.testing.assert_allclose(qfedavg_weights(losses, n, 2.0), raw / raw.sum())
    assert qfedavg_weights(losses, n, 2.0).sum() == pytest.approx(1.0)
    # higher q moves weight to the worst-served group
    assert qfedavg_weights(losses, n, 5.0)[2] > qfedavg_weights(losses, n, 1.0)[2]
    # large q neither overflows nor underflows into nonsense
    w = qfedavg_weights([1e3, 2e3], [1, 1], 200.0)
    assert np.isfinite(w).all() and w[1] == pytest.approx(1.0)
    # the per-update form gives the same average through StreamingFedAvg's normalisation
    single = [qfedavg_weight(x, k, 2.0) for x, k in zip(losses, n, strict=True)]
    np.testing.assert_allclose(np.array(single) / sum(single), raw / raw.sum())
    # zero loss: weight 0 for q > 0, unaffected for q = 0
    np.testing.assert_allclose(qfedavg_weights([0.0, 1.0], [1, 1], 1.0), [0.0, 1.0])
    np.testing.assert_allclose(qfedavg_weights([0.0, 1.0], [1, 1], 0.0), [0.5, 0.5])
    with pytest.raises(InputError, match="weight 0"):
        qfedavg_weights([0.0], [5], 1.0)
    with pytest.raises(InputError, match="q must"):
        qfedavg_weights(losses, n, -1.0)
    with pytest.raises(InputError, match="loss"):
        qfedavg_weights([-1.0, 1.0, 1.0], n, 1.0)
    with pytest.raises(InputError):
        qfedavg_weights([1.0], n, 1.0)


def test_fairness_weight_is_examples_times_one_minus_alignment_to_the_q() -> None:
    """The coordinator's fairness_q weight: n * (1 - alignment_before) ** q."""
    assert fairness_weight(120.0, 0.7, 0.0) == 120.0  # q = 0: plain FedAvg
    assert fairness_weight(120.0, 0.7, 2.0) == pytest.approx(120.0 * 0.3**2)
    assert fairness_weight(50.0, 0.25, 1.5) == pytest.approx(50.0 * 0.75**1.5)
    # the worse-served group weighs more, and more so with a larger q
    worse, better = fairness_weight(100.0, 0.6, 2.0), fairness_weight(100.0, 0.8, 2.0)
    assert worse / better == pytest.approx(4.0)
    assert fairness_weight(100.0, 0.6, 4.0) / fairness_weight(100.0, 0.8, 4.0) == pytest.approx(16)
    # a perfectly served group keeps a tiny positive weight (a round of them still averages)
    assert 0.0 < fairness_weight(100.0, 1.0, 2.0) < 1e-9
    for bad in (float("nan"), float("inf"), -0.01, 1.01):
        with pytest.raises(InputError, match="alignment_before"):
            fairness_weight(100.0, bad, 2.0)
    for bad_q in (-1.0, 10.5, float("nan")):
        with pytest.raises(InputError, match="fairness q"):
            fairness_weight(100.0, 0.5, bad_q)


# --------------------------------------------------------------------------------------------
# server optimizers


def test_plain_fedavg_optimizer() -> None:
    g: dict[str, np.ndarray] = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([1], np.int64)}
    avg: dict[str, np.ndarray] = {
        "w": np.array([3.0, 0.0], np.float32),
        "n": np.array([5], np.int64),
    }
    out = FedAvgOptimizer().apply(g, avg)
    np.testing.assert_array_equal(out["w"], avg["w"])
    damped = FedAvgOptimizer(server_lr=0.5).apply(g, avg)
    np.testing.assert_allclose(damped["w"], [2.0, 1.0])
    assert damped["n"].tolist() == [5]


def test_fedavg_optimizer_at_server_lr_one_is_the_average_itself() -> None:
    """new = averaged exactly (not global + (averaged - global), which loses a small weight
    next to a large one), and no copy of it."""
    g = {"w": np.array([1.0, 3e38], np.float32)}
    avg = {"w": np.array([1e-30, -3e38], np.float32)}
    out = FedAvgOptimizer().apply(g, avg)
    assert out["w"] is avg["w"]
    assert out["w"].tolist() == avg["w"].tolist()


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_a_step_past_float32s_range_is_refused_and_leaves_the_state(optimizer: str) -> None:
    """Finite weights and a finite average can still give an infinite model once stepped."""
    g: dict[str, np.ndarray] = {"w": np.array([0.0, 1.0], np.float32), "n": np.array([1], np.int64)}
    avg: dict[str, np.ndarray] = {
        "w": np.array([3e38, 1.0], np.float32),
        "n": np.array([1], np.int64),
    }
    # FedAdam's first step moves each weight by about server_lr
    opt = FedAvgOptimizer(server_lr=2.0) if optimizer == "fedavg" else FedAdam(server_lr=1e39)
    before = opt.state_dict()
    with pytest.raises(AggregationError, match=r"tensor 'w' has 1 non-finite value"):
        opt.apply(g, avg)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def hand_adaptive(
    kind: str, g: float, averages: list[float], lr: float, b1: float, b2: float, tau: float
) -> list[float]:
    """Reddi et al. 2021, Algorithm 2, written out for one scalar."""
    m, v, x, out = 0.0, tau * tau, g, []
    for avg in averages:
        d = avg - x
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif kind == "yogi":
            v = v - (1 - b2) * d * d * (1.0 if v - d * d > 0 else -1.0 if v - d * d < 0 else 0.0)
        else:
            v = v + d * d
        x = x + lr * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


@pytest.mark.parametrize(
    ("kind", "cls"), [("adam", FedAdam), ("yogi", FedYogi), ("adagrad", FedAdagrad)]
)
def test_adaptive_optimizers_match_a_hand_computation_for_two_steps(kind: str, cls: type) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    start = [0.5, -1.0, 2.0]
    # round 1 and round 2 averages (the second is relative to the new global model)
    avg1 = [0.7, -1.5, 2.0]
    avg2_delta = [0.1, 0.3, -0.2]
    opt = cls(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    g0 = {"p": np.array(start, np.float64)}
    g1 = opt.apply(g0, {"p": np.array(avg1, np.float64)})
    avg2 = g1["p"] + np.array(avg2_delta)
    g2 = opt.apply(g1, {"p": avg2})
    for i in range(3):
        expected = hand_adaptive(kind, start[i], [avg1[i], float(avg2[i])], lr, b1, b2, tau)
        assert g1["p"][i] == pytest.approx(expected[0], rel=1e-12, abs=1e-15)
        assert g2["p"][i] == pytest.approx(expected[1], rel=1e-12, abs=1e-15)
    assert opt.step == 2


def test_adam_first_step_by_hand() -> None:
    """One step spelled out: m = 0.1 D, v = tau^2 * 0.99 + 0.01 D^2."""
    opt = FedAdam(server_lr=1.0, beta1=0.9, beta2=0.99, tau=0.01)
    out = opt.apply({"x": np.array([0.0])}, {"x": np.array([2.0])})
    m = 0.1 * 2.0
    v = 0.99 * 1e-4 + 0.01 * 4.0
    assert out["x"][0] == pytest.approx(m / (math.sqrt(v) + 0.01))


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_optimizer_state_round_trip(cls: type[FedAdam]) -> None:
    rng = np.random.default_rng(11)
    g: dict[str, np.ndarray] = {
        "w": rng.normal(size=(3, 2)).astype(np.float32),
        "n": np.array([3], np.int64),
        "bf": wire.float32_to_bfloat16(rng.normal(size=4)),
    }

    def avg(seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        return {
            "w": (g["w"] + r.normal(size=(3, 2))).astype(np.float32),
            "n": np.array([4], np.int64),
            "bf": wire.float32_to_bfloat16(r.normal(size=4)),
        }

    original = cls(server_lr=0.05)
    g1 = original.apply(g, avg(1))
    state = original.state_dict()
    assert state["step"] == 1
    # ints have no moments
    assert set(state) == {"optimizer", "step", "m/w", "v/w", "m/bf", "v/bf"}
    assert state["optimizer"] == cls.name
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if "/" in k)

    restored = cls(server_lr=0.05)
    restored.load_state_dict(state)
    a, b = original.apply(g1, avg(2)), restored.apply(g1, avg(2))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert a["n"].tolist() == [4] and a["w"].dtype == np.float32 and a["bf"].dtype == np.uint16

    with pytest.raises(InputError, match="unexpected entry"):
        cls().load_state_dict({"step": 1, "q/w": np.zeros(1)})
    with pytest.raises(InputError, match="step"):
        cls().load_state_dict({"step": -1})
    with pytest.raises(InputError, match="do not match"):
        cls().load_state_dict({"step": 1, "m/w": np.zeros(2)})
    mismatched = cls()
    mismatched.load_state_dict({"step": 1, "m/w": np.zeros(2), "v/w": np.zeros(2)})
    with pytest.raises(InputError, match="does not fit"):
        mismatched.apply(g, avg(3))


def test_an_optimizer_refuses_another_optimizers_state() -> None:
    g = {"w": np.ones(3, np.float32)}
    adam = FedAdam()
    adam.apply(g, {"w": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match=r"saved by server optimizer 'fedadam'.*'fedyogi'"):
        FedYogi().load_state_dict(adam.state_dict())
    with pytest.raises(InputError, match=r"saved by server optimizer 'fedadam'.*'fedavg'"):
        FedAvgOptimizer().load_state_dict(adam.state_dict())
    fedavg = FedAvgOptimizer()
    fedavg.apply(g, {"w": np.zeros(3, np.float32)})
    assert fedavg.state_dict() == {"optimizer": "fedavg", "step": 1}
    with pytest.raises(InputError, match="saved by server optimizer 'fedavg'"):
        FedAdam().load_state_dict(fedavg.state_dict())
    # a state saved before states named their optimizer: FedAvg still refuses moments
    legacy = {k: v for k, v in adam.state_dict().items() if k != "optimizer"}
    with pytest.raises(InputError, match="moments of an adaptive optimizer"):
        FedAvgOptimizer().load_state_dict(legacy)
    FedAdam().load_state_dict(legacy)
    restored = FedAvgOptimizer()
    restored.load_state_dict({"step": 4})
    assert restored.step == 4


def test_failed_apply_leaves_the_state_alone() -> None:
    opt = FedAdam()
    g = {"w": np.ones(3, np.float32)}
    opt.apply(g, {"w": np.zeros(3, np.float32)})
    state = opt.state_dict()
    with pytest.raises(InputError):
        opt.apply(g, {"w": np.zeros(4, np.float32)})
    after = opt.state_dict()
    assert after["step"] == state["step"]
    np.testing.assert_array_equal(after["m/w"], state["m/w"])


def test_make_server_optimizer() -> None:
    assert isinstance(make_server_optimizer("FedYogi", server_lr=0.1), FedYogi)
    assert isinstance(make_server_optimizer("fedavg"), FedAvgOptimizer)
    with pytest.raises(InputError, match="unknown server optimizer"):
        make_server_optimizer("sgd")
    with pytest.raises(InputError, match="beta1"):
        FedAdam(beta1=1.0)


def test_optimizers_refuse_a_step_size_or_tau_of_zero_or_infinity() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(InputError, match="server_lr must be a finite number > 0"):
            FedAvgOptimizer(server_lr=bad)
        with pytest.raises(InputError, match="server_lr must be a finite number > 0"):
            FedAdam(server_lr=bad)
        with pytest.raises(InputError, match="tau must be a finite number > 0"):
            FedYogi(tau=bad)


def test_optimizer_state_with_bad_moments_is_refused() -> None:
    ok: dict[str, StateValue] = {"step": 1, "m/w": np.zeros(2), "v/w": np.ones(2)}
    FedAdam().load_state_dict(ok)
    # a negative second moment has no square root; a NaN anywhere would spread to the model
    for key, value in (("v/w", np.array([1.0, -1e-9])), ("m/w", np.array([0.0, np.nan]))):
        with pytest.raises(InputError, match=f"'{key}' has invalid values"):
            FedAdam().load_state_dict({**ok, key: value})
    with pytest.raises(InputError, match="first and second moments do not match"):
        FedAdam().load_state_dict({**ok, "v/w": np.ones(3)})


def test_server_adam_on_minus_gradients_is_torchs_adam() -> None:
    """Nodes that take one plain gradient step (lr 1) upload w - g: ServerAdam on their average is
    then torch's Adam on the mean gradient, step for step (the centralized batched step)."""
    import torch

    from coordinator.strategy import ServerAdam, make_server_optimizer

    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) * 10.0**-k for k in range(4)]
    param = torch.nn.Parameter(torch.tensor(start))
    reference = torch.optim.Adam([param], lr=3e-4)
    server = make_server_optimizer("adam")
    assert isinstance(server, ServerAdam)
    weights = {"w": start.copy()}
    for g in grads:
        param.grad = torch.tensor(g)
        reference.step()
        weights = server.apply(weights, {"w": weights["w"] - g})
        np.testing.assert_allclose(weights["w"], param.detach().numpy(), rtol=0, atol=2e-7)
    # its state (step included) survives a checkpoint, as the other optimizers' do
    again = ServerAdam()
    again.load_state_dict(server.state_dict())
    assert again.step == len(grads)
