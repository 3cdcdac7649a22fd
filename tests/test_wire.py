"""The tensor wire format: round trips, chunking, digest, and every way a stream can be wrong."""

from __future__ import annotations

import errno
import struct
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from pluralfed import tensorfiles, wire
from pluralfed.errors import InputError
from pluralfed.wire import (
    Chunk,
    DigestMismatchError,
    NonFiniteError,
    TensorAssembler,
    TensorSlice,
    TensorSpec,
    UpdateSpool,
    WireError,
)

CHUNK_SIZES = [1, 2, 3, 5, 8, 13, 64, 1000, wire.DEFAULT_CHUNK_BYTES]


def sample_model() -> dict[str, np.ndarray]:
    """Every wire dtype, a 0-d tensor and empty tensors, in a fixed order."""
    rng = np.random.default_rng(0)
    bf16 = wire.float32_to_bfloat16(rng.normal(size=(3, 4)).astype(np.float32))
    return {
        "encoder.weight": rng.normal(size=(4, 5)).astype(np.float32),
        "scale": np.array(2.5, dtype=np.float64),  # 0-d
        "half": rng.normal(size=(7,)).astype(np.float16),
        "bf16": bf16,
        "empty": np.zeros((0, 3), dtype=np.float32),
        "steps": np.array([1, -2, 3], dtype=np.int64),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
        "bytes": np.arange(11, dtype=np.uint8),
        "mask": np.array([[True, False], [False, True]]),
        "empty_int": np.zeros((2, 0), dtype=np.int64),
    }


def assert_models_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.shape == y.shape, name
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


def chunks_of(model: dict[str, np.ndarray], chunk_bytes: int = 4) -> list[Chunk]:
    return list(wire.iter_chunks(model, chunk_bytes))


def only_first_carries_spec(chunks: list[Chunk]) -> list[Chunk]:
    """As the transport sends them: dtype and shape on each tensor's first chunk only."""
    return [c if c.offset == 0 else replace(c, dtype=None, shape=None) for c in chunks]


# --------------------------------------------------------------------------------------------
# round trips and chunking


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
def test_round_trip_every_dtype_and_shape(chunk_bytes: int) -> None:
    model = sample_model()
    specs = wire.specs_of(model)
    chunks = list(wire.iter_chunks(model, chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    out = wire.assemble(only_first_carries_spec(chunks), wire.digest_of(model), specs)
    assert_models_equal(model, out)


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
def test_chunks_are_contiguous_and_cover_each_tensor(chunk_bytes: int) -> None:
    model = sample_model()
    chunks = list(wire.iter_chunks(model, chunk_bytes))
    for spec in wire.specs_of(model):
        mine = [c for c in chunks if c.name == spec.name]
        assert mine, f"{spec.name} has no chunk"
        assert mine[0].offset == 0
        assert mine[0].dtype == spec.dtype and mine[0].shape == spec.shape
        offsets = [c.offset for c in mine]
        sizes = [len(c.data) for c in mine]
        assert offsets == list(np.cumsum([0, *sizes[:-1]]))
        assert sum(sizes) == spec.nbytes
        if chunk_bytes >= spec.itemsize:  # cut on element boundaries when possible
            assert all(s % spec.itemsize == 0 for s in sizes)
    names = [c.name for c in chunks]
    assert list(dict.fromkeys(names)) == list(model)  # tensor by tensor, in model order


def test_chunks_are_views_not_copies() -> None:
    big = np.arange(1 << 16, dtype=np.float32)
    chunks = list(wire.iter_chunks({"w": big}, 4096))
    assert all(isinstance(c.data, memoryview) for c in chunks)
    first = np.frombuffer(chunks[0].data, dtype=np.float32)
    assert np.shares_memory(first, big)


def test_non_contiguous_and_big_endian_inputs_are_normalised() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = {"t": base.T, "be": base.astype(">f4")}
    out = wire.assemble(wire.iter_chunks(model, 5), wire.digest_of(model))
    assert np.array_equal(out["t"], base.T)
    assert out["be"].dtype == np.dtype("<f4") and np.array_equal(out["be"], base)
    assert wire.digest_of({"a": base.astype(">f4")}) == wire.digest_of({"a": base})


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(WireError, match=r"'x'.*int16"):
        list(wire.iter_chunks({"x": np.zeros(3, dtype=np.int16)}))
    for model in ({"x": np.zeros(3, dtype=np.float32)}, {"e": np.zeros(0, np.uint8)}, {}):
        with pytest.raises(ValueError, match="chunk_bytes must be at least 1, got 0"):
            list(wire.iter_chunks(model, 0))


def test_spec_nbytes_and_validation() -> None:
    spec = TensorSpec("w", "float16", (3, 4))
    assert (spec.numel, spec.itemsize, spec.nbytes) == (12, 2, 24)
    assert TensorSpec("s", "float32", ()).nbytes == 4
    assert TensorSpec("e", "int64", (0, 5)).nbytes == 0
    assert TensorSpec.of("b", wire.float32_to_bfloat16(np.ones(3))).dtype == "bfloat16"
    for bad in (("", "float32", (1,)), ("w", "complex64", (1,)), ("w", "float32", (-1,))):
        with pytest.raises(WireError):
            TensorSpec(*bad)


def test_spec_limits_are_inclusive_and_each_refusal_names_the_tensor() -> None:
    """The format's limits (MODULE docstring): a name of at most 1024 UTF-8 bytes, at most 32
    dimensions, dimensions and the byte count within u64; at the limit is allowed, one past it is
    refused with a WireError that names the tensor and what is wrong."""
    limit = wire.MAX_NAME_BYTES
    assert TensorSpec("n" * limit, "float32", (1,)).name == "n" * limit
    with pytest.raises(WireError, match=rf"'nnnn.*name longer than {limit} bytes"):
        TensorSpec("n" * (limit + 1), "float32", (1,))
    wide = "é" * (limit // 2 + 1)  # fewer than 1024 characters, more than 1024 bytes
    assert len(wide) < limit < len(wide.encode("utf-8"))
    with pytest.raises(WireError, match=rf"name longer than {limit} bytes"):
        TensorSpec(wide, "float32", (1,))

    with pytest.raises(WireError, match=r"tensor 'w\\ud800': name is not valid UTF-8"):
        TensorSpec("w\ud800", "float32", (1,))  # built by hand: a received name is UTF-8

    ndim = wire.MAX_NDIM
    assert TensorSpec("deep", "uint8", (1,) * ndim).nbytes == 1
    with pytest.raises(
        WireError, match=rf"tensor 'deep': {ndim + 1} dimensions \(at most {ndim}\)"
    ):
        TensorSpec("deep", "uint8", (1,) * (ndim + 1))

    # a dimension beyond u64 cannot travel, even when another 0 makes the tensor empty
    with pytest.raises(WireError, match=r"tensor 'big': a dimension of .* overflows uint64"):
        TensorSpec("big", "float32", (wire.U64_MAX + 1, 0))
    assert TensorSpec("big", "float32", (wire.U64_MAX, 0)).nbytes == 0
    # nor can a byte count beyond u64; u64's largest is still a valid spec
    assert TensorSpec("big", "uint8", (wire.U64_MAX,)).nbytes == wire.U64_MAX
    with pytest.raises(WireError, match=r"tensor 'big': .* more than a uint64 byte count"):
        TensorSpec("big", "float32", (2**63,))
    with pytest.raises(WireError, match=r"tensor 'w': unknown dtype 'complex64'"):
        TensorSpec("w", "complex64", (1,))


def test_a_declared_tensor_too_big_to_hold_is_refused_as_a_wire_error() -> None:
    """A spec within u64 yet beyond what numpy can allocate (2**63 bytes) is the sender's error,
    refused like any other, not a ValueError from numpy."""
    chunk = Chunk("huge", "float32", (2**61,), 0, b"")
    with pytest.raises(
        WireError, match=r"tensor 'huge': cannot hold its 9223372036854775808 bytes"
    ):
        TensorAssembler(collect=True).add(chunk)


# --------------------------------------------------------------------------------------------
# digest


def canonical_stream(model: dict[str, np.ndarray]) -> bytes:
    """The canonical stream, written out independently of pluralfed.wire from the docstring."""
    out = [b"pluralfed.wire/2\0"]
    for name, array in model.items():
        dtype = "bfloat16" if array.dtype == np.uint16 else array.dtype.name
        data = np.ascontiguousarray(array).tobytes()  # little-endian host
        out += [struct.pack("<I", len(name.encode())), name.encode()]
        out += [struct.pack("<I", len(dtype)), dtype.encode()]
        out += [struct.pack("<I", array.ndim), *(struct.pack("<Q", d) for d in array.shape)]
        out += [struct.pack("<Q", len(data)), data]
    return b"".join(out)


def test_digest_is_blake3_of_the_documented_canonical_stream() -> None:
    # the hash itself is plain BLAKE3 (its published value for the empty input), not a keyed or
    # derive-key mode
    assert blake3.blake3(b"").hexdigest() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    model = sample_model()
    assert wire.digest_of(model) == blake3.blake3(canonical_stream(model)).digest()
    assert len(wire.digest_of(model)) == wire.DIGEST_BYTES == 32


def test_digest_is_pinned() -> None:
    """A change of this value breaks every deployed node: bump WIRE_FORMAT instead."""
    model = {"a": np.arange(3, dtype=np.float32), "b": np.array(True)}
    assert wire.digest_of(model).hex() == blake3.blake3(canonical_stream(model)).hexdigest()
    assert wire.WIRE_FORMAT == "pluralfed.wire/2"
    assert wire.digest_of(model).hex() == (
        "cf7ff9b7036785cd80c52a0645d05248ff05d95845e809f119ffd7aa309751ab"
    )


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 4096])
def test_digest_independent_of_chunking(chunk_bytes: int) -> None:
    model = sample_model()
    incremental = wire.Digest()
    for chunk in only_first_carries_spec(list(wire.iter_chunks(model, chunk_bytes))):
        incremental.add_chunk(chunk)
    assert incremental.digest() == wire.digest_of(model)
    assert incremental.hexdigest() == wire.digest_of(model).hex()


@pytest.mark.parametrize("chunk_bytes", [1, 4096])
def test_digest_of_non_ascii_names_prefixes_their_utf8_length(chunk_bytes: int) -> None:
    """A name's length prefix counts its UTF-8 bytes, not its characters (the sender and a
    receiver in another language must agree on the stream)."""
    model = {"poids.é": np.arange(3, dtype=np.float32), "名前": np.array([True])}
    assert wire.digest_of(model) == blake3.blake3(canonical_stream(model)).digest()
    out = wire.assemble(wire.iter_chunks(model, chunk_bytes), wire.digest_of(model))
    assert_models_equal(out, model)


def test_digest_refuses_a_tensors_first_chunk_without_its_spec() -> None:
    digest = wire.Digest()
    with pytest.raises(WireError, match=r"tensor 'a': first chunk lacks dtype or shape"):
        digest.add_chunk(Chunk("a", None, None, 0, b"\0" * 4))


def test_digest_sensitive_to_everything_that_makes_a_model() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    base: dict[str, np.ndarray] = {"x": a, "y": np.ones(2, dtype=np.float32)}
    variants: list[dict[str, np.ndarray]] = [
        {"x": a.copy(), "y": np.array([1.0, 1.0000001], dtype=np.float32)},  # a value
        {"z": a, "y": base["y"]},  # a name
        {"x": a.view(np.int32), "y": base["y"]},  # the dtype (same bytes)
        {"x": a.reshape(3, 2), "y": base["y"]},  # the shape (same bytes)
        {"y": base["y"], "x": a},  # the order
        {"x": a},  # a tensor less
        {"x": a, "y": base["y"][:1]},  # a tensor shorter
    ]
    digests = {wire.digest_of(v) for v in variants}
    assert wire.digest_of(base) not in digests
    assert len(digests) == len(variants)
    # length prefixes: moving bytes between a name and the data must not collide
    assert wire.digest_of({"ab": np.zeros(0, np.uint8)}) != wire.digest_of(
        {"a": np.frombuffer(b"b", np.uint8)[:0]}
    )
    assert wire.digest_of({"a": np.array([1, 2], np.uint8)}) != wire.digest_of(
        {"a": np.array([1], np.uint8), "b": np.array([2], np.uint8)}
    )
    assert wire.digest_of(base) == wire.digest_of({"x": a.copy(), "y": base["y"].copy()})


# --------------------------------------------------------------------------------------------
# streaming consumer


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64, 4096])
def test_streaming_callback_sees_every_value_exactly_once(chunk_bytes: int) -> None:
    model = sample_model()
    seen: dict[str, list[TensorSlice]] = {}
    assembler = TensorAssembler(
        wire.specs_of(model), on_slice=lambda s: seen.setdefault(s.name, []).append(s)
    )
    returned = []
    for chunk in only_first_carries_spec(list(wire.iter_chunks(model, chunk_bytes))):
        piece = assembler.add(chunk)
        if piece is not None:
            returned.append(piece)
    assembler.finish(wire.digest_of(model))
    assert sum(len(v) for v in seen.values()) == len(returned)
    assert list(seen) == list(model)
    for name, array in model.items():
        pieces = seen[name]
        offsets = [p.element_offset for p in pieces]
        sizes = [p.values.size for p in pieces]
        assert offsets == list(np.cumsum([0, *sizes[:-1]])), name  # in order, no gap or overlap
        flat = np.concatenate([p.values for p in pieces]) if pieces else np.empty(0)
        assert flat.size == array.size, name
        assert np.array_equal(flat, np.asarray(array).reshape(-1)), name
        assert all(p.values.dtype == np.asarray(array).dtype for p in pieces), name


def test_without_collect_nothing_is_kept() -> None:
    model = {"w": np.ones(10, np.float32)}
    assembler = TensorAssembler()
    for chunk in wire.iter_chunks(model, 8):
        assembler.add(chunk)
    assert assembler.finish(wire.digest_of(model)) == wire.specs_of(model)
    assert assembler.total_bytes == 40
    with pytest.raises(RuntimeError, match="collect"):
        assembler.to_dict()


# --------------------------------------------------------------------------------------------
# every error


MODEL: dict[str, np.ndarray] = {
    "a": np.arange(8, dtype=np.float32),
    "b": np.ones((2, 3), dtype=np.float32),
    "c": np.array([1, 2], dtype=np.int64),
}
SPECS = wire.specs_of(MODEL)
DIGEST = wire.digest_of(MODEL)


def feed(
    chunks: list[Chunk], expected: list[TensorSpec] | None = SPECS, **kw: Any
) -> TensorAssembler:
    assembler = TensorAssembler(expected, **kw)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler


def run_stream(
    chunks: list[Chunk],
    digest: bytes = DIGEST,
    expected: list[TensorSpec] | None = SPECS,
    **kw: Any,
) -> None:
    feed(chunks, expected, **kw).finish(digest)


def good() -> list[Chunk]:
    return chunks_of(MODEL, 8)


def mutate(i: int, **changes: Any) -> list[Chunk]:
    chunks = good()
    chunks[i] = replace(chunks[i], **changes)
    return chunks


def test_good_stream_passes() -> None:
    run_stream(good())
    run_stream(good(), expected=None)


ERROR_CASES: dict[str, tuple[Callable[[], None], str]] = {
    "unknown name": (lambda: run_stream(mutate(0, name="zzz")), r"unexpected tensor 'zzz'"),
    "wrong order": (
        lambda: run_stream([c for c in good() if c.name == "b"] + good()),
        r"'b' out of order: expected 'a'",
    ),
    "dtype mismatch": (
        lambda: run_stream(mutate(0, dtype="float64")),
        r"tensor 'a': dtype float64, expected float32",
    ),
    "shape mismatch": (
        lambda: run_stream(mutate(0, shape=(2, 4))),
        r"tensor 'a': shape \(2, 4\), expected \(8,\)",
    ),
    "dtype changes mid-tensor": (
        lambda: run_stream(mutate(1, dtype="int32")),
        r"tensor 'a'.*says dtype int32",
    ),
    "shape changes mid-tensor": (
        lambda: run_stream(mutate(1, shape=(9,))),
        r"tensor 'a'.*says shape \(9,\)",
    ),
    "offset gap": (
        lambda: run_stream(mutate(1, offset=16)),
        r"tensor 'a'.*byte 16.*expected byte 8 \(gap\)",
    ),
    "offset overlap": (
        lambda: run_stream(mutate(1, offset=4)),
        r"tensor 'a'.*byte 4.*expected byte 8 \(overlap\)",
    ),
    "overflow": (
        lambda: run_stream([*good()[:4], Chunk("a", None, None, 32, b"\0" * 4), *good()[4:]]),
        r"tensor 'a'.*overflows the tensor's 32 bytes",
    ),
    "overflow inside a chunk": (
        lambda: run_stream(mutate(3, data=b"\0" * 12)),
        r"tensor 'a': chunk at byte 24 with 12 bytes overflows",
    ),
    "first chunk not at 0": (
        lambda: run_stream(mutate(0, offset=8)),
        r"'a': first chunk at byte offset 8",
    ),
    "first chunk without spec": (
        lambda: run_stream(mutate(0, dtype=None)),
        r"'a': first chunk lacks",
    ),
    "incomplete before next tensor": (
        lambda: run_stream([c for c in good() if c.offset != 24]),
        r"tensor 'a' incomplete: 24 of 32 bytes before tensor 'b' started",
    ),
    "incomplete at the end": (
        lambda: run_stream(good()[:-1]),
        r"tensor 'c' incomplete: 8 of 16 bytes when the stream ended",
    ),
    "missing tensors": (
        lambda: run_stream([c for c in good() if c.name == "a"]),
        r"2 of 3 tensors missing: 'b', 'c'",
    ),
    "duplicate tensor": (
        lambda: run_stream(good() + chunks_of({"a": MODEL["a"]}, 8), expected=None),
        r"tensor 'a' sent again",
    ),
    "digest mismatch": (lambda: run_stream(good(), digest=b"\1" * 32), r"digest mismatch"),
    "digest wrong in its last byte only": (
        lambda: run_stream(good(), digest=DIGEST[:-1] + bytes([DIGEST[-1] ^ 1])),
        r"digest mismatch",
    ),
    "digest wrong length": (lambda: run_stream(good(), digest=b"\1" * 5), r"digest is 5 bytes"),
    "data changed in flight": (
        lambda: run_stream(mutate(0, data=np.array([9, 9], np.float32).tobytes())),
        r"digest mismatch",
    ),
    "over max_bytes": (
        lambda: run_stream(good(), expected=None, max_bytes=40),
        r"tensor 'b': declares 24 bytes, more than the 8 left of the 40 allowed",
    ),
    "nan": (
        lambda: run_stream(
            chunks_of(
                {"a": np.array([1, np.nan, 3, 4, 5, 6, 7, 8], np.float32)}
                | {k: MODEL[k] for k in "bc"}
            )
        ),
        r"tensor 'a': non-finite value nan at element 1",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_is_a_wire_error_naming_the_problem(case: str) -> None:
    action, pattern = ERROR_CASES[case]
    with pytest.raises(WireError, match=pattern) as info:
        action()
    assert isinstance(info.value, InputError)


def test_digest_and_nonfinite_errors_have_their_own_classes() -> None:
    with pytest.raises(DigestMismatchError):
        run_stream(good(), digest=b"\0" * 32)
    bad = {"h": np.array([1, np.inf], np.float16)}
    with pytest.raises(NonFiniteError, match=r"'h'.*inf at element 1"):
        wire.assemble(wire.iter_chunks(bad), wire.digest_of(bad))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_bfloat16_is_caught(value: float) -> None:
    bad = {"w": wire.float32_to_bfloat16(np.array([0.5, value, 2.0], np.float32))}
    with pytest.raises(NonFiniteError, match=r"'w'.*element 1"):
        wire.assemble(wire.iter_chunks(bad, 1), wire.digest_of(bad))


def test_nonfinite_is_caught_in_the_chunk_that_carries_it() -> None:
    values = np.ones(100, np.float32)
    values[90] = np.nan
    assembler = TensorAssembler()
    chunks = list(wire.iter_chunks({"w": values}, 40))  # 10 elements per chunk
    for chunk in chunks[:9]:
        assembler.add(chunk)
    with pytest.raises(NonFiniteError, match="element 90"):
        assembler.add(chunks[9])


def test_nonfinite_allowed_when_not_checked() -> None:
    model = {"w": np.array([np.nan, 1.0], np.float32)}
    out = TensorAssembler(check_finite=False, collect=True)
    for chunk in wire.iter_chunks(model):
        out.add(chunk)
    out.finish(wire.digest_of(model))
    assert np.isnan(out.to_dict()["w"][0])


def test_bool_bytes_other_than_0_or_1_are_refused() -> None:
    chunk = Chunk("m", "bool", (3,), 0, bytes([0, 1, 2]))
    with pytest.raises(WireError, match=r"'m': bool element 2 is byte 2"):
        TensorAssembler().add(chunk)


def test_bool_bytes_are_checked_even_when_floats_may_be_non_finite() -> None:
    """check_finite=False lets NaN through in float tensors only: a bool is still 0 or 1."""
    chunk = Chunk("m", "bool", (3,), 0, bytes([0, 1, 2]))
    with pytest.raises(WireError, match=r"'m': bool element 2 is byte 2"):
        TensorAssembler(check_finite=False).add(chunk)


def test_an_expected_model_with_a_name_twice_is_refused() -> None:
    spec = TensorSpec("a", "float32", (2,))
    with pytest.raises(WireError, match="duplicate tensor names"):
        TensorAssembler([spec, TensorSpec("b", "float32", (1,)), spec])


def test_header_counts_are_checked() -> None:
    with pytest.raises(WireError, match="header said 4"):
        feed(good()).finish(DIGEST, tensor_count=4)
    with pytest.raises(WireError, match="header said 1"):
        feed(good()).finish(DIGEST, total_bytes=1)
    assert feed(good()).finish(DIGEST, tensor_count=3, total_bytes=72) == SPECS


def test_errors_are_sticky_and_streams_end_once() -> None:
    assembler = TensorAssembler(SPECS)
    with pytest.raises(WireError):
        assembler.add(mutate(0, name="zzz")[0])
    with pytest.raises(WireError, match="already rejected"):
        assembler.add(good()[0])
    with pytest.raises(WireError, match="already rejected"):
        assembler.finish(DIGEST)

    done = feed(good())
    done.finish(DIGEST)
    with pytest.raises(WireError, match="already finished"):
        done.finish(DIGEST)
    with pytest.raises(WireError, match="after the end"):  # data after the trailer: malformed
        done.add(good()[0])


def test_to_dict_needs_a_checked_stream() -> None:
    assembler = feed(good(), collect=True)
    with pytest.raises(RuntimeError, match="before finish"):
        assembler.to_dict()
    assembler.finish(DIGEST)
    assert_models_equal(assembler.to_dict(), MODEL)


# --------------------------------------------------------------------------------------------
# spool


def spool_update(
    model: dict[str, np.ndarray], directory: Path, chunk_bytes: int, digest: bytes
) -> UpdateSpool:
    spool = UpdateSpool(wire.specs_of(model), directory)
    for chunk in wire.iter_chunks(model, chunk_bytes):
        spool.add(chunk)
    spool.finish(digest)
    return spool


@pytest.mark.parametrize(("chunk_bytes", "read_bytes"), [(1, 1), (7, 5), (4096, 16), (64, 1 << 20)])
def test_spool_replays_the_update(tmp_path: Path, chunk_bytes: int, read_bytes: int) -> None:
    model = sample_model()
    with spool_update(model, tmp_path, chunk_bytes, wire.digest_of(model)) as spool:
        assert spool.path.exists()
        assert spool.specs == wire.specs_of(model)
        for _ in range(2):  # replayable
            got: dict[str, list[np.ndarray]] = {}
            for piece in spool.replay(read_bytes):
                assert piece.values.nbytes <= max(read_bytes, piece.spec.itemsize)
                got.setdefault(piece.name, []).append(piece.values)
            rebuilt = {
                name: np.concatenate(got[name]).reshape(np.shape(array))
                for name, array in model.items()
            }
            assert_models_equal(rebuilt, model)
    assert not spool.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_spool_drops_a_bad_upload_at_once(tmp_path: Path) -> None:
    model = sample_model()
    with pytest.raises(DigestMismatchError):
        spool_update(model, tmp_path, 16, b"\0" * 32)
    assert list(tmp_path.iterdir()) == []

    spool = UpdateSpool(wire.specs_of(model), tmp_path)
    chunks = list(wire.iter_chunks(model, 16))
    spool.add(chunks[0])
    with pytest.raises(WireError, match="overlap"):
        spool.add(chunks[0])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WireError, match="closed"):
        spool.add(chunks[1])

    truncated = UpdateSpool(wire.specs_of(model), tmp_path)
    for chunk in chunks[:-3]:
        truncated.add(chunk)
    with pytest.raises(WireError, match=r"missing|incomplete"):
        truncated.finish(wire.digest_of(model))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="before finish"):
        next(truncated.replay())


class _FullDiskFile:
    """A spool file on a disk that has filled up: writes are buffered, and writing them out fails
    with ENOSPC at close (which flushes what is left), and at an explicit flush if `flush_fails`."""

    def __init__(self, real: Any, flush_fails: bool) -> None:
        self._real = real
        self._flush_fails = flush_fails

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        if self._flush_fails:
            raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self._real.close()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("flush_fails", [True, False], ids=["at-flush", "at-close"])
def test_a_spool_on_a_full_disk_is_deleted_when_finish_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_fails: bool
) -> None:
    """The disk filling up at the end of an upload is the coordinator's trouble, not the node's:
    finish() raises the OSError and the spool file is gone at once, whichever of the last flush
    or the close hits the full disk (before, a failed close left it for the caller's close())."""
    real_fdopen = wire.os.fdopen
    monkeypatch.setattr(
        wire.os, "fdopen", lambda fd, mode: _FullDiskFile(real_fdopen(fd, mode), flush_fails)
    )
    model = sample_model()
    spool = UpdateSpool(wire.specs_of(model), tmp_path)
    for chunk in wire.iter_chunks(model, 64):
        spool.add(chunk)
    with pytest.raises(OSError, match="No space left"):
        spool.finish(wire.digest_of(model))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WireError, match="closed"):
        spool.finish(wire.digest_of(model))
    spool.close()  # idempotent after the failure


def test_a_finished_spool_refuses_a_second_finish_and_still_replays(tmp_path: Path) -> None:
    """finish() twice is a caller's bug; it must not drop the update already proven whole."""
    model = {"a": np.arange(6, dtype=np.float32)}
    with spool_update(model, tmp_path, 8, wire.digest_of(model)) as spool:
        with pytest.raises(WireError, match="update spool is closed"):
            spool.finish(wire.digest_of(model))
        assert spool.path.exists()
        assert np.array_equal(np.concatenate([p.values for p in spool.replay()]), model["a"])


def test_a_spool_file_cut_short_after_finish_is_refused_on_replay(tmp_path: Path) -> None:
    """The spool is proven whole at finish; if its file then loses bytes (disk full, tampering),
    replaying it must fail naming the tensor, not fold fewer values than the update has."""
    model = {"a": np.arange(6, dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    with spool_update(model, tmp_path, 8, wire.digest_of(model)) as spool:
        with open(spool.path, "r+b") as f:
            f.truncate(spool.path.stat().st_size - 8)  # the last two elements of 'b'
        with pytest.raises(WireError, match=r"truncated in tensor 'b'"):
            list(spool.replay(8))


# --------------------------------------------------------------------------------------------
# torch, bfloat16 and files


def test_state_dict_round_trip_with_bfloat16() -> None:
    torch = pytest.importorskip("torch")
    sd = {
        "w": torch.randn(3, 4),
        "bf": torch.randn(5, dtype=torch.bfloat16),
        "h": torch.randn(2, dtype=torch.float16),
        "n": torch.tensor(7),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(1.5, dtype=torch.float64),
    }
    arrays = tensorfiles.state_dict_to_numpy(sd)
    assert arrays["bf"].dtype == np.uint16
    assert [s.dtype for s in wire.specs_of(arrays)] == [
        "float32",
        "bfloat16",
        "float16",
        "int64",
        "bool",
        "float64",
    ]
    back = tensorfiles.numpy_to_state_dict(
        wire.assemble(wire.iter_chunks(arrays, 3), wire.digest_of(arrays))
    )
    for name, tensor in sd.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    arrays["w"][0, 0] = 123.0  # copies: the module's tensors do not change
    assert sd["w"][0, 0].item() != 123.0


def test_float32_to_bfloat16_rounds_like_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, size=1000),
            np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40], np.float32),
        ]
    ).astype(np.float32)
    ours = wire.float32_to_bfloat16(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(wire.bfloat16_to_float32(wire.float32_to_bfloat16(np.array([np.nan]))))[0]
    assert np.array_equal(
        wire.bfloat16_to_float32(ours),
        torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy(),
    )


def test_float32_to_bfloat16_breaks_exact_ties_to_even_like_torch() -> None:
    """A float32 halfway between two bfloat16 values (low 16 bits 0x8000) rounds to the even
    one, as torch does; random values almost never hit a tie, so the tie rule needs its own
    patterns. Rounding ties up would bias every bfloat16 model's weights by 1 ulp upwards."""
    torch = pytest.importorskip("torch")
    high = np.random.default_rng(2).integers(0, 0x7F80, size=200, dtype=np.uint32)  # finite
    bits = np.concatenate(
        [
            np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000], np.uint32),
            (high << 16) | 0x8000,  # ties, both parities of the upper half
            ((high | 0x8000) << 16) | 0x8000,  # negative ties
            (high << 16) | 0x7FFF,  # just under a tie
            (high << 16) | 0x8001,  # just over a tie
        ]
    ).astype(np.uint32)
    values = bits.view(np.float32)
    ours = wire.float32_to_bfloat16(values)
    np.testing.assert_array_equal(ours[:4], np.array([0x3F80, 0x3F82, 0xBF80, 0xBF82], np.uint16))
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_float32_to_bfloat16_keeps_every_nan_a_nan() -> None:
    """A NaN whose payload is only in the low 16 bits (a signalling NaN) would round to infinity
    if truncated: it stays a NaN of its sign."""
    bits = np.array([0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FC00000], np.uint32)
    ours = wire.float32_to_bfloat16(bits.view(np.float32))
    assert np.isnan(wire.bfloat16_to_float32(ours)).all()
    assert list(ours >> 15) == [0, 1, 0, 0]  # the sign kept


def test_save_and_load_tensors_keep_order_dtypes_and_metadata(tmp_path: Path) -> None:
    model = dict(reversed(list(sample_model().items())))  # an order safetensors would not keep
    path = tmp_path / "model.safetensors"
    tensorfiles.save_tensors(path, model, metadata={"round": "3"})
    assert_models_equal(tensorfiles.load_tensors(path), model)
    assert tensorfiles.load_metadata(path) == {"round": "3"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_load_tensors_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="safetensors"):
        tensorfiles.load_tensors(path)


def test_state_dict_from_numpy_owns_its_memory() -> None:
    """The tensors made for `load_state_dict` must not share the arrays' memory: arrays from the
    wire are read-only views of received bytes (torch warns on such a view, and a later write
    through the tensor would change the bytes, or fail), and a caller's own array may change."""
    torch = pytest.importorskip("torch")
    mine = np.arange(4, dtype=np.float32)
    received = np.frombuffer(np.arange(3, dtype=np.int64).tobytes(), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable"
        back = tensorfiles.numpy_to_state_dict({"w": mine, "n": received})
    mine[0] = 99.0
    assert torch.equal(back["w"], torch.arange(4, dtype=torch.float32))
    back["n"][0] = 7  # the tensor is writable, the received bytes are untouched
    assert received.tolist() == [0, 1, 2]


def test_a_saved_model_file_names_the_wire_format_its_tensors_are_in(tmp_path: Path) -> None:
    """A model file says which wire format its dtypes and order are (bfloat16 as uint16 bit
    patterns): another tool reading the safetensors file sees it, though `load_metadata` leaves
    pluralfed's own keys out."""
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    tensorfiles.save_tensors(path, sample_model(), metadata={"round": "3"})
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["pluralfed.format"] == wire.WIRE_FORMAT and meta["round"] == "3"
    assert tensorfiles.load_metadata(path) == {"round": "3"}


def test_a_state_dict_entry_that_is_not_a_tensor_is_refused_by_name() -> None:
    """An optimizer's or a module's state may hold plain numbers: such an entry is a WireError
    naming it, not an AttributeError from inside the conversion."""
    torch = pytest.importorskip("torch")
    with pytest.raises(WireError, match=r"^tensor 'step': a int, not a torch tensor$"):
        tensorfiles.state_dict_to_numpy({"w": torch.zeros(2), "step": 3})
